"""Load-test results: the summary (summary.json keys are stable), the CSV, the table and the plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from edge_agents.agent import QueryLog

PERCENTILES = (50, 95, 99)


def _percentiles(values) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES} | {"mean": float(arr.mean())}


def _mean(values) -> float | None:
    arr = [v for v in values if v is not None]
    return float(np.mean(arr)) if arr else None


def group_summary(rows: list[dict]) -> dict:
    """Accuracy, refine rate and bytes of a set of rows (answered queries only)."""
    ok = [r for r in rows if not r["error"]]
    return {
        "queries": len(rows),
        "failed": len(rows) - len(ok),
        "accuracy": _mean(r["correct"] for r in ok),
        "first_pass_accuracy": _mean(r["first_correct"] for r in ok),
        "refine_rate": _mean(float(r["box"] is not None) for r in ok),
        "bytes_per_query": {
            "global": _mean(r["global_bytes"] for r in ok),
            "local": _mean(r["local_bytes"] for r in ok),
            "total": _mean(r["global_bytes"] + r["local_bytes"] for r in ok),
            "full_resolution": _mean(r["full_bytes"] for r in ok),
        },
        "latency_ms": _percentiles(r["latency_ms"] for r in ok),
    }


def summarize(
    rows: list[dict],
    *,
    wall_s: float,
    config: dict | None = None,
    replicas: list[dict] | None = None,
    channel: dict | None = None,
    agent_failures: list[str] | None = None,
    unfinished: int = 0,
) -> dict:
    """summary.json: `queries`, `failed`, `throughput_qps`, `latency_ms.{p50,p95,p99}`, `accuracy`,
    `refine_rate`, `bytes_per_query.{global,local}`, plus the network/server split and breakdowns."""
    ok = [r for r in rows if not r["error"]]
    out = group_summary(rows)
    errors: dict[str, int] = {}
    for r in rows:
        if r["error"]:
            key = r["error"].split(";")[0][:80]
            errors[key] = errors.get(key, 0) + 1
    out.update(
        {
            "unfinished": unfinished,  # still in flight when the drain time ran out: not answered
            "throughput_qps": len(ok) / wall_s if wall_s > 0 else None,
            "wall_s": wall_s,
            "network_ms": _percentiles(r["network_ms"] for r in ok),
            "server_ms": _percentiles(r["server_ms"] for r in ok),
            "edge_ms": _percentiles(r["edge_ms"] for r in ok),
            "retries": int(sum(r["retries"] for r in rows)),
            "queries_retried": int(sum(r["retries"] > 0 for r in rows)),
            "sessions_expired": int(sum(bool(r["session_expired"]) for r in ok)),
            "errors": errors,
            "agent_failures": agent_failures or [],
            "by_policy": {
                p: group_summary([r for r in rows if r["policy"] == p]) for p in sorted({r["policy"] for r in rows})
            },
            "by_profile": {
                p: group_summary([r for r in rows if r["profile"] == p]) for p in sorted({r["profile"] for r in rows})
            },
        }
    )
    if replicas:
        names = sorted({k for s in replicas for k in s["replicas"]})
        out["replicas_max"] = {n: max(s["replicas"].get(n, 0) for s in replicas) for n in names}
        out["replicas_min"] = {n: min(s["replicas"].get(n, 0) for s in replicas) for n in names}
    if channel:
        out["channel"] = channel
    if config:
        out["config"] = config
    return out


def write_rows(rows: list[dict], path: Path) -> None:
    fields = list(QueryLog.__dataclass_fields__)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in sorted(rows, key=lambda r: r["t_start"]):
            writer.writerow(r)


def read_rows(path: Path) -> list[dict]:
    """queries.csv back as rows with write_rows' types (empty cells are None)."""
    types = {name: f.type for name, f in QueryLog.__dataclass_fields__.items()}

    def parse(name: str, text: str):
        if text == "":  # None when written (an empty answer string reads back as None too)
            return None
        kind = str(types[name])
        if "bool" in kind:
            return text == "True"
        if "int" in kind and "float" not in kind:
            return int(float(text))
        if "float" in kind:
            return float(text)
        return text

    with open(path, newline="") as f:
        return [{k: parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def _fmt(v, spec=".1f", unit="") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def table(summary: dict) -> str:
    """The end-of-run table, for people."""
    lat, net, srv = summary["latency_ms"], summary["network_ms"], summary["server_ms"]
    b = summary["bytes_per_query"]
    lines = [
        f"queries {summary['queries']}  failed {summary['failed']}  unfinished {summary['unfinished']}  throughput "
        f"{_fmt(summary['throughput_qps'], '.2f')} qps"
        f"  retries {summary['retries']} ({summary['queries_retried']} queries)  expired sessions "
        f"{summary['sessions_expired']}",
        f"{'latency ms':<14}{'p50':>10}{'p95':>10}{'p99':>10}",
    ]
    for name, d in (("end to end", lat), ("network", net), ("server", srv)):
        lines.append(f"{name:<14}" + "".join(f"{_fmt(d[f'p{p}']):>10}" for p in PERCENTILES))
    lines.append(
        f"accuracy {_fmt(summary['accuracy'], '.3f')} (first pass {_fmt(summary['first_pass_accuracy'], '.3f')})"
        f"  refine rate {_fmt(summary['refine_rate'], '.3f')}"
    )
    lines.append(
        f"bytes/query: global {_fmt(b['global'], '.0f')}  local {_fmt(b['local'], '.0f')}  total "
        f"{_fmt(b['total'], '.0f')}"
        f"  (full-resolution original {_fmt(b['full_resolution'], '.0f')})"
    )
    if len(summary["by_policy"]) > 1:
        for p, s in summary["by_policy"].items():
            lines.append(
                f"  {p:<8} n={s['queries']:<5} acc {_fmt(s['accuracy'], '.3f')}  refine {_fmt(s['refine_rate'], '.2f')}"
                f"  bytes {_fmt(s['bytes_per_query']['total'], '.0f')}  p95 {_fmt(s['latency_ms']['p95'], '.0f')} ms"
            )
    if summary.get("replicas_max"):
        lines.append(
            "replicas (min-max): "
            + ", ".join(f"{n} {summary['replicas_min'][n]}-{m}" for n, m in summary["replicas_max"].items())
        )
    if summary.get("channel"):
        c = summary["channel"]
        lines.append(
            f"shared channel: {c['capacity_mbps']} Mbit/s {c['discipline']}, utilisation {c['utilisation']:.2f}, peak "
            f"{c['peak_in_flight']} transfers"
        )
    if summary["errors"]:
        lines.append("errors: " + "; ".join(f"{k} x{v}" for k, v in summary["errors"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency_cdf(rows: list[dict], path: Path) -> None:
    plt = _plt()
    ok = [r for r in rows if not r["error"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("latency_ms", "end to end"), ("server_ms", "server"), ("network_ms", "network (simulated)")):
        vals = np.sort([r[key] for r in ok])
        if vals.size:
            ax.plot(vals, np.arange(1, vals.size + 1) / vals.size, label=label)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of queries")
    ax.set_title(f"latency CDF ({len(ok)} answered queries)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_timeline(rows: list[dict], replicas: list[dict], path: Path) -> None:
    """Latency of each query at its completion time, and Serve's running replicas per deployment."""
    plt = _plt()
    ok = [r for r in rows if not r["error"]]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    if ok:
        done = np.array([r["t_start"] + r["latency_ms"] / 1000 for r in ok])
        lat = np.array([r["latency_ms"] for r in ok])
        order = np.argsort(done)
        done, lat = done[order], lat[order]
        ax1.scatter(done, lat, s=4, alpha=0.4, label="query")
        window = max(1, len(lat) // 30)
        if len(lat) >= window * 2:
            ax1.plot(
                done[window - 1 :],
                [np.percentile(lat[i - window + 1 : i + 1], 95) for i in range(window - 1, len(lat))],
                color="C3",
                label=f"p95 of last {window}",
            )
    failed = [r for r in rows if r["error"]]
    if failed:
        ax1.scatter(
            [r["t_start"] + r["latency_ms"] / 1000 for r in failed],
            [r["latency_ms"] for r in failed],
            s=12,
            marker="x",
            color="k",
            label="failed",
        )
    ax1.set_ylabel("latency (ms)")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="upper left")
    if replicas:
        t = [s["t"] for s in replicas]
        for name in sorted({k for s in replicas for k in s["replicas"]}):
            ax2.step(t, [s["replicas"].get(name, 0) for s in replicas], where="post", label=name)
        ax2.legend(loc="upper left", fontsize=8)
    else:
        ax2.text(
            0.5,
            0.5,
            "replica counts unavailable (not connected to the Serve cluster)",
            ha="center",
            va="center",
            transform=ax2.transAxes,
        )
    ax2.set_ylabel("running replicas")
    ax2.set_xlabel("time since start (s)")
    ax2.grid(alpha=0.3)
    _save(fig, path)


def plot_bytes_accuracy(by_policy: dict, path: Path) -> None:
    """Mean uplink bytes per query vs accuracy, one point per policy, full resolution for reference."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    full = [
        s["bytes_per_query"]["full_resolution"] for s in by_policy.values() if s["bytes_per_query"]["full_resolution"]
    ]
    for name, s in by_policy.items():
        x, y = s["bytes_per_query"]["total"], s["accuracy"]
        if x is None or y is None:
            continue
        ax.scatter([x / 1024], [y], s=40)
        ax.annotate(
            f"{name} (refine {s['refine_rate']:.0%})",
            (x / 1024, y),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    if full:
        ax.axvline(np.mean(full) / 1024, color="grey", ls="--", label="full-resolution upload")
        ax.legend()
    ax.set_xlabel("uplink KiB per query")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs uplink bytes per policy")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_sweep(points: list[dict], path: Path) -> None:
    """The contention curve: throughput and p95 latency against the number of agents, per policy."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in sorted({p["policy"] for p in points}):
        pts = sorted((p for p in points if p["policy"] == policy), key=lambda p: p["agents"])
        n = [p["agents"] for p in pts]
        ax1.plot(n, [p["throughput_qps"] for p in pts], marker="o", label=policy)
        ax2.plot(n, [p["latency_ms"]["p95"] for p in pts], marker="o", label=policy)
    for ax, label in ((ax1, "throughput (qps)"), (ax2, "p95 end-to-end latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("edge agents")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("multi-client contention")
    _save(fig, path)


def write_json(data, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, default=float))


def windows(rows: list[dict], window_s: float = 10.0) -> list[dict]:
    """Per window of arrival time: queries, failed ones, p50/p95 latency, refine rate, mean gate
    threshold, accuracy and bytes per query (over the answered ones; None where none was)."""
    if not rows:
        return []
    out = []
    last = max(r["t_start"] for r in rows)
    for k in range(int(last // window_s) + 1):
        every = [r for r in rows if k * window_s <= r["t_start"] < (k + 1) * window_s]
        part = [r for r in every if not r["error"]]
        if not every:
            continue
        lat = _percentiles(r["latency_ms"] for r in part)
        server = _percentiles(r["server_ms"] for r in part)
        thresholds = [r["gate_threshold"] for r in part if r.get("gate_threshold") is not None]
        out.append(
            {
                "t": k * window_s,
                "queries": len(every),
                "failed": len(every) - len(part),
                "p50_ms": lat["p50"],
                "p95_ms": lat["p95"],
                "server_p50_ms": server["p50"],
                "server_p95_ms": server["p95"],
                "refine_rate": _mean(float(r["box"] is not None) for r in part) if part else None,
                "threshold": _mean(thresholds) if thresholds else None,
                "accuracy": _mean(r["correct"] for r in part),
                "bytes_per_query": _mean(r["global_bytes"] + r["local_bytes"] for r in part) if part else None,
            }
        )
    return out


def plot_policy_windows(by_policy: dict[str, list[dict]], path: Path, slo_ms: float | None = None) -> None:
    """One timeline per policy, stacked: server p95 (what the SLO is on), end-to-end p95 at the edge,
    refine rate, threshold."""
    plt = _plt()
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    for i, (policy, wins) in enumerate(sorted(by_policy.items())):
        t = [w["t"] for w in wins]
        axes[0].plot(t, [w["server_p95_ms"] for w in wins], marker=".", color=f"C{i}", label=policy)
        axes[1].plot(t, [w["p95_ms"] for w in wins], marker=".", color=f"C{i}", label=policy)
        axes[2].plot(t, [w["refine_rate"] for w in wins], marker=".", color=f"C{i}", label=policy)
        th = [(w["t"], w["threshold"]) for w in wins if w["threshold"] is not None]
        if th:
            axes[3].plot(*zip(*th), marker=".", color=f"C{i}", label=policy)
    if slo_ms:
        axes[0].axhline(slo_ms, color="k", ls="--", lw=1, label=f"SLO p95 {slo_ms:.0f} ms")
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    labels = ("server p95 (ms)", "end-to-end p95 at the edge (ms)", "refine rate", "gate threshold (bits)")
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[3].set_xlabel("arrival time since start (s), 10 s windows")
    _save(fig, path)


def step_table(
    rows_by_policy: dict[str, list[dict]],
    slo_ms: float,
    heavy: tuple[float, float],
    deadlines: dict[str, float] | None = None,
    window_s: float = 10.0,
) -> dict:
    """Per policy, over one load step: accuracy, refine rate and bytes of the whole run and of the
    light phases; the windows from the step on whose server p95 is within the SLO; the same over
    the windows where static `entropy` is not; and the queries that refined past their profile's
    deadline (`deadlines`: profile name -> ms)."""
    deadlines = deadlines or {}
    timelines = {p: windows(rows, window_s) for p, rows in rows_by_policy.items()}
    after = {p: {w["t"]: w for w in ws if w["t"] >= heavy[0]} for p, ws in timelines.items()}

    def over(w) -> bool:  # a window with a failed query, or none answered, is over the SLO
        return w["failed"] > 0 or w["server_p95_ms"] is None or w["server_p95_ms"] > slo_ms

    entropy_over = {t for t, w in after.get("entropy", {}).items() if over(w)}
    out = {}
    for policy, rows in rows_by_policy.items():
        ok = [r for r in rows if not r["error"]]
        light = [r for r in ok if not heavy[0] <= r["t_start"] < heavy[1]]
        wins = after[policy]
        within = [t for t, w in wins.items() if not over(w)]
        out[policy] = {
            **{k: group_summary(rows)[k] for k in ("queries", "failed", "accuracy", "refine_rate")},
            "bytes_per_query": _mean(r["global_bytes"] + r["local_bytes"] for r in ok),
            "light_accuracy": _mean(r["correct"] for r in light),
            "windows_from_step": len(wins),
            "windows_within_slo": len(within),
            "entropy_over_slo_windows": len(entropy_over),
            "within_slo_where_entropy_is_not": len(entropy_over & set(within)),
            "refined_past_deadline": sum(
                1
                for r in ok
                if r["box"] is not None and r["profile"] in deadlines and r["latency_ms"] > deadlines[r["profile"]]
            ),
        }
    return out


def main(argv=None) -> int:
    """Re-draw a policy sweep's windows from its runs' queries.csv (what `loadtest --sweep-agents N
    --sweep-policies ...` writes), e.g. after changing the window length."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m edge_agents.report", description=main.__doc__)
    p.add_argument("sweep_dir", type=Path, help="the sweep's --out directory (POLICY_N/queries.csv inside)")
    p.add_argument("--slo-ms", type=float, help="draw this p95 SLO")
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument(
        "--heavy", metavar="FROM:TO", help="the load step's heavy phase in seconds: also print the step table"
    )
    args = p.parse_args(argv)
    runs = sorted(args.sweep_dir.glob("*_*/queries.csv"))
    if not runs:
        p.error(f"no POLICY_N/queries.csv under {args.sweep_dir}")
    timelines, rows_by_policy = {}, {}
    for path in runs:
        rows = read_rows(path)
        policy = path.parent.name.rsplit("_", 1)[0]
        if policy in rows_by_policy:
            p.error(f"{args.sweep_dir} holds several runs of {policy}: give a directory with one agent count")
        rows_by_policy[policy] = rows
        timelines[policy] = windows(rows, args.window_s)
    write_json(timelines, args.sweep_dir / "windows_by_policy.json")
    plot_policy_windows(timelines, args.sweep_dir / "windows_by_policy.png", args.slo_ms)
    print(f"wrote {args.sweep_dir / 'windows_by_policy.json'} and .png")
    if args.heavy:
        if not args.slo_ms:
            p.error("--heavy needs --slo-ms")
        start, _, end = args.heavy.partition(":")
        try:
            heavy = (float(start), float(end))
        except ValueError:
            p.error(f"--heavy FROM:TO in seconds, got {args.heavy!r}")
        deadlines = {}
        for summary in args.sweep_dir.glob("*_*/summary.json"):
            for prof in json.loads(summary.read_text()).get("config", {}).get("profiles", []):
                if prof.get("deadline_ms"):
                    deadlines[prof["name"]] = prof["deadline_ms"]
        table = step_table(rows_by_policy, args.slo_ms, heavy, deadlines, args.window_s)
        write_json(table, args.sweep_dir / "step_table.json")
        cols = ("queries", "failed", "accuracy", "light_accuracy", "refine_rate", "bytes_per_query")
        print(
            f"{'policy':9s} "
            + " ".join(f"{c:>15s}" for c in cols)
            + "  within SLO from the step (where entropy is not)"
        )
        for policy, r in sorted(table.items()):
            vals = " ".join(f"{r[c]:15.3f}" if isinstance(r[c], float) else f"{r[c]!s:>15s}" for c in cols)
            print(
                f"{policy:9s} {vals}  {r['windows_within_slo']}/{r['windows_from_step']} "
                f"({r['within_slo_where_entropy_is_not']}/{r['entropy_over_slo_windows']})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
