"""The Serve application on a real local Ray cluster (2 CPUs, loopback): HTTP protocol end to end,
consistency with the in-process pipeline, session errors, replica restart, autoscaling."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
from PIL import Image
from serve_helpers import APP, running_replicas, wait_for

from collab.data.synthetic import generate_items
from collab.imaging import global_size_from
from collab.pipeline import ReferencePipeline
from edge_agents.client import EdgeClient


@pytest.fixture()
def client(served):
    c = EdgeClient(served, client_id="edge-test")
    yield c
    c.close()


def items(n, seed=404):
    return list(generate_items(seed, n))


def test_health_and_models(served):
    assert httpx.get(f"{served}/healthz").json() == {"status": "ok"}
    info = httpx.get(f"{served}/v1/models").json()
    assert info["encoder_size"] == [32, 32] and set(info["policies"]) == {
        "never",
        "always",
        "random",
        "entropy",
        "adaptive",
    }
    schema = httpx.get(f"{served}/openapi.json").json()
    assert "/v1/query" in schema["paths"] and "/v1/refine" in schema["paths"]


def test_two_stage_query_over_http(client):
    item = items(1)[0]
    never = client.ask(item.image, item.question, policy="never")
    assert never.stage == 1 and never.local_bytes == 0 and never.global_bytes > 0
    always = client.ask(item.image, item.question, policy="always")
    assert always.stage == 2 and always.local_bytes > 0 and always.box is not None
    assert always.first_answer == never.answer
    x0, y0, x1, y1 = always.box
    assert 0 <= x0 < x1 <= item.width and 0 <= y0 < y1 <= item.height


def test_adaptive_policy_says_its_threshold_and_never_asks_past_the_edges_budget(client, served):
    """Policy `adaptive` (API 1.1): with no load it is the static gate ("calibrated"); an edge whose
    byte budget or deadline a crop would not fit gets its first-pass answer and no need_roi."""
    item = items(1)[0]
    unsure = {"policy": "adaptive", "threshold": -1.0}  # every answer is unsure enough to refine
    free = client.ask(item.image, item.question, **unsure)
    assert free.stage == 2 and free.gate == {"threshold": -1.0, "reason": "calibrated"}
    tight = client.ask(item.image, item.question, **unsure, max_extra_bytes=100)
    assert tight.stage == 1 and tight.local_bytes == 0 and tight.gate == {"threshold": None, "reason": "edge_bytes"}
    late = client.ask(item.image, item.question, **unsure, deadline_ms=5, uplink_kbps=64)
    assert late.stage == 1 and late.gate["reason"] == "edge_deadline"
    roomy = client.ask(item.image, item.question, **unsure, max_extra_bytes=10**6, deadline_ms=60_000, uplink_kbps=1e4)
    assert roomy.stage == 2 and roomy.local_bytes <= 10**6
    static = client.ask(item.image, item.question, policy="entropy", threshold=-1.0)
    assert static.gate == {"threshold": -1.0, "reason": "static"}
    assert client.ask(item.image, item.question, policy="never").gate is None
    png = io.BytesIO()
    item.image.save(png, format="PNG")
    fields = {"question": item.question, "policy": "adaptive", "threshold": "-1", "deadline_ms": "0.001"}
    plain = httpx.post(f"{served}/v1/query", data=fields, files={"image": ("o.png", png.getvalue())}, timeout=30)
    assert plain.status_code == 200 and plain.json()["gate"]["reason"] == "edge_deadline"  # no uplink: server time
    fields["max_extra_bytes"] = "-1"
    assert httpx.post(f"{served}/v1/query", data=fields, files={"image": ("o.png", png.getvalue())}).status_code == 422


def test_a_crop_request_is_withdrawn_when_the_first_pass_took_too_long_for_the_deadline():
    """The gateway checks the edge's deadline again after the first pass, on the time it took
    (the plan before it used the recent p90); and before any refine is seen it plans one at the
    first pass's time, not at zero."""
    from collab.adaptive import AdaptiveGate, CalibrationCurve, ControllerSettings, EdgeBudget, RecentTimes
    from collab.policies import PolicySpec
    from deployments.gateway import Gateway

    gateway = object.__new__(Gateway.func_or_class)  # the replica's logic, without a cluster
    curve = CalibrationCurve((0.0, 1.0, 2.0), (0.9, 0.5, 0.1), (0.6, 0.5, 0.4), crop_bytes_p90=1600.0)
    gateway.adaptive = AdaptiveGate(curve, ControllerSettings(slo_p95_ms=2000), 0.5)
    gateway.server_ms = {"query": RecentTimes(), "refine": RecentTimes()}
    gateway.server_ms["query"].add(120.0)
    assert gateway._stage_plan_ms() == (120.0, 120.0)  # no refine seen yet: at least a first pass
    gateway.server_ms["refine"].add(300.0)
    sensor = EdgeBudget(deadline_ms=1500, uplink_kbps=64)  # a 1.6 KB crop takes 200 ms to upload
    adaptive = PolicySpec(name="adaptive", threshold=0.5)
    now = time.perf_counter()
    global_bytes = 2000  # 250 ms at 64 kbit/s, before the request reached the server
    assert not gateway._crop_too_late(adaptive, sensor, now - 0.1, global_bytes)  # 250 + 100 + 200 + 300
    assert gateway._crop_too_late(adaptive, sensor, now - 0.9, global_bytes)  # 250 + 900 + 200 + 300
    assert not gateway._crop_too_late(PolicySpec(name="entropy", threshold=0.5), sensor, now - 0.9, global_bytes)
    assert not gateway._crop_too_late(adaptive, EdgeBudget(), now - 60, global_bytes)  # no deadline


