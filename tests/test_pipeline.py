import numpy as np
import pytest
from PIL import Image

from collab.pipeline import ReferencePipeline
from collab.policies import PolicySpec, should_refine, stable_uniform

QUESTIONS = ["what number is in the red circle ?", "what color is the square ?", "how many objects ?"]


def scene(i, w=400, h=300):
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipeline(tiny_backend, tiny_config):
    return ReferencePipeline(tiny_backend, tiny_config)


def run_all(pipeline, n, **policy):
    spec = pipeline.policy(**policy)
    return [
        pipeline.run(
            scene(i, 400 + 16 * (i % 5), 300 + 8 * (i % 3)), QUESTIONS[i % 3], question_id=f"q{i}", policy=spec
        )
        for i in range(n)
    ]


def test_never_uploads_one_image(pipeline):
    for rec in run_all(pipeline, 6, name="never"):
        assert not rec.refined and rec.stage == 1 and rec.local_bytes == 0 and rec.box is None
        assert rec.global_bytes > 0 and rec.answer == rec.first_answer
        assert "refine" not in rec.times_ms and "first_pass" in rec.times_ms


def test_always_uploads_exactly_twice(pipeline):
    for rec in run_all(pipeline, 6, name="always"):
        assert rec.refined and rec.stage == 2 and rec.local_bytes > 0
        assert rec.answer == rec.refined_answer
        x0, y0, x1, y1 = rec.box
        w, h = rec.original_size
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert rec.total_bytes == rec.global_bytes + rec.local_bytes
        assert {"attention", "roi_search", "edge_local", "encode_local", "refine"} <= set(rec.times_ms)


def test_random_is_near_its_rate_and_deterministic():
    spec = PolicySpec(name="random", random_rate=0.3, seed=7)
    decisions = [should_refine(spec, 0.0, f"q{i}") for i in range(4000)]
    assert abs(np.mean(decisions) - 0.3) < 0.03
    assert decisions == [should_refine(spec, 0.0, f"q{i}") for i in range(4000)]
    other_seed = PolicySpec(name="random", random_rate=0.3, seed=8)
    assert decisions != [should_refine(other_seed, 0.0, f"q{i}") for i in range(4000)]
    assert 0.0 <= stable_uniform(1, "x") < 1.0


def test_random_policy_in_pipeline(pipeline):
    records = run_all(pipeline, 8, name="random", random_rate=0.5, seed=3)
    expected = [stable_uniform(3, f"q{i}") < 0.5 for i in range(8)]
    assert [r.refined for r in records] == expected


def test_entropy_refines_exactly_the_unsure(pipeline):
    baseline = run_all(pipeline, 8, name="never")
    scores = [r.uncertainty for r in baseline]
    threshold = float(np.median(scores))
    gated = run_all(pipeline, 8, name="entropy", threshold=threshold)
    assert [r.refined for r in gated] == [s >= threshold for s in scores]
    assert any(r.refined for r in gated) and not all(r.refined for r in gated)
    for before, after in zip(baseline, gated):
        assert after.first_answer == before.first_answer and after.uncertainty == pytest.approx(before.uncertainty)


@pytest.mark.parametrize("kind", ["shannon", "margin"])
def test_other_score_kinds_drive_the_gate(pipeline, kind):
    rec = run_all(pipeline, 1, name="entropy", score=kind, threshold=-1.0)[0]
    assert rec.refined and rec.score_kind == kind and rec.uncertainty == rec.uncertainties[kind]


def test_record_serialises(pipeline):
    import json

    rec = run_all(pipeline, 1, name="always")[0]
    data = json.loads(json.dumps(rec.to_dict()))
    assert data["total_bytes"] == rec.global_bytes + rec.local_bytes and data["policy"] == "always"


def test_unknown_policy_rejected():
    with pytest.raises(ValueError, match="unknown policy"):
        PolicySpec(name="sometimes")


def test_each_stage_waits_for_the_device_before_its_time_is_taken(tiny_backend, tiny_config, monkeypatch):
    """On accelerators kernels run asynchronously: every timed step must end with the backend's
    synchronize, so queued work is billed to the step that queued it."""
    import time

    from collab.pipeline import ReferencePipeline

    calls = []

    def slow_sync():
        calls.append(1)
        time.sleep(0.03)

    monkeypatch.setattr(tiny_backend, "synchronize", slow_sync)
    pipe = ReferencePipeline(tiny_backend, tiny_config)
    record = pipe.run(scene(3), "what number is in the red circle?", policy=pipe.policy(name="always"))
    assert set(record.times_ms) == {
        "edge_global",
        "encode_global",
        "first_pass",
        "attention",
        "roi_search",
        "edge_local",
        "encode_local",
        "refine",
    }
    assert len(calls) == len(record.times_ms)
    assert all(ms >= 30 for ms in record.times_ms.values())
