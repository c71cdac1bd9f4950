"""The main job in one command: start the Serve app, send a few edge queries, print what happened.

    python -m edge_agents.demo                  # `serve run serve_config.yaml`, 8 synthetic queries
    python -m edge_agents.demo --url http://127.0.0.1:8000   # against an app that is already running

Each line shows the question, the answer and its stage, the gate's score, the RoI box, and the
bytes each upload cost against sending the full-resolution original.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from collab.paths import REPO_ROOT as REPO



def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"`serve run` exited with code {proc.returncode}; see its log above")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the app did not answer at {url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_agents.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-config", default=str(REPO / "serve_config.yaml"), help="config for `serve run` (default: %(default)s)")
    p.add_argument("--url", help="use an already running app instead of starting one")
    p.add_argument("--n", type=int, default=8, help="queries to send (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2024, help="synthetic benchmark seed (default: %(default)s)")
    p.add_argument("--policy", default="entropy", choices=["never", "always", "random", "entropy"])
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the app to start")
    args = p.parse_args(argv)

    from collab.data.synthetic import generate_items
    from collab.imaging import encode_image
    from edge_agents.client import EdgeClient

    proc = None
    url = args.url or "http://127.0.0.1:8000"
    if not args.url:
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "HF_HUB_OFFLINE": "1"}
        print(f"starting: serve run {args.serve_config}", flush=True)
        serve_cli = Path(sys.executable).with_name("serve")  # the venv's CLI, even when it is not on PATH
        proc = subprocess.Popen([str(serve_cli) if serve_cli.exists() else "serve", "run", args.serve_config], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(url, proc, args.timeout)
        client = EdgeClient(url, client_id="demo-edge")
        info = client.models()
        print(f"model {info['model']} encoder {info['encoder_size']} policy {args.policy}\n")
        correct = total_bytes = full_bytes = 0
        for item in generate_items(args.seed, args.n):
            r = client.ask(item.image, item.question, policy=args.policy, question_id=item.question_id)
            full = encode_image(item.image, "jpeg", 90).nbytes
            ok = r.answer == item.answer
            correct += ok
            total_bytes += r.global_bytes + r.local_bytes
            full_bytes += full
            print(f"{item.question:40s} -> {r.answer:8s} ({'right' if ok else 'wrong, ' + item.answer:9s}) stage {r.stage} "
                  f"score {r.score:.2f} box {r.box} bytes {r.global_bytes}+{r.local_bytes} (full-res {full})")
        print(f"\n{correct}/{args.n} correct; uplink {total_bytes / args.n / 1024:.1f} KiB/query "
              f"vs {full_bytes / args.n / 1024:.1f} KiB for full-resolution originals")
        client.close()
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)  # `serve run` stops its cluster on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