def test_dag_matches_reference_pipeline(client, tiny_backend, tiny_config):
    assert_dag_matches_pipeline(client, ReferencePipeline(tiny_backend, tiny_config))


def assert_dag_matches_pipeline(client, pipeline):
    """Every policy: the app over HTTP gives the in-process pipeline's stage, answers, score, box, bytes."""
    batch = items(4, seed=405)
    threshold = sorted(
        pipeline.run(
            it.image, it.question, question_id=it.question_id, policy=pipeline.policy(name="never")
        ).uncertainty
        for it in batch
    )[2]
    for policy in ("always", "entropy", "random"):
        spec = pipeline.policy(name=policy, threshold=threshold)
        for it in batch:
            ref = pipeline.run(it.image, it.question, question_id=it.question_id, policy=spec)
            got = client.ask(it.image, it.question, policy=policy, threshold=threshold, question_id=it.question_id)
            assert got.stage == ref.stage, (policy, it.question_id)
            assert got.answer == ref.answer and got.first_answer == ref.first_answer
            assert got.score == pytest.approx(ref.uncertainty, abs=1e-5)
            assert got.box == ref.box
            assert got.global_bytes == ref.global_bytes and got.local_bytes == ref.local_bytes


def test_qwen_vl_app_answers_both_stages_and_matches_its_pipeline(served, tmp_path):
    """The whole DAG on a second family: a tiny random Qwen2.5-VL saved to a temp dir, served as a
    second app beside the LLaVA one, answers both stages over HTTP as the in-process pipeline does,
    its global images at a token budget with each photo's aspect ratio (API 1.1: the edge sizes
    them from /v1/models; the gateway refuses any other size with the one it expects)."""
    from ray import serve
    from serve_helpers import wait_for, write_collab_config

    from collab.backends import load_backend
    from collab.config import CollabConfig
    from collab.models.tiny_qwen import QWEN_PROMPT, QWEN_REFINE_PROMPT, make_random_tiny_qwen_vl
    from deployments.app import compose
    from deployments.args import AppArgs

    model_dir = make_random_tiny_qwen_vl(tmp_path / "qwen", seed=1)
    config = CollabConfig.model_validate(
        {
            "model": {
                "path": str(model_dir),
                "family": "qwen_vl",
                "encoder_size": 112,
                "max_visual_tokens": 24,
                "prompt_template": QWEN_PROMPT,
                "refine_template": QWEN_REFINE_PROMPT,
                "max_new_tokens": 4,
            },
            "attention": {"layer": -1},
        }
    )
    small = {"ray_actor_options": {"num_cpus": 0.01}}  # one replica each (Serve's defaults otherwise)
    names = ("Gateway", "VisionEncoder", "FirstPassDecoder", "RoISearch", "RefinedDecoder", "SessionStore")
    app = compose(
        AppArgs(config=str(write_collab_config(config, tmp_path / "qwen.yaml"))),
        {n: small for n in names},
        serve_config=None,
    )
    serve.run(app, name="qwenapp", route_prefix="/qwen")
    url = served + "/qwen"
    try:
        assert wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200, timeout=120)
        with EdgeClient(url, client_id="qwen-edge") as c:
            models = c.models()
            assert models["api_version"] == "1.1" and models["local_size"] == [112, 112] and models["grid"] == [4, 4]
            assert models["global_image"] == {"mode": "budget", "unit": 28, "max_tokens": 24, "min_tokens": 4}
            sizes = {global_size_from(models, it.image.size) for it in items(4, seed=405)}
            assert (112, 140) in sizes  # a 480 x 544 photo: 4 x 5 tokens, not a stretched square
            assert_dag_matches_pipeline(c, ReferencePipeline(load_backend(config.model), config))
        square = io.BytesIO()
        Image.new("RGB", (112, 112)).save(square, format="PNG")
        fields = {"question": "what is it?", "original_width": "544", "original_height": "480"}
        refused = httpx.post(f"{url}/v1/query", data=fields, files={"image": ("g.png", square.getvalue())}, timeout=30)
        assert refused.status_code == 422 and "140x112 for a 544x480 original" in refused.json()["error"]
    finally:
        serve.delete("qwenapp")


