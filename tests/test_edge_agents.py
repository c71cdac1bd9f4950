"""Edge agents: link timing, shared-channel fairness, retries counted once, and agents (as Ray
actors, through the load-test driver) completing both stages against the live Serve app."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time

import httpx
import pytest

from collab.data.synthetic import generate_items
from edge_agents import report
from edge_agents.agent import EdgeAgent
from edge_agents.config import LoadTestConfig, LoadTestConfigError, load_loadtest_config
from edge_agents.links import SharedChannel, exchange_s, round_trip_s, transmission_s
from edge_agents.loadtest import main as loadtest_main
from edge_agents.loadtest import run_load
from edge_agents.sources import EdgeItem, load_items

# ------------------------------------------------------------------------------------ links


def test_link_timing_math():
    assert transmission_s(125_000, 1.0) == pytest.approx(1.0)  # 1 Mbit over 1 Mbit/s
    assert transmission_s(0, 5.0) == 0.0
    assert transmission_s(10_000, 8.0) == pytest.approx(0.01)
    rng = random.Random(0)
    rtts = [round_trip_s(50, 10, rng) for _ in range(500)]
    assert 0.040 <= min(rtts) and max(rtts) <= 0.060 and abs(sum(rtts) / len(rtts) - 0.050) < 0.002
    assert round_trip_s(5, 50, random.Random(1)) >= 0  # jitter never makes time negative
    assert exchange_s(125_000, 1.0, 20, 0, rng) == pytest.approx(1.02)
    with pytest.raises(ValueError):
        transmission_s(10, 0)
    with pytest.raises(ValueError):
        transmission_s(-1, 1)


async def _timed_transfers(channel: SharedChannel, sizes: list[int], offsets: list[float]) -> list[float]:
    async def one(nbytes, offset):
        await asyncio.sleep(offset)
        t = time.monotonic()
        await channel.transmit(nbytes)
        return time.monotonic() - t

    return await asyncio.gather(*(one(n, o) for n, o in zip(sizes, offsets)))


def test_processor_sharing_is_fair():
    nbytes = 25_000  # 0.2 s alone at 1 Mbit/s
    alone = asyncio.run(_timed_transfers(SharedChannel(1.0, "ps"), [nbytes], [0]))[0]
    assert alone == pytest.approx(0.2, abs=0.03)
    both = asyncio.run(_timed_transfers(SharedChannel(1.0, "ps"), [nbytes, nbytes], [0, 0]))
    for t in both:  # each takes about twice as long as alone
        assert t == pytest.approx(2 * alone, rel=0.15)


def test_processor_sharing_late_arrival_and_small_transfer():
    # a 0.4 s transfer alone; a 0.1 s-alone transfer joins at 0.1 s and gets half the capacity:
    # it finishes at 0.3 s (0.2 s for it), the big one at 0.5 s
    channel = SharedChannel(1.0, "ps")
    big, small = asyncio.run(_timed_transfers(channel, [50_000, 12_500], [0, 0.1]))
    assert small == pytest.approx(0.2, abs=0.04)
    assert big == pytest.approx(0.5, abs=0.05)
    stats = channel.stats()
    assert stats["transfers"] == 2 and stats["bytes"] == 62_500 and stats["peak_in_flight"] == 2
    assert stats["busy_s"] == pytest.approx(0.5, abs=0.05)


def test_fifo_serves_one_at_a_time():
    first, second = asyncio.run(_timed_transfers(SharedChannel(1.0, "fifo"), [25_000, 25_000], [0, 0.01]))
    assert first == pytest.approx(0.2, abs=0.03)
    assert second == pytest.approx(0.39, abs=0.04)  # waited for the first


def test_channel_rejects_bad_settings():
    with pytest.raises(ValueError):
        SharedChannel(0)
    with pytest.raises(ValueError):
        SharedChannel(1, "lifo")


# ------------------------------------------------------------------------------------ config


def test_config_yaml_overrides_and_errors(tmp_path):
    cfg = load_loadtest_config("configs/loadtest/default.yaml", {"agents": 64, "workload.duration_s": 60})
    assert cfg.agents == 64 and cfg.workload.duration_s == 60
    names = [cfg.profile_for(i).name for i in range(64)]
    assert names.count("phone-4g") == 32 and names.count("camera-wifi") == 16 and names.count("robot-lte-m") == 16
    assert load_loadtest_config("configs/loadtest/contention.yaml").channel.capacity_mbps == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("agents: 0\nworkload: {mode: sideways}\n")
    with pytest.raises(LoadTestConfigError) as bad_fields:
        load_loadtest_config(bad)
    assert {line.split(":")[0].strip() for line in str(bad_fields.value).splitlines()[1:]} == {
        "agents",
        "workload.mode",
    }
    with pytest.raises(LoadTestConfigError, match="source.synthetic"):
        load_loadtest_config(None, {"source.synthetic": "12"})
    with pytest.raises(LoadTestConfigError, match="not found"):
        load_loadtest_config(tmp_path / "missing.yaml")
    assert loadtest_main(["--set", "nokey"]) == 2


def test_sources_are_disjoint_shards():
    cfg = LoadTestConfig()
    cfg.source.synthetic = "7:10"
    shards = [load_items(cfg.source, i, 3) for i in range(3)]
    ids = [it.question_id for s in shards for it in s]
    assert sorted(ids) == sorted({it.question_id for it in generate_items(7, 10)}) and len(ids) == 10
    assert len(load_items(cfg.source, 11, 12)) == 1  # more agents than items: they share


# ------------------------------------------------------------------------------------ retries


def _mock_server(script: list):
    """An httpx transport answering /v1/models, /v1/query and /v1/refine; `script` lists
    failures to inject (popped in order of calls to /v1/query and /v1/refine)."""
    calls = {"query": 0, "refine": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"encoder_size": [32, 32], "defaults": {"global_mode": "resize"}})
        name = path.rsplit("/", 1)[-1]
        calls[name] += 1
        if script and script[0][0] == name:
            _, failure = script.pop(0)
            if failure == "connect":
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(failure, json={"error": "busy", "status": failure}, headers={"Retry-After": "0"})
        if name == "query":
            return httpx.Response(
                200,
                json={
                    "status": "need_roi",
                    "session_id": "s1",
                    "box": [0, 0, 100, 100],
                    "local_size": [32, 32],
                    "expires_in": 30,
                    "first_answer": "3",
                    "score": 4.0,
                    "policy": "always",
                    "timings_ms": {},
                },
            )
        return httpx.Response(200, json={"status": "answered", "answer": "7", "stage": 2, "timings_ms": {}})

    return handler, calls


def _agent(script, tmp_items=None, **retry):
    cfg = LoadTestConfig.model_validate(
        {
            "retry": {"backoff_s": 0.0, **retry},
            "profiles": [{"name": "fast", "uplink_mbps": 1000, "rtt_ms": 0, "jitter_ms": 0}],
        }
    )
    item = next(generate_items(5, 1))
    items = tmp_items or [EdgeItem(item.question_id, item.question, ["7"] * 10, lambda: item.image, item.kind)]
    agent = EdgeAgent(0, cfg, items=items, policy="always")
    handler, calls = _mock_server(script)
    agent.http = httpx.AsyncClient(base_url="http://edge.test", transport=httpx.MockTransport(handler))
    return agent, items, calls


def test_retried_query_is_counted_once():
    agent, items, calls = _agent([("query", 503), ("query", "connect"), ("refine", 502)])
    log = asyncio.run(agent.query(items[0], 0, time.time()))
    assert len(agent.records) == 1 and agent.records[0] is log
    assert log.error is None and log.stage == 2 and log.answer == "7" and log.first_answer == "3"
    assert log.retries == 3 and calls == {"query": 3, "refine": 2}
    assert log.correct == 1.0 and log.first_correct == 0.0
    assert log.global_bytes > 0 and log.local_bytes > 0


def test_query_that_never_succeeds_is_recorded_as_failed_once():
    agent, items, calls = _agent([("query", 503)] * 10, max_attempts=3)
    log = asyncio.run(agent.query(items[0], 0, time.time()))
    assert len(agent.records) == 1 and log.error and "after 3 attempts" in log.error
    assert log.retries == 2 and calls["query"] == 3 and log.answer is None


def test_client_errors_are_not_retried():
    agent, items, calls = _agent([("query", 400)])
    log = asyncio.run(agent.query(items[0], 0, time.time()))
    assert log.error and "HTTP 400" in log.error and log.retries == 0 and calls["query"] == 1


def test_expired_session_keeps_first_answer():
    agent, items, _ = _agent([("refine", 410)])
    log = asyncio.run(agent.query(items[0], 0, time.time()))
    assert log.error is None and log.session_expired and log.stage == 1 and log.answer == "3"


def test_a_slow_device_sends_its_budget_and_logs_the_servers_gate():
    cfg = LoadTestConfig.model_validate(
        {
            "policy": "adaptive",
            "profiles": [{"name": "sensor", "uplink_mbps": 0.064, "rtt_ms": 0, "jitter_ms": 0, "deadline_ms": 1500}],
        }
    )
    item = next(generate_items(5, 1))
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"encoder_size": [32, 32], "defaults": {"global_mode": "resize"}})
        body = request.content.decode("latin-1")
        seen.update({k: k in body for k in ("deadline_ms", "uplink_kbps", "max_extra_bytes")})
        gate = {"threshold": None, "reason": "edge_deadline"}
        return httpx.Response(
            200,
            json={
                "status": "answered",
                "answer": "3",
                "stage": 1,
                "policy": "adaptive",
                "timings_ms": {},
                "gate": gate,
            },
        )

    agent = EdgeAgent(0, cfg, items=[EdgeItem(item.question_id, item.question, ["3"] * 10, lambda: item.image, "fine")])
    agent.http = httpx.AsyncClient(base_url="http://edge.test", transport=httpx.MockTransport(handler))
    log = asyncio.run(agent.query(agent.items[0], 0, time.time()))
    assert seen == {"deadline_ms": True, "uplink_kbps": True, "max_extra_bytes": False}
    assert log.stage == 1 and log.gate_reason == "edge_deadline" and log.gate_threshold is None


def test_load_phases_make_a_step_and_keep_the_profile_mix_in_every_phase():
    from collections import Counter

    cfg = LoadTestConfig.model_validate(
        {
            "agents": 64,
            "workload": {"phases": [[0, 0.125], [50, 1.0], [100, 0.125]]},
            "profiles": [{"name": "fast", "weight": 3}, {"name": "slow", "uplink_mbps": 0.064, "weight": 1}],
        }
    )
    assert [cfg.workload.active_share(t) for t in (0, 49.9, 50, 99, 100, 500)] == [0.125, 0.125, 1, 1, 0.125, 0.125]
    first8 = Counter(cfg.profile_for(i).name for i in range(8))
    assert first8["slow"] >= 1 and first8["fast"] >= 5  # the slow link is there at light load too
    agents = [EdgeAgent(i, cfg, items=[], run_start=1000.0) for i in (0, 7, 8, 63)]
    assert [a._active(1010.0) for a in agents] == [True, True, False, False]
    assert all(a._active(1060.0) for a in agents)
    for bad in ([[5, 1.0]], [[0, 0.5], [0, 1.0]], [[0, 0.0]]):
        with pytest.raises(LoadTestConfigError, match="phases"):
            load_loadtest_config(None, {"workload": {"phases": bad}})


def test_windows_summarise_each_ten_seconds():
    from edge_agents.report import windows

    def row(t, lat, box, threshold, correct):
        return {
            "t_start": t,
            "latency_ms": lat,
            "box": box,
            "gate_threshold": threshold,
            "correct": correct,
            "server_ms": lat / 2,
            "global_bytes": 1000,
            "local_bytes": 2000 if box else 0,
            "error": None,
        }

    rows = [row(1, 100, None, 3.0, 1.0), row(2, 300, "0,0,1,1", 3.0, 0.0), row(25, 5000, None, None, 1.0)]
    rows.append({**row(3, 1, None, None, 1.0), "error": "HTTP 500"})  # failed: counted, not in the statistics
    got = windows(rows)
    assert [w["t"] for w in got] == [0.0, 20.0] and got[0]["queries"] == 3 and got[0]["failed"] == 1
    assert got[0]["refine_rate"] == 0.5 and got[0]["threshold"] == 3.0 and got[0]["bytes_per_query"] == 2000
    assert got[1]["threshold"] is None and got[1]["p95_ms"] == 5000 and got[1]["server_p95_ms"] == 2500


def test_query_rows_round_trip_through_the_csv(tmp_path):
    from edge_agents.agent import QueryLog

    logs = [
        QueryLog(
            "agent-000",
            0,
            "q0",
            "fast",
            "adaptive",
            "fine",
            1.5,
            latency_ms=120.5,
            stage=2,
            box="0,0,9,9",
            gate_threshold=3.1,
            gate_reason="calibrated",
            correct=1.0,
            global_bytes=900,
            local_bytes=1800,
        ),
        QueryLog("agent-001", 1, "q1", "slow", "never", None, 0.5, error="HTTP 503", retries=5, session_expired=True),
    ]
    report.write_rows([log.to_row() for log in logs], tmp_path / "queries.csv")
    back = report.read_rows(tmp_path / "queries.csv")
    assert back == sorted([log.to_row() for log in logs], key=lambda r: r["t_start"])


# ------------------------------------------------------------------------------------ live


def test_agents_as_ray_actors_complete_both_stages(served, tmp_path):
    """Four agents in two Ray actors, sharing one uplink (a Ray actor), against the live app."""
    cfg = LoadTestConfig.model_validate(
        {
            "url": served,
            "agents": 4,
            "agents_per_actor": 2,
            "policy": "always",
            "workload": {"mode": "closed", "think_time_s": 0.05, "duration_s": 6, "ramp_up_s": 1, "drain_s": 60},
            "source": {"synthetic": "31:12"},
            "channel": {"capacity_mbps": 5, "discipline": "ps"},
            "profiles": [{"name": "cam", "rtt_ms": 20, "jitter_ms": 5}],
        }
    )
    result = run_load(cfg, progress=False)
    rows = result["rows"]
    assert rows and not result["failures"]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]]
    assert all(r["stage"] == 2 and r["local_bytes"] > 0 and r["box"] for r in rows)
    assert {r["agent"] for r in rows} == {f"agent-{i:03d}" for i in range(4)}
    keys = [(r["agent"], r["seq"]) for r in rows]
    assert len(keys) == len(set(keys))  # each query recorded once
    assert all(r["correct"] in (0.0, 1.0) for r in rows)
    assert all(r["network_ms"] >= 2 * 20 * 0.7 for r in rows)  # two exchanges, each at least RTT - jitter
    assert result["channel"]["transfers"] >= 2 * len(rows)  # global + local uploads went through it
    assert result["replicas"] and result["replicas"][0]["replicas"].get("Gateway", 0) >= 1

    from edge_agents.loadtest import write_outputs

    summary = write_outputs(result, cfg, tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert (
        saved["queries"] == len(rows)
        and saved["failed"] == 0
        and saved["unfinished"] == 0
        and saved["refine_rate"] == 1.0
    )
    assert (
        saved["throughput_qps"] > 0
        and saved["latency_ms"]["p50"] <= saved["latency_ms"]["p95"] <= saved["latency_ms"]["p99"]
    )
    assert saved["bytes_per_query"]["local"] > 0 and saved["bytes_per_query"]["global"] > 0
    for name in ("queries.csv", "latency_cdf.png", "timeline.png", "bytes_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len((tmp_path / "queries.csv").read_text().strip().splitlines()) == len(rows) + 1
    assert "throughput" in report.table(summary)


def test_load_test_driver_keeps_rays_auth_settings(monkeypatch):
    """`serve run` starts local clusters with token authentication (Ray >= 2.59); the driver must
    join with the environment as the user has it. Forcing RAY_AUTH_MODE=disabled (as it once did)
    left it unable to authenticate, and it ran the agents on a separate local Ray."""
    import ray

    from edge_agents import loadtest

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs, auth_mode=os.environ.get("RAY_AUTH_MODE"))

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    assert loadtest.connect_ray(None) is True
    assert seen["address"] == "auto" and seen["auth_mode"] is None
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert loadtest.connect_ray("10.0.0.5:6379") is True
    assert seen["address"] == "10.0.0.5:6379" and seen["auth_mode"] == "token"


def test_started_app_inherits_the_drivers_ray_auth_mode(monkeypatch):
    """`--start-app` / the demo start `serve run` and then join its cluster from this process: Ray
    needs both in one auth mode (a token-mode driver's actors never start on a cluster started with
    RAY_AUTH_MODE=disabled, which is how `make demo` broke), so the child inherits whatever the
    driver has."""
    import subprocess

    from edge_agents import app_process

    launched = {}

    class FakeProc:
        pid, returncode = 12345, None

        def wait(self, timeout=None):
            return 0

    def fake_popen(cmd, **kwargs):
        launched["env"] = kwargs["env"]
        return FakeProc()

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    monkeypatch.setattr(app_process, "wait_ready", lambda *a, **k: None)
    monkeypatch.setattr(app_process, "wait_port_free", lambda *a, **k: None)
    monkeypatch.setattr(app_process.os, "killpg", lambda *a: None)
    for mode in (None, "token", "disabled"):
        if mode is None:
            monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        else:
            monkeypatch.setenv("RAY_AUTH_MODE", mode)
        with app_process.serve_app(quiet=True):
            pass
        assert launched["env"].get("RAY_AUTH_MODE") == mode
        assert launched["env"]["HF_HUB_OFFLINE"] == "1"


def test_start_app_waits_for_the_port_and_refuses_a_busy_one(monkeypatch):
    """A previous app still shutting down on the port would pass the readiness check and then
    vanish under the load (a sweep's first point once failed so, its successor answering 404)."""
    import subprocess

    from edge_agents import app_process

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    try:
        assert app_process.port_in_use(url)
        with pytest.raises(RuntimeError, match="already listens"):
            with app_process.serve_app(url=url, busy_timeout=1.5):
                pass
        assert not started  # nothing was launched on a busy port
    finally:
        listener.close()
    assert not app_process.port_in_use(url)
    app_process.wait_port_free(url, timeout=0)  # free: returns at once


def test_step_table_counts_a_window_with_failures_as_over_the_slo():
    from edge_agents.report import step_table

    def row(t, server, error=None, box=None, profile="fast", latency=None):
        return {
            "t_start": t,
            "latency_ms": latency or server,
            "server_ms": server,
            "box": box,
            "gate_threshold": None,
            "correct": 1.0,
            "first_correct": 1.0,
            "full_bytes": 50000,
            "global_bytes": 1000,
            "local_bytes": 0,
            "error": error,
            "profile": profile,
        }

    entropy = [row(55, 5000), row(65, 500), row(75, 500)]
    failing = [row(55, 500), row(65, 500, error="HTTP 503"), row(75, 500, box="0,0,1,1", profile="slow", latency=9000)]
    table = step_table({"entropy": entropy, "adaptive": failing}, 2000, (50, 100), {"slow": 1500})
    assert table["entropy"]["windows_within_slo"] == 2 and table["entropy"]["entropy_over_slo_windows"] == 1
    assert table["adaptive"]["windows_from_step"] == 3 and table["adaptive"]["windows_within_slo"] == 2
    assert table["adaptive"]["within_slo_where_entropy_is_not"] == 1 and table["adaptive"]["refined_past_deadline"] == 1
