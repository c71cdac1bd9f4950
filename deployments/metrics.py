"""Application metrics of the Serve deployments (ray.serve.metrics -> Ray's Prometheus endpoint).

Ray adds the `ray_` prefix and the deployment/replica/application tags; counters are exported
with a `_total` suffix. Each getter builds its metrics once per replica process (they must be
created inside the replica to get its tags). configs/grafana/collab-dashboard.json reads every
one of them (batch sizes come from Serve's own `serve_actual_batch_size`);
tests/test_observability.py checks that each panel gets data from a live run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import cache
from types import SimpleNamespace

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_MS = [2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
SCORE_BITS = [0.25, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8]
FRACTIONS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]


@cache
def stage_latency() -> Histogram:
    return Histogram(
        "collab_stage_latency_ms",
        description="Server time of one stage of one request (ms)",
        boundaries=LATENCY_MS,
        tag_keys=("stage",),
    )


def record(stage: str, started: float, timings: dict | None = None, key: str | None = None) -> float:
    """Milliseconds since `started` (perf_counter), observed as collab_stage_latency_ms{stage} and,
    if given, written to timings[key or stage] (the reply's timings_ms)."""
    ms = (time.perf_counter() - started) * 1000
    stage_latency().observe(ms, tags={"stage": stage})
    if timings is not None:
        timings[key or stage] = ms
    return ms


@contextmanager
def timed(stage: str, timings: dict | None = None):
    """`with timed("encode"):` records the block's latency as `record` does (not when it raises)."""
    started = time.perf_counter()
    yield
    record(stage, started, timings)


@cache
def gateway() -> SimpleNamespace:
    return SimpleNamespace(
        requests=Counter(
            "collab_requests",
            description="Requests by endpoint, policy and outcome",
            tag_keys=("endpoint", "policy", "outcome"),
        ),
        uplink_bytes=Counter(
            "collab_uplink_bytes", description="Image bytes received from edges, per stage", tag_keys=("stage",)
        ),
        threshold=Gauge(
            "collab_gate_threshold_bits",
            description="Entropy threshold of the latest gated request (bits)",
            tag_keys=("policy",),
        ),
        adaptive_cap=Gauge(
            "collab_adaptive_refine_cap", description="Adaptive gate: the refine-rate cap its load controller holds"
        ),
        adaptive_p95=Gauge(
            "collab_adaptive_p95_ms",
            description="Adaptive gate: the controller's last signal, p95 server time of its window's queries "
            "or the age of the oldest request in flight, the larger (ms)",
        ),
        adaptive_backlog=Gauge(
            "collab_adaptive_backlog_ms",
            description="Adaptive gate: the wait a new request has ahead of it on this replica, requests in flight "
            "over the recent completion rate (ms)",
        ),
    )


@cache
def gate() -> SimpleNamespace:
    return SimpleNamespace(
        decisions=Counter(
            "collab_gate_decisions", description="First-pass gate decisions", tag_keys=("policy", "decision")
        ),
        score=Histogram(
            "collab_gate_score_bits",
            description="First-pass uncertainty score (bits)",
            boundaries=SCORE_BITS,
            tag_keys=("policy",),
        ),
    )


@cache
def roi() -> SimpleNamespace:
    return SimpleNamespace(
        area=Histogram(
            "collab_roi_area_fraction", description="RoI box area / original image area", boundaries=FRACTIONS
        ),
    )


@cache
def sessions() -> SimpleNamespace:
    return SimpleNamespace(
        active=Gauge("collab_sessions_active", description="Sessions waiting for a refine"),
        bytes=Gauge("collab_session_bytes", description="Feature memory held by sessions (bytes)"),
        events=Counter("collab_session_events", description="Session lifecycle events", tag_keys=("event",)),
    )
