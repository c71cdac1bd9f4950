"""The app on a local multi-node Ray cluster: placement, answers across nodes, nodes lost under load.

    python -m benchmarks.cluster [--config configs/default.yaml] [--agents 8] [--duration 40] [--out DIR]

Starts a head and five worker nodes on this machine (`ray.cluster_utils.Cluster`, loopback), each
with the resources its role has on a real cluster: two accelerator nodes (3 fake GPUs each; the
model runs on the CPU), two CPU nodes (`cpu_side`), one edge node (`edge`). Deploys
configs/serve_cluster.yaml (configs/serve_gpu.yaml's placement) and reports, as JSON and a table:

1. placement: the node role of every replica;
2. answers through every node's HTTP proxy, each query's refine through another node's proxy (the
   gateways share one session store), and the DAG against the in-process pipeline (stage, answers,
   score, box, bytes) for every policy;
3. a load of edge agents (Ray actors on the edge node only) during which one accelerator node and
   then the CPU node that holds the session store are killed: every query must be answered (the
   agents retry 5xx and connection errors; retries counted); sessions held by the lost store are
   gone, so their refines get 404/410 and the edge keeps its first answer (`session_expired`);
   replicas come back on the nodes left, and the time they took;
4. what crosses the network per query: the pickled size of one image's visual tokens, and how many
   times a one- and a two-stage query move them between deployments.

Exits 1 when a check fails. Each worker node's proxy listens on its own port
(RAY_SERVE_WORKER_PROXY_HTTP_PORT in that node's environment): on one machine they cannot share one.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import threading
import time
from pathlib import Path

from collab.paths import DEFAULT_CONFIG, REPO_ROOT

SERVE_CLUSTER = REPO_ROOT / "configs" / "serve_cluster.yaml"
APP = "collab"
# role -> node resources (besides num_cpus); what a node of that role offers on a real cluster
NODES = {
    "accelerator-a": {"num_gpus": 3},
    "accelerator-b": {"num_gpus": 3},
    "cpu-a": {"resources": {"cpu_side": 1}},
    "cpu-b": {"resources": {"cpu_side": 1}},
    "edge": {"resources": {"edge": 1}},
}
ACCELERATOR_STAGES = ("VisionEncoder", "FirstPassDecoder", "RefinedDecoder")
CPU_STAGES = ("Gateway", "RoISearch", "SessionStore")
# Visual-token moves between deployments: a one-stage query, encoder -> first pass; a two-stage one
# also encoder -> session store (global tokens kept for the refine), store -> refined decoder, and
# the crop's tokens encoder -> refined decoder.
TOKEN_MOVES = {1: 1, 2: 4}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class LocalCluster:
    """A head and the NODES on this machine; each worker's proxy on a port of its own."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        self.head_port = free_port()
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        self.nodes, self.ports = {}, {"head": self.head_port}
        for role, resources in NODES.items():
            port = free_port()
            self.nodes[role] = self.cluster.add_node(
                num_cpus=2, env_vars={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(port)}, **resources
            )
            self.ports[role] = port
        self.cluster.wait_for_nodes()

    def role_of(self, node_id: str) -> str:
        if node_id == self.cluster.head_node.node_id:
            return "head"
        return next((r for r, n in self.nodes.items() if n.node_id == node_id), "unknown")

    def replace(self, role: str, like: str) -> None:
        """A new node of role `like` joins (what a cluster autoscaler does for a lost machine)."""
        port = free_port()
        self.nodes[role] = self.cluster.add_node(
            num_cpus=2, env_vars={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(port)}, **NODES[like]
        )
        self.ports[role] = port

    def kill(self, role: str) -> None:
        """The node's processes die at once, as when a machine is lost (no draining)."""
        self.cluster.remove_node(self.nodes.pop(role), allow_graceful=False)

    def shutdown(self) -> None:
        self.cluster.shutdown()


