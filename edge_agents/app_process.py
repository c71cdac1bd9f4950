"""Start `serve run serve_config.yaml` as a child process and wait until it answers (demo, load test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from collab.paths import REPO_ROOT

DEFAULT_SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """Return once GET /v1/models answers 200; a clear error if the app died or never answered."""
    end = time.time() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"`serve run` exited with code {proc.returncode}; see its log above")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() >= end:
            hint = "" if proc is not None else "; start it with `serve run serve_config.yaml` (or pass --start-app)"
            raise TimeoutError(f"no collab app answered at {url} within {timeout:.0f} s{hint}")
        time.sleep(1)


def port_in_use(url: str) -> bool:
    """Whether something accepts connections at the URL's host and port."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_port_free(url: str, timeout: float) -> None:
    """Wait for the port to be free before starting an app on it. An app still shutting down (the
    previous `--start-app` run's Ray cluster) would otherwise pass the readiness check and then
    vanish under the load, its successor answering 404 until its routes are up."""
    end = time.time() + timeout
    while port_in_use(url):
        if time.time() >= end:
            raise RuntimeError(
                f"something already listens at {url}; stop it (`serve shutdown -y` or `ray stop`) "
                "or use it without --start-app"
            )
        time.sleep(1)


@contextmanager
def serve_app(
    serve_config: str | Path = DEFAULT_SERVE_CONFIG,
    url: str = "http://127.0.0.1:8000",
    timeout: float = 180,
    quiet: bool = True,
    busy_timeout: float = 60,
):
    """`serve run` in its own process group; SIGTERM (which stops its Ray cluster) on exit.

    Ray's auth mode is inherited, not set: the driver that then joins this cluster (the demo's or
    the load test's agents) runs with the same environment, and Ray needs both sides in one mode
    (a token-mode driver's actors never start on a cluster started with RAY_AUTH_MODE=disabled)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
    }
    wait_port_free(url, busy_timeout)
    serve_cli = Path(sys.executable).with_name("serve")  # the venv's CLI, even when it is not on PATH
    out = subprocess.DEVNULL if quiet else None
    print(f"starting: serve run {serve_config}", flush=True)
    proc = subprocess.Popen(
        [str(serve_cli) if serve_cli.exists() else "serve", "run", str(serve_config)],
        cwd=REPO_ROOT,
        env=env,
        stdout=out,
        stderr=out,
        start_new_session=True,
    )
    try:
        wait_ready(url, proc, timeout)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
