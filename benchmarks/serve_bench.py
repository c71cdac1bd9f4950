"""Serve DAG vs in-process pipeline, and encoder batching, measured in one run on this machine.

    python -m benchmarks.serve_bench [--config configs/default.yaml] [--requests 40] [--clients 8]

Prints (and writes to --out as JSON):
- p50 latency at 1 client, DAG over HTTP vs the in-process reference pipeline (same queries,
  edge work included in both), and their ratio (target <= 1.3x);
- saturated throughput, DAG with --clients concurrent edges vs the pipeline with as many threads
  as cores (target >= 0.8x);
- VisionEncoder batched vs unbatched throughput with 16 concurrent callers (target >= 2x);
- the decoders batched (`decoder_batch` as configured) vs unbatched (max_batch_size 1), 16
  concurrent edges, same CPUs: saturated throughput and p50/p95 latency;
- the attention stage in process: the question's map from a separate pass vs captured in the
  first pass's prefill (then only the generic prompt's pass runs);
- per-hop overhead: DAG latency minus the in-process pipeline's latency (which includes every
  stage's compute and the edge's work) for the same query, divided by the Serve calls it makes
  (a one-stage query 2, a two-stage one 9: see CALLS);
- the same 16 callers against a deployment that does nothing: the ceiling that Serve's own
  per-request cost puts on any stage here, and the tower's in-process speed-up from 8 images per
  pass over 1 (the most dynamic batching can buy): what the encoder figures should be read against.
Starts its own local Ray + Serve on loopback (2 CPUs) unless --url points at a running app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from collab.config import POLICIES
from collab.paths import DEFAULT_CONFIG, REPO_ROOT

# Serve calls a query makes beyond the HTTP request itself. Stage 1: encoder, first pass.
# Stage 2 adds RoI search and session create (query), then encoder, session open, session
# features, refined decoder and session complete (refine).
CALLS = {1: 2, 2: 9}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def queries(n, seed=9090):
    from collab.data.synthetic import generate_items

    return [(it.image, it.question, it.question_id) for it in generate_items(seed, n)]


def timed(fn, items):
    lat = []
    for image, q, qid in items:
        t = time.perf_counter()
        fn(image, q, qid)
        lat.append((time.perf_counter() - t) * 1000)
    return lat


def throughput(fn, items, workers):
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda x: fn(*x), items))
    return len(items) / (time.perf_counter() - start)


async def encoder_throughput(handle, method: str, payload: bytes, callers: int, per_caller: int) -> float:
    async def caller():
        for _ in range(per_caller):
            await getattr(handle, method).remote(payload)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return callers * per_caller / (time.perf_counter() - start)


def noop_app():
    """A deployment that does nothing: the ceiling Serve's own per-request cost puts on any stage."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
    class Echo:
        async def echo(self, payload: bytes) -> int:
            return len(payload)

    return Echo.bind()


def app_with(args, decoder_batch: dict | None = None):
    """The app as serve_config.yaml sizes it, on --config/--model, optionally other decoder batching."""
    from deployments.app import compose
    from deployments.args import AppArgs

    extra = {"decoder_batch": decoder_batch} if decoder_batch else {}
    return compose(AppArgs(config=args.config, model_path=args.model, **extra))


def saturated(url: str, items, edges: int, policy: str) -> tuple[float, list[float]]:
    """Queries per second and per-query latencies (ms) with `edges` concurrent edges."""
    from edge_agents.client import EdgeClient

    clients = [EdgeClient(url, client_id=f"bench-{i}") for i in range(edges)]
    jobs = [(x, clients[i % edges]) for i, x in enumerate(items)]

    def one(job):
        (image, q, qid), client = job
        t = time.perf_counter()
        client.ask(image, q, policy=policy, question_id=qid)
        return (time.perf_counter() - t) * 1000

    start = time.perf_counter()
    with ThreadPoolExecutor(edges) as pool:
        latencies = list(pool.map(one, jobs))
    qps = len(jobs) / (time.perf_counter() - start)
    for c in clients:
        c.close()
    return qps, latencies


def attention_stage_ms(backend, config, items) -> dict:
    """Median in-process time of the attention stage: the question map from its own pass, or
    captured in the first pass's prefill (only the generic prompt's pass left)."""
    from collab import stages
    from collab.imaging import global_payload, load_image
    from collab.policies import PolicySpec

    cfg, spec = config.attention, PolicySpec(name="always")
    im = config.imaging
    separate, captured = [], []
    for image, q, qid in items[:20]:
        original = load_image(image)
        size = backend.info.global_size(original.size)
        payload = global_payload(original, size, im.global_mode, im.format, im.jpeg_quality, im.pad_color)
        features = backend.encode_images([load_image(payload.data)])[0]
        first = stages.first_pass(backend, features, q, spec, qid, stages.capture_layers(cfg, [cfg.layer]))
        gen = first.generation
        answer = gen.token_ids[: gen.n_answer_tokens]
        for sink, maps in ((separate, None), (captured, gen.attention)):
            t = time.perf_counter()
            stages.attention_map(backend, features, q, answer, cfg, maps)
            sink.append((time.perf_counter() - t) * 1000)
    return {"separate_question_pass": statistics.median(separate), "captured_in_prefill": statistics.median(captured)}


