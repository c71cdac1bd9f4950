"""The main job in one command: start the Serve app, send a few edge queries, then a short load.

    python -m edge_agents.demo                  # `serve run serve_config.yaml`, 8 queries, 4 agents x 20 s
    python -m edge_agents.demo --url http://127.0.0.1:8000   # against an app that is already running

First each query is shown: the question, the answer and its stage, the gate's score, the RoI box,
and the bytes each upload cost against sending the full-resolution original; a picture of them
is written to runs/demo/queries.png (each query's image with the requested box, the global
image and the crop as sent, both answers). Then a handful of edge agents (Ray actors,
configs/loadtest/default.yaml's device mix) load the app and the load-test summary is printed
(files and plots in runs/demo/load/).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from collab.config import POLICIES
from collab.paths import REPO_ROOT as REPO


def show_queries(url: str, n: int, seed: int, policy: str, out: Path) -> Path:
    """Ask n synthetic queries one by one, print each, and draw them (returns the picture's path)."""
    from collab.data.synthetic import generate_items
    from collab.imaging import full_resolution_bytes
    from edge_agents.client import EdgeClient
    from edge_agents.pictures import QueryView, queries_sheet

    client = EdgeClient(url, client_id="demo-edge")
    info = client.models()
    print(f"model {info['model']} encoder {info['encoder_size']} policy {policy}\n")
    correct = total_bytes = full_bytes = 0
    views = []
    for item in generate_items(seed, n):
        r = client.ask(item.image, item.question, policy=policy, question_id=item.question_id)
        full = full_resolution_bytes(item.image, "jpeg", 90)
        ok = r.answer == item.answer
        correct += ok
        total_bytes += r.global_bytes + r.local_bytes
        full_bytes += full
        views.append(QueryView(item.image, item.question, r, item.answer))
        print(
            f"{item.question:40s} -> {r.answer:8s} ({'right' if ok else 'wrong, ' + item.answer:9s}) stage {r.stage} "
            f"score {r.score:.2f} box {r.box} bytes {r.global_bytes}+{r.local_bytes} (full-res {full})"
        )
    print(
        f"\n{correct}/{n} correct; uplink {total_bytes / n / 1024:.1f} KiB/query "
        f"vs {full_bytes / n / 1024:.1f} KiB for full-resolution originals"
    )
    picture = queries_sheet(views, info, client.imaging, out / "queries.png")
    client.close()
    print(f"picture of these queries: {picture}")
    return picture


def short_load(url: str, agents: int, duration: float, policy: str, out: Path) -> int:
    from edge_agents import report
    from edge_agents.config import load_loadtest_config
    from edge_agents.loadtest import connect_ray, run_load, write_outputs

    config = load_loadtest_config(
        REPO / "configs/loadtest/default.yaml",
        {"url": url, "agents": agents, "policy": policy, "workload.duration_s": duration, "workload.ramp_up_s": 2},
    )
    print(f"\nload: {agents} edge agents for {duration:.0f} s (configs/loadtest/default.yaml device mix)", flush=True)
    import ray

    connect_ray(None)
    try:
        result = run_load(config)
    finally:
        ray.shutdown()  # leave the cluster before `serve run` is stopped
    summary = write_outputs(result, config, out)
    print("\n" + report.table(summary))
    plots = sorted(str(p) for p in out.glob("*.png"))
    print(
        f"\nfiles in {out}/"
        + (f"; plots: {', '.join(plots)}" if plots else "")
        + "; a longer load: collab-vlm loadtest --help"
    )
    return 1 if summary["failed"] or summary["unfinished"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="collab-vlm demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--serve-config", default=str(REPO / "serve_config.yaml"), help="config for `serve run` (default: %(default)s)"
    )
    p.add_argument("--url", help="use an already running app instead of starting one")
    p.add_argument("--n", type=int, default=8, help="queries to show one by one (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2024, help="synthetic benchmark seed (default: %(default)s)")
    p.add_argument("--policy", default="entropy", choices=POLICIES)
    p.add_argument(
        "--agents", type=int, default=4, help="edge agents in the short load, 0 to skip it (default: %(default)s)"
    )
    p.add_argument("--duration", type=float, default=20, help="seconds of load (default: %(default)s)")
    p.add_argument(
        "--out", default=str(REPO / "runs/demo"), help="output directory: queries.png, load/ (default: %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the app to start")
    args = p.parse_args(argv)

    from edge_agents.app_process import serve_app, wait_ready

    url = args.url or "http://127.0.0.1:8000"
    if args.url:
        wait_ready(url, None, args.timeout)
    with serve_app(args.serve_config, url, args.timeout) if not args.url else nullcontext():
        out = Path(args.out)
        show_queries(url, args.n, args.seed, args.policy, out)
        return short_load(url, args.agents, args.duration, args.policy, out / "load") if args.agents else 0


if __name__ == "__main__":
    sys.exit(main())
