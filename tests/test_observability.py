"""Metrics end to end: the Grafana dashboard is valid for the schema it declares, and against a
live run (Ray + Serve app + edge load + Prometheus with our config) EVERY panel query returns
data and every collab metric is shown by some panel."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from collab.paths import REPO_ROOT

DASHBOARD = REPO_ROOT / "configs/grafana/collab-dashboard.json"
PROM_CONFIG = REPO_ROOT / "configs/prometheus/prometheus.yml"


def _missing(why: str) -> None:
    """Skip on a developer's machine; fail under CI, which installs Prometheus (.ci/run), so a
    broken install step cannot pass as a skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(why + " (CI=true: .ci/run must install it)")
    pytest.skip(why)


def load_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dashboard", REPO_ROOT / "configs/grafana/make_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schema_differences(ours, roundtrip, path="") -> list[str]:
    """Where `ours` has a key or value the schema model did not keep (unknown or mistyped)."""
    if isinstance(ours, dict):
        if not isinstance(roundtrip, dict):
            return [path or "/"]
        out = []
        for key, value in ours.items():
            if key not in roundtrip:
                out.append(f"{path}.{key}")
            else:
                out += schema_differences(value, roundtrip[key], f"{path}.{key}")
        return out
    if isinstance(ours, list):
        if not isinstance(roundtrip, list) or len(ours) != len(roundtrip):
            return [path]
        return [d for i, (a, b) in enumerate(zip(ours, roundtrip)) for d in schema_differences(a, b, f"{path}[{i}]")]
    return [] if ours == roundtrip else [f"{path}: {ours!r} != {roundtrip!r}"]


def roundtrip(dashboard: dict) -> dict:
    """Through Grafana's generated models of the dashboard schema (grafana-foundation-sdk)."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    return json.loads(JSONEncoder().encode(Dashboard.from_json(dashboard)))


def panel_targets(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def test_dashboard_is_generated_and_valid_for_its_schema_version():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard == load_generator().build(), (
        "collab-dashboard.json is stale: run python configs/grafana/make_dashboard.py"
    )
    assert dashboard["schemaVersion"] == 36  # Grafana 10.1, the schema grafana-foundation-sdk 10.1 models
    assert schema_differences(dashboard, roundtrip(dashboard)) == []
    broken = copy.deepcopy(dashboard)
    broken["panels"][1]["gridPos"]["hieght"] = 3  # the check must catch a typo
    assert schema_differences(broken, roundtrip(broken)) == [".panels[1].gridPos.hieght"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert 0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"])
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def test_prometheus_config_is_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        _missing("promtool not installed (scripts/prometheus.sh installs it; .ci/run does)")
    subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], check=True, capture_output=True)


# ------------------------------------------------------------------------------------ live


def prom_query(url: str, expr: str) -> list:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    resp.raise_for_status()
    return resp.json()["data"]["result"]


@pytest.fixture()
def prometheus(tmp_path):
    """Prometheus started by scripts/prometheus.sh with our config, the static targets pointed at
    this test session's Ray metrics port and the edge exporter."""
    if shutil.which("prometheus") is None:
        _missing("prometheus not installed (scripts/prometheus.sh installs Debian's package; .ci/run does)")
    import serve_helpers

    edge_port, prom_port = serve_helpers.free_port(), serve_helpers.free_port()
    config = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["ray"]["static_configs"] = [{"targets": [f"127.0.0.1:{serve_helpers.RAY_METRICS_PORT}"]}]
    jobs["ray"].pop("file_sd_configs")  # only this session's Ray, not another one on the machine
    jobs["collab_edge"]["static_configs"] = [{"targets": [f"127.0.0.1:{edge_port}"]}]
    config["global"]["scrape_interval"] = "2s"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run(
        [
            "bash",
            str(REPO_ROOT / "scripts/prometheus.sh"),
            "--config",
            str(path),
            "--port",
            str(prom_port),
            "--data",
            str(tmp_path / "data"),
        ],
        check=True,
        timeout=120,
    )
    pid = int((tmp_path / "data/prometheus.pid").read_text())
    yield f"http://127.0.0.1:{prom_port}", edge_port
    subprocess.run(["kill", str(pid)], check=False)


def test_every_panel_gets_data_from_a_live_run(served, prometheus):
    from edge_agents.config import LoadTestConfig
    from edge_agents.loadtest import run_load
    from edge_agents.metrics import EdgeMetrics

    prom, edge_port = prometheus
    metrics = EdgeMetrics.serve(edge_port)
    cfg = LoadTestConfig.model_validate(
        {
            "url": served,
            "agents": 4,
            "agents_per_actor": 4,
            "policy": "entropy",
            "workload": {"mode": "closed", "think_time_s": 0.1, "duration_s": 20, "ramp_up_s": 1, "drain_s": 60},
            "source": {"synthetic": "77:16"},
            "channel": {"capacity_mbps": 20, "discipline": "ps"},
            "profiles": [
                {"name": "gated", "policy": "entropy", "rtt_ms": 10},
                {"name": "refining", "policy": "always", "rtt_ms": 10},
                {"name": "adaptive", "policy": "adaptive", "rtt_ms": 10},
            ],
        }
    )
    bad = httpx.post(
        f"{served}/v1/query",
        data={"question": " ", "original_width": "10", "original_height": "10"},
        files={"image": ("x.jpg", b"\xff\xd8", "image/jpeg")},
    )
    assert bad.status_code == 422  # one error reply for the errors panel
    result = run_load(cfg, progress=False, metrics=metrics)
    assert result["rows"] and all(r["error"] is None for r in result["rows"])
    assert any(r["stage"] == 2 for r in result["rows"])

    dashboard = json.loads(DASHBOARD.read_text())
    targets = panel_targets(dashboard)
    deadline = time.time() + 90
    empty = targets
    while empty and time.time() < deadline:  # Ray reports every 2 s, Prometheus scrapes every 2 s
        empty = [(title, expr) for title, expr in empty if not prom_query(prom, expr)]
        if empty:
            time.sleep(3)
    assert not empty, "panel queries with no data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)
    batch_panel = next(expr for title, expr in targets if title == "Batch size")
    batched = {r["metric"].get("deployment") for r in prom_query(prom, batch_panel)}
    assert {"VisionEncoder", "FirstPassDecoder", "RefinedDecoder"} <= batched, batched

    names = httpx.get(f"{prom}/api/v1/label/__name__/values", timeout=10).json()["data"]
    ours = sorted(n for n in names if n.startswith(("ray_collab_", "collab_edge_")))
    assert len(ours) >= 15, ours
    exprs = " ".join(expr for _, expr in targets)

    def shown(name: str) -> bool:
        bases = {name} | {name.removesuffix(s) for s in ("_bucket", "_sum", "_count", "_created", "_total")}
        return any(b in exprs for b in bases if b)

    unshown = [n for n in ours if not shown(n)]
    assert not unshown, f"metrics no panel shows: {unshown}"
