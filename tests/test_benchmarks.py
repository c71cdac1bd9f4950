"""Slow: the benchmark scripts run end to end and write complete reports (`make test-slow`).

They check that the scripts work and report every figure, not how fast this machine is: the
figures themselves are for people to read (README), never asserted against a target here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from collab.paths import REPO_ROOT

pytestmark = pytest.mark.slow


def test_serve_bench_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve_bench", "--requests", "6", "--clients", "2", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in (
        "p50_latency_ratio",
        "throughput_ratio",
        "encoder_batching_speedup",
        "per_hop_overhead_ms",
        "noop_deployment_qps_16_callers",
        "tower_batch8_speedup_in_process",
        "decoder_batching_speedup",
    ):
        assert report[key] > 0, key
    assert set(report["decoders_16_edges"]) == {"batched", "unbatched"}
    attention = report["attention_stage_ms_in_process"]
    assert attention["captured_in_prefill"] > 0 and attention["separate_question_pass"] > 0
    assert report["p50_latency_ms"]["dag"] > 0 and report["throughput_qps"]["in_process"] > 0
