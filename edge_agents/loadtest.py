"""Load-test the Serve app with many simulated edge agents (Ray actors) over simulated links.

    python -m edge_agents.loadtest --agents 16 --duration 60 --out runs/load
    python -m edge_agents.loadtest --config configs/loadtest/contention.yaml --sweep-agents 1,4,16,64

The app must be running (`serve run serve_config.yaml`, or pass --start-app). Agents run in Ray
actors on the app's cluster when there is one (`ray.init(address="auto")`), so replica counts are
read from Serve while the load runs; otherwise a local Ray is started for the agents alone.

Writes to --out: summary.json, queries.csv (one row per query, failed ones included),
latency_cdf.png, timeline.png (latency and running replicas over time), bytes_accuracy.png; with
--sweep-agents also sweep.json and sweep.png (throughput and p95 against the number of agents,
per policy: the contention curve).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from collab.config import POLICIES, ConfigError, deep_merge, nested, parse_sets
from collab.progress import progress as progress_bar
from edge_agents import report
from edge_agents.config import LoadTestConfig, load_loadtest_config

# ------------------------------------------------------------------------------------ Ray side


def connect_ray(address: str | None) -> bool:
    """Join the app's Ray cluster (True) or, with none running, start a local one (False).

    Ray's auth settings are left as the environment has them, as `serve run` had them: it starts
    local clusters with token authentication (Ray >= 2.59), which a driver joins with the default
    environment; forced to RAY_AUTH_MODE=disabled it could not authenticate and ran the agents on
    a separate local Ray, without the app's replica counts. Run the app and the load test with the
    same RAY_AUTH_MODE."""
    import ray

    if ray.is_initialized():
        return True
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local fallback cluster reports nothing
    try:
        ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
        return True
    except ConnectionError:
        if address:
            raise
        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=False)
        return False


def replica_counts(app_name: str) -> dict[str, int] | None:
    """RUNNING replicas per deployment of the app, or None when Serve cannot be reached."""
    try:
        from ray import serve

        app = serve.status().applications.get(app_name)
        if app is None:
            return None
        return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}
    except Exception:
        return None


def run_load(
    config: LoadTestConfig, *, policy: str | None = None, progress: bool = True, label: str = "", metrics=None
) -> dict:
    """One load run: {"rows", "replicas", "channel", "wall_s", "failures", "unfinished"}."""
    import ray

    from edge_agents.host import AgentHost
    from edge_agents.links import SharedChannel

    cfg = config.model_dump(mode="json")
    env = {}
    if config.auth_token_env and os.environ.get(config.auth_token_env):  # agents run in other processes
        env[config.auth_token_env] = os.environ[config.auth_token_env]
    placement = {"resources": dict(config.actor_resources)} if config.actor_resources else {}
    host_cls = ray.remote(
        num_cpus=0, max_concurrency=1000, runtime_env={"env_vars": env} if env else None, **placement
    )(AgentHost)
    indices = list(range(config.agents))
    groups = [indices[i : i + config.agents_per_actor] for i in range(0, len(indices), config.agents_per_actor)]
    channel, hosts = None, []
    w = config.workload
    rows: list[dict] = []
    replicas: list[dict] = []
    dead: dict[int, str] = {}
    failures: list[str] = []
    unfinished = 0
    channel_stats = None
    bar = None
    try:
        if config.channel.capacity_mbps:
            channel = ray.remote(num_cpus=0, **placement)(SharedChannel).remote(
                config.channel.capacity_mbps, config.channel.discipline
            )
        hosts = [host_cls.remote(g, cfg, channel, policy) for g in groups]
        ray.get([h.ready.remote() for h in hosts])  # items loaded: the clock starts now for everyone
        if channel is not None:
            ray.get(channel.reset.remote())  # utilisation counts from the start of the load
        run_start = time.time()
        ray.get([h.start.remote(run_start) for h in hosts])
        deadline = run_start + w.duration_s + w.drain_s
        bar = progress_bar(
            total=int(w.duration_s), unit="s", desc=label or f"{config.agents} agents", disable=not progress
        )
        stopped = False
        last_sample = 0.0
        while True:
            time.sleep(0.5)
            now = time.time()
            results = _drain_all(hosts, dead)
            for r in results:
                rows.extend(r["rows"])
                if metrics is not None:
                    for row in r["rows"]:
                        metrics.observe(row)
            failures = sorted({f for r in results for f in r["failures"]} | set(dead.values()))
            if now - last_sample >= 2.0:
                counts = replica_counts(config.app_name)
                if counts is not None:
                    replicas.append({"t": now - run_start, "replicas": counts})
                if channel is not None and metrics is not None:
                    metrics.channel(ray.get(channel.stats.remote()))
                last_sample = now
            bar.n = min(int(now - run_start), int(w.duration_s))
            bar.set_postfix_str(_live(rows, now - run_start, stopped))
            bar.refresh()
            if all(r["done"] for r in results):
                break
            if now >= deadline:
                unfinished = sum(r["in_flight"] for r in results)
                bar.write(
                    f"drain time over ({w.drain_s:.0f} s): {unfinished} queries still in flight, counted as unfinished"
                )
                break
            if not stopped and now >= run_start + w.duration_s:
                for i, h in enumerate(hosts):
                    if i not in dead:
                        h.stop.remote()
                stopped = True
    finally:
        if bar is not None:
            bar.close()
        if channel is not None:
            try:
                channel_stats = ray.get(channel.stats.remote(), timeout=30)
            except Exception:
                channel_stats = None
        for actor in [*hosts, *([channel] if channel is not None else [])]:
            try:
                ray.kill(actor)
            except Exception:
                pass
    wall = max((r["t_start"] + r["latency_ms"] / 1000 for r in rows), default=0.0)
    return {
        "rows": rows,
        "replicas": replicas,
        "channel": channel_stats,
        "wall_s": wall,
        "failures": failures,
        "unfinished": unfinished,
    }


def _drain_all(hosts, dead: dict[int, str]) -> list[dict]:
    """Rows from every live host; a host whose process died is reported once and counted done."""
    import ray

    out = []
    for i, ref in enumerate([h.drain.remote() if i not in dead else None for i, h in enumerate(hosts)]):
        if ref is None:
            out.append({"rows": [], "done": True, "failures": [], "in_flight": 0})
            continue
        try:
            out.append(ray.get(ref, timeout=30))
        except ray.exceptions.GetTimeoutError:  # busy, not dead: ask again on the next tick
            out.append({"rows": [], "done": False, "failures": [], "in_flight": 0})
        except ray.exceptions.RayActorError as exc:  # the process died: its unreported rows are lost, say so
            dead[i] = f"agent host {i} died: {type(exc).__name__}"
            out.append({"rows": [], "done": True, "failures": [], "in_flight": 0})
    return out


def _live(rows: list[dict], elapsed: float, draining: bool) -> str:
    ok = [r["latency_ms"] for r in rows if not r["error"]]
    errors = sum(1 for r in rows if r["error"])
    p50, p95 = (np.percentile(ok, 50), np.percentile(ok, 95)) if ok else (0, 0)
    state = "draining " if draining else ""
    qps = len(ok) / max(elapsed, 1e-9)
    return f"{state}queries {len(rows)} qps {qps:.2f} errors {errors} p50 {p50:.0f} ms p95 {p95:.0f} ms"


# ------------------------------------------------------------------------------------ outputs


def write_outputs(result: dict, config: LoadTestConfig, out: Path, extra_policies: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = report.summarize(
        result["rows"],
        wall_s=result["wall_s"],
        config=config.model_dump(mode="json"),
        replicas=result["replicas"],
        channel=result["channel"],
        agent_failures=result["failures"],
        unfinished=result.get("unfinished", 0),
    )
    report.write_json(summary, out / "summary.json")
    report.write_json(result["replicas"], out / "replicas.json")
    report.write_rows(result["rows"], out / "queries.csv")
    report.plot_latency_cdf(result["rows"], out / "latency_cdf.png")
    report.plot_timeline(result["rows"], result["replicas"], out / "timeline.png")
    report.plot_bytes_accuracy(extra_policies or summary["by_policy"], out / "bytes_accuracy.png")
    report.write_json(report.windows(result["rows"]), out / "windows.json")
    return summary


def sweep(
    config: LoadTestConfig,
    agents: list[int],
    policies: list[str],
    out: Path,
    progress: bool,
    metrics=None,
    slo_ms: float | None = None,
) -> list[dict]:
    points, by_policy, rows_by_policy = [], {}, {}
    for policy in policies:
        for n in agents:
            cfg = config.model_copy(update={"agents": n})
            result = run_load(cfg, policy=policy, progress=progress, label=f"{policy} x{n}", metrics=metrics)
            summary = write_outputs(result, cfg, out / f"{policy}_{n}")
            rows_by_policy[policy] = result["rows"]
            point = {
                "policy": policy,
                "agents": n,
                **{
                    k: summary[k]
                    for k in (
                        "queries",
                        "failed",
                        "unfinished",
                        "throughput_qps",
                        "latency_ms",
                        "accuracy",
                        "refine_rate",
                        "bytes_per_query",
                        "retries",
                    )
                },
            }
            points.append(point)
            by_policy.setdefault(policy, summary["by_policy"].get(policy))
            print(
                f"{policy:8s} agents {n:4d}: {summary['throughput_qps'] or 0:6.2f} qps  p95 "
                f"{summary['latency_ms']['p95'] or 0:8.0f} ms"
                f"  failed {summary['failed']}  accuracy "
                f"{summary['accuracy'] if summary['accuracy'] is not None else '-'}",
                flush=True,
            )
    report.write_json(points, out / "sweep.json")
    report.plot_sweep(points, out / "sweep.png")
    if len(agents) == 1:  # one load (e.g. a load step) under several policies: their timelines together
        timelines = {p: report.windows(rows) for p, rows in rows_by_policy.items()}
        report.write_json(timelines, out / "windows_by_policy.json")
        report.plot_policy_windows(timelines, out / "windows_by_policy.png", slo_ms)
    report.plot_bytes_accuracy({p: s for p, s in by_policy.items() if s}, out / "bytes_accuracy.png")
    return points


# ------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edge_agents.loadtest",
        description=__doc__.split("\n\n")[0],
        epilog="Flags override the YAML config; --set KEY=VALUE overrides any field (e.g. --set workload.drain_s=60).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="load-test YAML (see configs/loadtest/); defaults apply without one")
    p.add_argument("--url", help="gateway URL (default http://127.0.0.1:8000)")
    p.add_argument("--agents", type=int, help="number of edge agents")
    p.add_argument("--duration", type=float, help="seconds during which agents start queries")
    p.add_argument("--policy", choices=POLICIES, help="policy every agent asks for (device profiles may override)")
    p.add_argument(
        "--mode", choices=["closed", "open"], help="closed loop (think time) or open loop (Poisson arrivals)"
    )
    p.add_argument("--think-time", type=float, help="closed loop: mean think time in seconds")
    p.add_argument("--rate", type=float, help="open loop: arrivals per second per agent")
    p.add_argument("--ramp-up", type=float, help="seconds over which agents start")
    p.add_argument("--channel-mbps", type=float, help="share one uplink of this capacity among all agents")
    p.add_argument("--discipline", choices=["ps", "fifo"], help="shared channel: processor sharing or FIFO")
    p.add_argument("--synthetic", metavar="SEED:N", help="images and questions from the synthetic benchmark")
    p.add_argument("--dataset", metavar="PATH", help="images and questions from a local dataset")
    p.add_argument("--agents-per-actor", type=int, help="agents per Ray actor process")
    p.add_argument("--metrics-port", type=int, help="export the edge metrics for Prometheus on this port")
    p.add_argument("--sweep-agents", metavar="N,N,...", help="run once per agent count and plot the contention curve")
    p.add_argument(
        "--sweep-policies",
        default="entropy,never,always,random",  # adaptive too, when asked for
        help="policies for --sweep-agents (default: %(default)s)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field (YAML value)"
    )
    p.add_argument(
        "--slo-ms", type=float, help="draw this p95 SLO on the per-policy timelines (a --sweep-agents of one count)"
    )
    p.add_argument("--ray-address", help="Ray cluster to join (default: auto, else a local Ray)")
    p.add_argument(
        "--start-app", action="store_true", help="start `serve run serve_config.yaml` first and stop it at the end"
    )
    p.add_argument("--out", default="runs/loadtest", help="output directory (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    return p


def config_from_args(args) -> LoadTestConfig:
    flags = {
        "url": args.url,
        "agents": args.agents,
        "policy": args.policy,
        "agents_per_actor": args.agents_per_actor,
        "metrics_port": args.metrics_port,
        "workload.duration_s": args.duration,
        "workload.mode": args.mode,
        "workload.think_time_s": args.think_time,
        "workload.rate_qps": args.rate,
        "workload.ramp_up_s": args.ramp_up,
        "channel.capacity_mbps": args.channel_mbps,
        "channel.discipline": args.discipline,
        "source.synthetic": args.synthetic,
        "source.dataset": args.dataset,
    }
    overrides = deep_merge(nested({k: v for k, v in flags.items() if v is not None}), parse_sets(args.set))
    return load_loadtest_config(args.config, overrides)


def parse_int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{name} expects integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{name} expects positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sweep_agents = parse_int_list(args.sweep_agents, "--sweep-agents") if args.sweep_agents else None
    policies = [p.strip() for p in args.sweep_policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        print(f"error: unknown policies {bad}; choose from {list(POLICIES)}", file=sys.stderr)
        return 2
    out = Path(args.out)

    from edge_agents.app_process import serve_app, wait_ready

    try:
        context = serve_app(url=config.url) if args.start_app else nullcontext(wait_ready(config.url, None, timeout=30))
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with context:
        try:
            return _run(args, config, out, sweep_agents, policies)
        finally:
            import ray

            ray.shutdown()  # leave the cluster before a --start-app `serve run` is stopped


def _run(args, config: LoadTestConfig, out: Path, sweep_agents, policies) -> int:
    on_cluster = connect_ray(args.ray_address)
    if not on_cluster:
        print(
            "note: no Ray cluster found; agents run on a local Ray and replica counts are not plotted", file=sys.stderr
        )
    metrics = None
    if config.metrics_port:
        from edge_agents.metrics import EdgeMetrics

        metrics = EdgeMetrics.serve(config.metrics_port)
    if sweep_agents:
        points = sweep(config, sweep_agents, policies, out, not args.no_progress, metrics, args.slo_ms)
        failed = sum(p["failed"] + p["unfinished"] for p in points)
        print(f"\nsweep written to {out}/sweep.json and {out}/sweep.png")
        return 1 if failed else 0
    result = run_load(config, progress=not args.no_progress, metrics=metrics)
    summary = write_outputs(result, config, out)
    print("\n" + report.table(summary))
    print(f"\nwritten to {out}/ (summary.json, queries.csv, latency_cdf.png, timeline.png, bytes_accuracy.png)")
    if result["failures"]:
        print("agent crashes:\n  " + "\n  ".join(result["failures"]), file=sys.stderr)
    return 1 if summary["failed"] or summary["unfinished"] or result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