def placement(cluster: LocalCluster) -> dict[str, list[str]]:
    """Deployment (or agent host) -> roles of the nodes its live actors run on."""
    from ray._private import state

    out: dict[str, list[str]] = {}
    for info in state.actors(actor_state_name="ALIVE").values():
        name = info.get("Name") or ""
        if name.startswith("SERVE_REPLICA::"):
            key = name.split("#")[1]
        elif info.get("ActorClassName") in ("AgentHost", "SharedChannel"):
            key = info["ActorClassName"]
        else:
            continue
        out.setdefault(key, []).append(cluster.role_of(info["Address"]["NodeID"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate, timeout: float, interval: float = 1.0) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `timeout`."""
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return time.time() - start
        time.sleep(interval)
    return None


def running(deployments=ACCELERATOR_STAGES + CPU_STAGES) -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items() if name in deployments}


def targets() -> dict[str, int]:
    """Replicas each deployment starts with in serve_cluster.yaml."""
    from deployments.app import deployment_options

    out = {}
    for name, opts in deployment_options(SERVE_CLUSTER).items():
        out[name] = opts.get("num_replicas") or opts["autoscaling_config"]["min_replicas"]
    return out


def cross_proxy(urls: list[str], image, question: str) -> list[dict]:
    """A query through each proxy with policy always, its refine through the next proxy."""
    import httpx

    from edge_agents.client import MIME, EdgeImaging, global_upload, local_upload

    imaging = EdgeImaging()
    info = httpx.get(f"{urls[0]}/v1/models", timeout=30).json()
    out = []
    for i, url in enumerate(urls):
        other = urls[(i + 1) % len(urls)]
        payload = global_upload(image, info, imaging)
        fields = {"question": question, "policy": "always", "original_width": str(image.width)}
        fields["original_height"] = str(image.height)
        first = httpx.post(
            f"{url}/v1/query",
            data=fields,
            files={"image": ("g." + payload.format, payload.data, MIME[payload.format])},
            timeout=60,
        )
        row = {"query_via": url, "refine_via": other, "query_status": first.status_code}
        if first.status_code == 200 and first.json().get("status") == "need_roi":
            body = first.json()
            local = local_upload(image, body["box"], body["local_size"], imaging)
            second = httpx.post(
                f"{other}/v1/refine",
                data={"session_id": body["session_id"]},
                files={"image": ("l." + local.format, local.data, MIME[local.format])},
                timeout=60,
            )
            row["refine_status"] = second.status_code
            row["answer"] = second.json().get("answer") if second.status_code == 200 else None
        out.append(row)
    return out


def dag_mismatches(url: str, config_path: str, n: int = 4) -> tuple[int, int]:
    """(mismatches, comparisons) of the app over HTTP against the in-process pipeline."""
    from collab.backends import load_backend
    from collab.config import load_config
    from collab.data.synthetic import generate_items
    from collab.pipeline import ReferencePipeline
    from edge_agents.client import EdgeClient

    config = load_config(config_path)
    pipeline = ReferencePipeline(load_backend(config.model), config)
    batch = list(generate_items(405, n))
    scores = sorted(
        pipeline.run(
            it.image, it.question, question_id=it.question_id, policy=pipeline.policy(name="never")
        ).uncertainty
        for it in batch
    )
    threshold = scores[len(scores) // 2]
    bad = total = 0
    with EdgeClient(url, client_id="cluster-check") as client:
        for policy in ("always", "entropy", "random"):
            spec = pipeline.policy(name=policy, threshold=threshold)
            for it in batch:
                ref = pipeline.run(it.image, it.question, question_id=it.question_id, policy=spec)
                got = client.ask(it.image, it.question, policy=policy, threshold=threshold, question_id=it.question_id)
                same = (
                    got.stage == ref.stage
                    and got.answer == ref.answer
                    and got.first_answer == ref.first_answer
                    and abs((got.score or 0.0) - (ref.uncertainty or 0.0)) < 1e-5
                    and got.box == ref.box
                    and (got.global_bytes, got.local_bytes) == (ref.global_bytes, ref.local_bytes)
                )
                bad += not same
                total += 1
    return bad, total


def token_bytes(config_path: str) -> dict:
    """Pickled size of one image's visual tokens (what a DeploymentResponse carries between nodes)."""
    from PIL import Image

    from collab.backends import load_backend
    from collab.config import load_config

    backend = load_backend(load_config(config_path).model)
    size = tuple(backend.info.encoder_size)
    features = backend.encode_images([Image.new("RGB", size, (128, 128, 128))])[0]
    nbytes = len(pickle.dumps(features.cpu(), protocol=5))
    return {
        "shape": list(features.shape),
        "dtype": str(features.dtype).replace("torch.", ""),
        "bytes_per_image": nbytes,
        "moves": TOKEN_MOVES,
        "bytes_per_query": {stage: moves * nbytes for stage, moves in TOKEN_MOVES.items()},
    }


def load_with_kills(cluster: LocalCluster, url: str, args) -> dict:
    """Edge agents on the edge node under load; an accelerator node, then the store's node, killed."""
    from edge_agents.config import load_loadtest_config
    from edge_agents.loadtest import run_load

    cfg = load_loadtest_config(
        None,
        {
            "url": url,
            "agents": args.agents,
            "agents_per_actor": max(1, args.agents // 2),
            "policy": "always",  # every query makes a session: the store's loss is visible
            "actor_resources": {"edge": 0.01},
            "workload.mode": "closed",
            "workload.think_time_s": 0.5,
            "workload.duration_s": args.duration,
            "workload.ramp_up_s": 2.0,
            "workload.drain_s": 120.0,
            "source.synthetic": "2024:64",
            "retry.max_attempts": 12,
            "retry.backoff_max_s": 4.0,
        },
    )
    want = targets()
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(run_load(cfg, progress=False)), daemon=True)
    start = time.time()
    worker.start()
    events = []

    def at(fraction: float) -> None:
        time.sleep(max(0.0, start + fraction * args.duration - time.time()))

    at(0.25)
    agents_on = placement(cluster)
    log("killing accelerator-b under load")
    cluster.kill("accelerator-b")
    killed = time.time()

    def restored(stages) -> bool:  # at target on live nodes only: a replica of the lost node is "unknown"
        where = placement(cluster)
        return all(
            running(stages).get(d, 0) >= want[d] and len(where.get(d, [])) >= want[d] and "unknown" not in where[d]
            for d in stages
        )

    # Ray declares a node dead after missed health checks (its defaults: tens of seconds here), then
    # Serve replaces the replicas; the second loss waits for the first to be repaired
    back = wait_until(lambda: restored(ACCELERATOR_STAGES), timeout=90, interval=0.5)
    events.append(
        {"t_s": round(killed - start, 1), "killed": "accelerator-b", "back_s": None if back is None else round(back, 1)}
    )
    at(0.55)
    store_role = placement(cluster).get("SessionStore", ["?"])[0]
    if store_role in ("cpu-a", "cpu-b"):
        log(f"killing {store_role} (the session store's node) under load")
        cluster.kill(store_role)
        killed = time.time()
        back = wait_until(lambda: restored(("SessionStore",)), timeout=90, interval=0.5)
        events.append(
            {
                "t_s": round(killed - start, 1),
                "killed": store_role,
                "held": "SessionStore",
                "back_s": None if back is None else round(back, 1),
            }
        )
    worker.join(timeout=args.duration + 300)
    rows = result.get("rows", [])
    return {
        "events": events,
        "agents_on": {k: v for k, v in agents_on.items() if k in ("AgentHost", "SharedChannel")},
        "queries": len(rows),
        "answered": sum(r["answer"] is not None and not r.get("error") for r in rows),
        "failed": len(result.get("failures", [])) + sum(bool(r.get("error")) for r in rows),
        "unfinished": result.get("unfinished"),
        "retries": sum(r["retries"] for r in rows),
        "retried_queries": sum(r["retries"] > 0 for r in rows),
        "refined": sum(r["stage"] == 2 for r in rows),
        "session_expired": sum(bool(r["session_expired"]) for r in rows),
        "expired_kept_first_answer": all(
            r["answer"] == r["first_answer"] for r in rows if r["session_expired"] and r["answer"] is not None
        ),
        "wall_s": result.get("wall_s"),
    }


def run(args) -> dict:
    import ray
    from ray import serve

    from deployments.app import compose, deployment_options  # noqa: F401  (fails early if the app does not import)
    from deployments.args import AppArgs

    report: dict = {"config": str(args.config), "serve_config": str(SERVE_CLUSTER.relative_to(REPO_ROOT))}
    log(f"starting the head and {len(NODES)} worker nodes")
    t0 = time.time()
    cluster = LocalCluster()
    try:
        ray.init(address=cluster.cluster.address, logging_level="ERROR", log_to_driver=False)
        serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": cluster.head_port})
        import yaml

        app_args = yaml.safe_load(SERVE_CLUSTER.read_text())["applications"][0]["args"]
        app_args["config"] = str(args.config)
        serve.run(compose(AppArgs.model_validate(app_args), serve_config=SERVE_CLUSTER), name=APP, route_prefix="/")
        want = targets()
        ready = wait_until(lambda: running() == want, timeout=300)
        urls = {role: f"http://127.0.0.1:{port}" for role, port in cluster.ports.items()}
        wait_until(lambda: all(healthy(urls[r]) for r in ("head", "cpu-a", "cpu-b")), timeout=60)
        proxies = [r for r in ("head", "cpu-a", "cpu-b", "accelerator-a", "accelerator-b") if healthy(urls[r])]
        report["startup_s"] = round(time.time() - t0, 1)
        report["replicas_ready_s"] = None if ready is None else round(ready, 1)
        report["placement"] = placement(cluster)
        report["proxies"] = proxies
        log(f"placement {report['placement']}; proxies on {proxies}")

        from collab.data.synthetic import generate_items

        item = next(iter(generate_items(406, 1)))
        report["cross_proxy"] = cross_proxy([urls[r] for r in proxies], item.image, item.question)
        bad, total = dag_mismatches(urls["cpu-a"] if "cpu-a" in proxies else urls["head"], str(args.config))
        report["dag_vs_pipeline"] = {"mismatches": bad, "compared": total}
        report["visual_tokens"] = token_bytes(str(args.config))
        log("load with node kills")
        report["load"] = load_with_kills(cluster, urls["head"], args)
        lost_cpu = [e["killed"] for e in report["load"]["events"] if e["killed"].startswith("cpu")]
        if lost_cpu:  # one Gateway per CPU node: the lost node's waits for a replacement machine
            log(f"a replacement for {lost_cpu[0]} joins")
            cluster.replace("cpu-c", like=lost_cpu[0])
        back = wait_until(lambda: running() == want, timeout=180)
        report["replicas_back_s"] = None if back is None else round(back, 1)
        report["placement_after"] = placement(cluster)
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.shutdown()
    report["checks"] = checks(report)
    return report


def checks(r: dict) -> dict[str, bool]:
    """What must hold (docs/cluster.md)."""
    place, after, load = r["placement"], r.get("placement_after", {}), r.get("load", {})
    accel = {"accelerator-a", "accelerator-b"}
    return {
        "accelerator stages only on accelerator nodes": all(
            set(place.get(d, [])) <= accel and place.get(d) for d in ACCELERATOR_STAGES
        ),
        "accelerator stages on both accelerator nodes": all(set(place.get(d, [])) == accel for d in ACCELERATOR_STAGES),
        "CPU stages only on CPU nodes": all(set(place.get(d, [])) <= {"cpu-a", "cpu-b"} for d in CPU_STAGES),
        "gateways on two nodes": len(set(place.get("Gateway", []))) == 2,
        "agents only on the edge node": set(sum(load.get("agents_on", {}).values(), [])) == {"edge"},
        "queries and refines through different proxies": len(r["cross_proxy"]) >= 3
        and all(c["query_status"] == 200 and c.get("refine_status") == 200 for c in r["cross_proxy"]),
        "DAG == pipeline across nodes": r["dag_vs_pipeline"]["mismatches"] == 0,
        "no query lost": load.get("queries", 0) > 0 and load.get("failed") == 0 and not load.get("unfinished"),
        "an accelerator node and the store's node were lost": len(load.get("events", [])) == 2,
        "their replicas restarted during the load": all(e["back_s"] is not None for e in load.get("events", [])),
        "lost sessions keep the first answer": load.get("expired_kept_first_answer", False),
        "replicas back on the nodes left": r.get("replicas_back_s") is not None
        and "accelerator-b" not in sum(after.values(), [])
        and all(after.get(d) for d in ACCELERATOR_STAGES + CPU_STAGES),
    }


def table(r: dict) -> str:
    load, tokens = r.get("load", {}), r["visual_tokens"]
    lines = [
        f"cluster: head + {len(NODES)} workers, started and deployed in {r['startup_s']} s",
        "placement: " + "; ".join(f"{d} {','.join(v)}" for d, v in r["placement"].items()),
        f"proxies answering: {', '.join(r['proxies'])}",
        f"DAG vs pipeline: {r['dag_vs_pipeline']['mismatches']} mismatches of {r['dag_vs_pipeline']['compared']}",
        "visual tokens per image: {:,} B {} {}; per query, 1 stage {:,} B, 2 stages {:,} B".format(
            tokens["bytes_per_image"], tokens["shape"], tokens["dtype"], *tokens["bytes_per_query"].values()
        ),
        "load: {queries} queries, {answered} answered, {failed} failed, {retries} retries ({retried_queries} queries), "
        "{refined} refined, {session_expired} sessions lost (first answer kept)".format(**load),
        "killed: "
        + ", ".join(
            f"{e['killed']} at {e['t_s']} s (replicas back in {e['back_s']} s)" for e in load.get("events", [])
        ),
        f"replicas back {r.get('replicas_back_s')} s after the load; after: "
        + "; ".join(f"{d} {','.join(v)}" for d, v in r.get("placement_after", {}).items()),
    ]
    lines += [f"  [{'ok' if ok else 'FAIL'}] {name}" for name, ok in r["checks"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.cluster",
        description=__doc__.split("\n\n")[0].rstrip(".")
        + ". Starts a local multi-node Ray cluster (loopback), deploys configs/serve_cluster.yaml, checks placement "
        "and cross-node answers, then kills an accelerator node and the session store's node under an edge load.",
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="collab config the app serves (%(default)s)")
    p.add_argument("--agents", type=int, default=8, help="edge agents during the node kills (%(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (%(default)s)")
    p.add_argument("--out", type=Path, help="write report.json here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.agents < 1 or args.duration < 8:
        print("error: need --agents >= 1 and --duration >= 8", file=sys.stderr)
        return 2
    report = run(args)
    print(table(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
