"""Start and stop a local Ray + Serve for integration tests (loopback only)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import yaml

APP = "collab"
FAST_AUTOSCALE = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 4,
    "look_back_period_s": 1,
    "metrics_interval_s": 0.5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_collab_config(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


RAY_METRICS_PORT: int | None = None  # where this test session's Ray exports Prometheus metrics


def start_serve(port: int):
    """Ray (2 CPUs, metrics on a free loopback port, reported every 2 s) and Serve on `port`."""
    import ray
    from ray import serve

    global RAY_METRICS_PORT
    if not ray.is_initialized():
        RAY_METRICS_PORT = free_port()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            _metrics_export_port=RAY_METRICS_PORT,
            _system_config={"metrics_report_interval_ms": 2000},
        )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return serve


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