def test_concurrent_queries_are_batched_and_each_equals_its_sequential_reply(served):
    """16 edges at once: the decoders batch them (Serve's batch-size metric is the proof of that in
    tests/test_observability.py); each reply equals the one the same query gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    batch = items(16, seed=406)
    policies = ["always", "never", "entropy", "random"]

    def ask(i):
        with EdgeClient(served, client_id=f"edge-{i}") as c:
            it = batch[i]
            return c.ask(it.image, it.question, policy=policies[i % 4], threshold=0.5, question_id=it.question_id)

    sequential = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, range(16)))
    assert any(r.stage == 2 for r in sequential) and any(r.stage == 1 for r in sequential)
    for alone, together in zip(sequential, concurrent):
        assert (together.answer, together.first_answer, together.stage, together.box) == (
            alone.answer,
            alone.first_answer,
            alone.stage,
            alone.box,
        )
        assert together.score == pytest.approx(alone.score, abs=1e-4)
        assert (together.global_bytes, together.local_bytes) == (alone.global_bytes, alone.local_bytes)


def _need_roi(served, item, client_id="owner"):
    c = EdgeClient(served, client_id=client_id)
    from edge_agents.client import global_upload

    payload = global_upload(item.image, c.models(), c.imaging)
    r = httpx.post(
        f"{served}/v1/query",
        data={
            "question": item.question,
            "original_width": item.width,
            "original_height": item.height,
            "policy": "always",
            "client_id": client_id,
        },
        files={"image": ("g.jpg", payload.data, "image/jpeg")},
    )
    c.close()
    assert r.status_code == 200 and r.json()["status"] == "need_roi"
    return r.json()


def test_session_errors_and_idempotent_replay(served):
    item = items(1, seed=406)[0]
    first = _need_roi(served, item)
    from edge_agents.client import EdgeImaging, local_upload

    local = local_upload(item.image, first["box"], first["local_size"], EdgeImaging())
    files = {"image": ("l.jpg", local.data, "image/jpeg")}
    assert (
        httpx.post(f"{served}/v1/refine", data={"session_id": "0" * 32, "client_id": "owner"}, files=files).status_code
        == 404
    )
    assert (
        httpx.post(
            f"{served}/v1/refine", data={"session_id": first["session_id"], "client_id": "thief"}, files=files
        ).status_code
        == 403
    )
    ok = httpx.post(f"{served}/v1/refine", data={"session_id": first["session_id"], "client_id": "owner"}, files=files)
    assert ok.status_code == 200 and ok.json()["stage"] == 2 and not ok.json()["replayed"]
    again = httpx.post(
        f"{served}/v1/refine", data={"session_id": first["session_id"], "client_id": "owner"}, files=files
    )
    assert again.status_code == 200 and again.json()["replayed"] and again.json()["answer"] == ok.json()["answer"]
    other = local_upload(item.image, [0, 0, 40, 40], first["local_size"], EdgeImaging())
    conflict = httpx.post(
        f"{served}/v1/refine",
        data={"session_id": first["session_id"], "client_id": "owner"},
        files={"image": ("l.jpg", other.data, "image/jpeg")},
    )
    assert conflict.status_code == 409 and "error" in conflict.json()


def test_bad_requests_are_4xx(served):
    r = httpx.post(
        f"{served}/v1/query",
        data={"question": "q", "original_width": "10", "original_height": "10"},
        files={"image": ("g.jpg", b"", "image/jpeg")},
    )
    assert r.status_code == 400
    r = httpx.post(
        f"{served}/v1/query",
        data={"question": "   ", "original_width": "10", "original_height": "10"},
        files={"image": ("g.jpg", b"x", "image/jpeg")},
    )
    assert r.status_code == 422
    r = httpx.post(
        f"{served}/v1/query",
        data={"question": "q", "original_width": "0", "original_height": "10"},
        files={"image": ("g.jpg", b"x", "image/jpeg")},
    )
    assert r.status_code == 422
    r = httpx.post(
        f"{served}/v1/query",
        data={"question": "q", "original_width": "10", "original_height": "10", "policy": "sometimes"},
        files={"image": ("g.jpg", b"x", "image/jpeg")},
    )
    assert r.status_code == 422


def test_replica_killed_and_restarted(served, client):
    import ray

    item = items(1, seed=407)[0]
    before = client.ask(item.image, item.question, policy="always")
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "RefinedDecoder" in a["name"]]
    assert replicas, "no RefinedDecoder replica actor found"
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    def healthy():
        try:
            return client.ask(item.image, item.question, policy="always").answer == before.answer
        except Exception:
            return False

    assert wait_for(healthy, timeout=90, interval=1.0)
    for _ in range(3):  # and it keeps working
        assert client.ask(item.image, item.question, policy="always").answer == before.answer


def test_first_pass_autoscales_up_and_down(served):
    assert wait_for(lambda: running_replicas(APP, "FirstPassDecoder") == 1, timeout=60)
    stop = threading.Event()
    batch = items(6, seed=408)

    def load(i):
        c = EdgeClient(served, client_id=f"load-{i}")
        k = 0
        while not stop.is_set():
            it = batch[k % len(batch)]
            try:
                c.ask(it.image, it.question, policy="never")
            except Exception:
                time.sleep(0.1)
            k += 1
        c.close()

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        # a new replica imports torch and loads the model: tens of seconds on 2 busy cores
        scaled_up = wait_for(lambda: running_replicas(APP, "FirstPassDecoder") >= 2, timeout=150)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert scaled_up, "FirstPassDecoder did not scale up under load"
    assert wait_for(lambda: running_replicas(APP, "FirstPassDecoder") == 1, timeout=90), "did not scale back down"