def tower_batching_ceiling(backend, payload: bytes, batch: int = 8, rounds: int = 20) -> float:
    """In-process images/s of the vision tower, `batch` per pass vs one per pass: the most that
    dynamic batching can buy for this model on this machine (no Serve involved)."""
    from benchmarks.tower import tower_rates
    from collab.imaging import decode_image

    one, many = tower_rates(backend, [decode_image(payload)] * batch, batch, rounds, best_of=3)
    return many / one


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument(
        "--model",
        default=None,
        help="override model.path (a local directory), e.g. a heavier random model from "
        "`python -m collab.models.tiny`, to see how the ratios move with the cost of a query",
    )
    p.add_argument("--policy", default="entropy", choices=POLICIES)
    p.add_argument("--requests", type=int, default=40, help="queries per measurement")
    p.add_argument("--clients", type=int, default=8, help="concurrent edges for the saturated DAG run")
    p.add_argument("--out", default="runs/serve_bench.json")
    p.add_argument(
        "--throughput-optimized",
        action="store_true",
        help="set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray >= 2.56: user code on the replica's main loop, "
        "router in the caller's loop, gRPC between replicas) for the cluster this run starts",
    )
    args = p.parse_args(argv)
    if args.model:  # replicas may run in another working directory
        if not Path(args.model).is_dir():
            p.error(f"--model {args.model}: no such directory")
        args.model = str(Path(args.model).resolve())
    if args.throughput_optimized:  # before Ray is imported: read at import by every Serve process of this cluster
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"

    import ray
    from ray import serve

    from collab.backends import load_backend
    from collab.config import load_config
    from collab.pipeline import ReferencePipeline
    from edge_agents.client import EdgeClient, global_upload

    config = load_config(args.config, {"model": {"path": args.model}} if args.model else None)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8011})
    serve.run(app_with(args), name="bench", route_prefix="/")
    url = "http://127.0.0.1:8011"
    items = queries(args.requests)

    backend = load_backend(config.model, search_roots=[REPO_ROOT])
    pipeline = ReferencePipeline(backend, config)
    spec = pipeline.policy(name=args.policy)
    client = EdgeClient(url, client_id="bench")

    def via_dag(image, q, qid):
        return client.ask(image, q, policy=args.policy, question_id=qid)

    def in_process(image, q, qid):
        return pipeline.run(image, q, question_id=qid, policy=spec)

    timed(via_dag, items[:5]), timed(in_process, items[:5])  # warm-up
    dag_lat, ref_lat = timed(via_dag, items), timed(in_process, items)
    stages_of = [via_dag(*x).stage for x in items]
    overhead = statistics.median((d - r) / CALLS[s] for d, r, s in zip(dag_lat, ref_lat, stages_of))

    dag_tput, _ = saturated(url, items * 2, args.clients, args.policy)
    ref_tput = throughput(in_process, items * 2, os.cpu_count() or 2)
    attention_ms = attention_stage_ms(backend, config, items)

    batching = {}  # the decoders batched as configured, then the same app with batches of one
    for name, decoder_batch in (("batched", None), ("unbatched", {"max_batch_size": 1, "batch_wait_timeout_s": 0})):
        if decoder_batch:
            serve.run(app_with(args, decoder_batch), name="bench", route_prefix="/")
        timed(via_dag, items[:3])  # warm-up after a redeploy
        qps, lat = saturated(url, items * 2, 16, args.policy)
        batching[name] = {"qps": qps, "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95)}

    serve.run(noop_app(), name="noop", route_prefix="/noop")
    noop = serve.get_deployment_handle("Echo", app_name="noop")
    handle = serve.get_deployment_handle("VisionEncoder", app_name="bench")
    payload = global_upload(items[0][0], client.models(), client.imaging).data

    async def encoder_runs():  # one event loop: with RAY_SERVE_THROUGHPUT_OPTIMIZED the router lives in it
        await encoder_throughput(handle, "encode", payload, 4, 2)  # warm-up
        await encoder_throughput(noop, "echo", payload, 4, 2)
        return (
            await encoder_throughput(handle, "encode", payload, 16, 8),
            await encoder_throughput(handle, "encode_unbatched", payload, 16, 8),
            await encoder_throughput(noop, "echo", payload, 16, 8),
        )

    loop = asyncio.new_event_loop()  # left open: Serve's router shuts down on it at exit
    batched, unbatched, echo = loop.run_until_complete(encoder_runs())

    report = {
        "machine": f"{os.cpu_count()} CPUs",
        "config": args.config,
        "model": config.model.path,
        "policy": args.policy,
        "throughput_optimized": args.throughput_optimized,
        "p50_latency_ms": {"dag": percentile(dag_lat, 50), "in_process": percentile(ref_lat, 50)},
        "p50_latency_ratio": percentile(dag_lat, 50) / percentile(ref_lat, 50),
        "throughput_qps": {"dag": dag_tput, "in_process": ref_tput, "dag_clients": args.clients},
        "throughput_ratio": dag_tput / ref_tput,
        "decoders_16_edges": batching,
        "decoder_batching_speedup": batching["batched"]["qps"] / batching["unbatched"]["qps"],
        "attention_stage_ms_in_process": attention_ms,
        "encoder_qps_16_callers": {"batched": batched, "unbatched": unbatched},
        "encoder_batching_speedup": batched / unbatched,
        "noop_deployment_qps_16_callers": echo,  # Serve's per-request ceiling on this machine
        "tower_batch8_speedup_in_process": tower_batching_ceiling(backend, payload),  # batching's own ceiling
        "per_hop_overhead_ms": overhead,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
