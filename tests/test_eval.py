"""collab.eval on a tiny split: the report has its stable keys and agrees with the pipeline."""

import dataclasses
import json

import numpy as np
import pytest

from collab.eval.__main__ import main as eval_main
from collab.eval.report import calibrate_threshold, threshold_sweep
from collab.eval.runner import Evaluator, decisions, policy_result, synthetic_items
from collab.pipeline import ReferencePipeline
from collab.policies import PolicySpec

SPLIT = (31, 6)


@pytest.fixture(scope="module")
def outcomes(tiny_backend, tiny_config):
    return Evaluator(tiny_backend, tiny_config).run(synthetic_items(*SPLIT), total=SPLIT[1])


def test_cli_writes_report_with_stable_keys(tiny_model_dir, tiny_config, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    out = tmp_path / "eval"
    assert eval_main(["--synthetic", "31:6", "--config", str(cfg), "--out", str(out), "--threshold", "0.1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 6
    for name in ("never", "always", "random", "entropy"):
        for key in ("accuracy", "refine_rate", "extra_bytes_mean", "total_bytes_mean"):
            assert isinstance(report["policies"][name][key], float), (name, key)
    assert report["policies"]["never"]["refine_rate"] == 0.0
    assert report["policies"]["always"]["refine_rate"] == 1.0
    for key in ("hit_rate", "mean_iou"):
        assert key in report["roi"]
    assert set(report["separability"]) == {"min_entropy", "shannon", "margin"}
    assert set(report["aggregation"]) == {"1", "2", "all"}
    assert isinstance(report["sweep"], list) and report["sweep"]
    assert set(report["layers"]) <= {"0", "1"}
    assert report["config"]["model"]["path"] == str(tiny_model_dir) and report["dataset"]["seed"] == 31
    from collab.data.synthetic import generate_items, lookalike_share

    assert report["dataset"]["generator_version"] == "2.0"
    assert report["dataset"]["lookalike_share"] == pytest.approx(
        lookalike_share([it.to_record() for it in generate_items(31, 6)])
    )
    for png in ("separability.png", "sweep.png", "examples.png"):
        assert (out / png).stat().st_size > 1000
    assert len((out / "items.jsonl").read_text().splitlines()) == 6
    assert report["stages_by_qtype"]["all"]["n"] == 6
    assert set(report["reference_gates"]) == {"fine_items", "crop_helps"}


def test_cli_rejects_calibrating_on_the_evaluated_split(capsys):
    assert eval_main(["--synthetic", "5:3", "--calibrate", "5:3"]) == 2
    assert "different seed" in capsys.readouterr().err


def test_cli_bad_split_spec():
    with pytest.raises(SystemExit):
        eval_main(["--synthetic", "five"])


@pytest.mark.parametrize("policy", ["entropy", "always", "never"])
def test_derived_policy_matches_pipeline(outcomes, tiny_backend, tiny_config, policy):
    """Scoring policies from cached outcomes == running the pipeline query by query."""
    threshold = float(np.median([o.uncertainty("min_entropy") for o in outcomes]))
    spec = PolicySpec(name=policy, threshold=threshold)
    derived = decisions(outcomes, spec)
    pipe = ReferencePipeline(tiny_backend, tiny_config)
    items = list(synthetic_items(*SPLIT))
    for item, outcome, refine in zip(items, outcomes, derived):
        rec = pipe.run(item.load(), item.question, question_id=item.question_id, policy=spec)
        assert rec.refined == bool(refine)
        assert rec.first_answer == outcome.first_answer
        if rec.refined:
            assert rec.box == outcome.roi_box and rec.local_bytes == outcome.local_bytes
            assert rec.answer == outcome.refined_answer


def test_sweep_endpoints_are_never_and_always(outcomes):
    spec = PolicySpec(name="entropy")
    sweep = threshold_sweep(outcomes, spec)
    rates = [p["refine_rate"] for p in sweep]
    assert min(rates) == 0.0 and max(rates) == 1.0
    always = policy_result(outcomes, np.ones(len(outcomes), dtype=bool))
    top = max(sweep, key=lambda p: p["refine_rate"])
    assert top["accuracy"] == pytest.approx(always["accuracy"])
    assert top["random_accuracy"] == pytest.approx(always["accuracy"])


def test_calibrated_threshold_meets_tolerance(outcomes):
    spec = PolicySpec(name="entropy")
    t = calibrate_threshold(outcomes, spec, tolerance=0.0)
    refine = np.array([o.uncertainty("min_entropy") >= t for o in outcomes])
    always = policy_result(outcomes, np.ones(len(outcomes), dtype=bool))["accuracy"]
    assert policy_result(outcomes, refine)["accuracy"] >= always


def test_calibration_does_not_stop_refining_where_the_gain_is_only_noise():
    """Below the top scores, refining fixes one item and breaks another in turn (net zero): the
    point rule (confidence 0.5) stops refining them all, the 95 % bound keeps refining where one
    more broken item would cost more than the tolerance."""
    from collab.eval.runner import ItemOutcome

    def item(i: int, score: float, first: float, refined: float) -> ItemOutcome:
        scores = {"min_entropy": score, "shannon": score, "margin": score}
        return ItemOutcome(
            question_id=f"q{i}", question="q", kind="fine", answers=["1"], original_size=(10, 10), target_box=None,
            global_bytes=1, full_bytes=1, first_answer="", first_acc=first,
            uncertainties={k: scores for k in ("1", "2", "all")}, roi_box=[0, 0, 1, 1], roi_ratio=1.0,
            local_bytes=1, refined_answer="", refined_acc=refined,
        )  # fmt: skip

    # 40 sure items, refining changes nothing; 40 mid-score items that refining fixes or breaks
    # in turn; 40 unsure ones that refining fixes
    outcomes = [item(i, 0.1 + i * 1e-3, 1.0, 1.0) for i in range(40)]
    outcomes += [item(40 + i, 1.0 + i * 1e-3, float(i % 2), float(1 - i % 2)) for i in range(40)]
    outcomes += [item(80 + i, 3.0 + i * 1e-3, 0.0, 1.0) for i in range(40)]
    spec = PolicySpec(name="entropy")
    point = calibrate_threshold(outcomes, spec, tolerance=0.005, confidence=0.5)
    bounded = calibrate_threshold(outcomes, spec, tolerance=0.005, confidence=0.95)
    assert point >= 1.039  # skips the coin-flip items too: their gains sum to zero
    assert 0.1 < bounded <= 1.0  # refines them: skipping 40 coin flips is not within 0.5 pt at 95 %
    with pytest.raises(ValueError):
        calibrate_threshold(outcomes, spec, confidence=0.3)


def test_set_overrides_parse_as_yaml():
    from collab.config import ConfigError, parse_sets

    assert parse_sets(["attention.layer=2", "attention.relative=false", "gate.score=shannon"]) == {
        "attention": {"layer": 2, "relative": False},
        "gate": {"score": "shannon"},
    }
    with pytest.raises(ConfigError):
        parse_sets(["attention.layer"])
    assert parse_sets(["model.dtype=bfloat16"], "runs/m") == {"model": {"dtype": "bfloat16", "path": "runs/m"}}
    for bad, model in ((["model=x"], "runs/m"), (["a=1", "a.b=2"], None), (["gate.threshold=[1"], None)):
        with pytest.raises(ConfigError):
            parse_sets(bad, model)


def test_gate_aggregation_length_is_scored_not_replaced(tiny_backend, tiny_config):
    """A gate with L=3 is evaluated on L=3 scores (not silently on all tokens)."""
    config = tiny_config.model_copy(update={"gate": tiny_config.gate.model_copy(update={"aggregation_length": 3})})
    outcomes = Evaluator(tiny_backend, config, layers=[]).run(synthetic_items(31, 2), total=2)
    assert {"1", "2", "3", "all"} <= set(outcomes[0].uncertainties)
    spec = PolicySpec(name="entropy", aggregation_length=3, threshold=0.0)
    assert decisions(outcomes, spec).all()
    with pytest.raises(ValueError, match="L=4"):
        decisions(outcomes, PolicySpec(name="entropy", aggregation_length=4))


def test_stage_table_by_question_type(outcomes):
    """Per question type: every item counted once, under the synthetic item's own qtype, and each
    group's accuracy is the mean over exactly its items."""
    from collab.data.synthetic import generate_items
    from collab.eval.report import stage_table

    truth = {it.question_id: it.qtype for it in generate_items(*SPLIT)}
    assert [o.qtype for o in outcomes] == [truth[o.question_id] for o in outcomes]
    table = stage_table(outcomes, "qtype")
    groups = set(truth.values())
    assert set(table) == groups | {"all"}
    assert sum(table[g]["n"] for g in groups) == table["all"]["n"] == len(outcomes)
    for g in groups:
        rows = [o for o in outcomes if o.qtype == g]
        assert table[g]["first_pass"] == pytest.approx(np.mean([o.first_acc for o in rows]))
        assert table[g]["refined_roi"] == pytest.approx(np.mean([o.refined_acc for o in rows]))


def test_dataset_items_carry_question_type(tmp_path):
    """Our on-disk layout keeps each item's qtype; the per-type table can group a local dataset too."""
    from collab.data.synthetic import generate_items, write_dataset
    from collab.eval.runner import dataset_items

    write_dataset(tmp_path / "ds", 8, 4, progress=False)
    items = dataset_items(tmp_path / "ds")
    assert [it.qtype for it in items] == [it.qtype for it in generate_items(8, 4)]


def test_object_hit_tells_a_wrong_object_from_background(outcomes, tmp_path):
    """roi.object_hit_rate: the RoI holds the centre of SOME annotated object. Checked against the
    items' own boxes, and equal when the same split is read back from disk."""
    from collab.data.synthetic import generate_items, write_dataset
    from collab.eval.report import roi_quality
    from collab.eval.runner import EvalItem, dataset_items, hit, object_boxes_of, on_some_object

    truth = {it.question_id: it for it in generate_items(*SPLIT)}
    items = list(synthetic_items(*SPLIT))
    assert [it.object_boxes for it in items] == [[o["box"] for o in truth[it.question_id].objects] for it in items]
    write_dataset(tmp_path / "ds", *SPLIT, progress=False)
    assert [it.object_boxes for it in dataset_items(tmp_path / "ds")] == [it.object_boxes for it in items]
    assert object_boxes_of({}) is None and object_boxes_of({"objects": [{"shape": "circle"}]}) is None
    assert EvalItem("q", "?", ["a"], lambda: None).object_boxes is None  # real datasets: no annotations

    named, other = [100, 100, 140, 140], [300, 300, 340, 340]
    assert on_some_object([90, 90, 150, 150], [named, other]) is True  # the asked object
    assert on_some_object([290, 290, 350, 350], [named, other]) is True  # the wrong object: still an object
    assert on_some_object([0, 300, 60, 360], [named, other]) is False  # background
    assert on_some_object([90, 90, 150, 150], None) is None and on_some_object([0, 0, 9, 9], []) is False

    rows = [o for o in outcomes if o.target_box is not None]
    assert rows
    for o in rows:  # the evaluator scores its RoI against each item's own objects
        assert o.object_hit == on_some_object(o.roi_box, [ob["box"] for ob in truth[o.question_id].objects])
        assert o.object_hit or not hit(o.roi_box, o.target_box)  # the asked object is one of them
    q = roi_quality(rows, None)
    assert q["object_hit_rate"] == pytest.approx(np.mean([o.object_hit for o in rows]))
    assert q["object_hit_rate"] >= q["hit_rate"]
    assert roi_quality([dataclasses.replace(o, object_hit=None) for o in rows], None)["object_hit_rate"] is None


def test_hit_rate_by_objects_groups_items_by_their_scene(outcomes):
    """roi.hit_rate_by_objects: each item counts once, under its own scene's object count."""
    from collab.data.synthetic import generate_items
    from collab.eval.report import roi_quality
    from collab.eval.runner import hit

    truth = {it.question_id: len(it.objects) for it in generate_items(*SPLIT)}
    rows = [o for o in outcomes if o.target_box is not None]
    assert all(o.n_objects == truth[o.question_id] for o in rows)
    by = roi_quality(rows, None)["hit_rate_by_objects"]
    for n, rate in by.items():
        group = [o for o in rows if o.n_objects == int(n)]
        assert rate == pytest.approx(np.mean([hit(o.roi_box, o.target_box) for o in group]))
    assert sum(len([o for o in rows if o.n_objects == int(n)]) for n in by) == len(rows)
    assert roi_quality([dataclasses.replace(o, n_objects=None) for o in rows], None)["hit_rate_by_objects"] == {}


def test_hit_rate_by_lookalike_and_the_share_in_the_report(outcomes):
    from collab.data.synthetic import generate_items, has_lookalike, lookalike_kind
    from collab.eval.report import roi_quality
    from collab.eval.runner import hit

    truth = {it.question_id: it for it in generate_items(*SPLIT)}
    rows = [o for o in outcomes if o.target_box is not None]
    for o in rows:
        it = truth[o.question_id]
        assert o.lookalike == has_lookalike(it.objects, it.target_box)
    by = roi_quality(rows, None)["hit_rate_by_lookalike"]
    for key, flag in (("yes", True), ("no", False)):
        group = [o for o in rows if o.lookalike is flag]
        assert (key in by) == bool(group)
        if group:
            assert by[key] == pytest.approx(np.mean([hit(o.roi_box, o.target_box) for o in group]))
    kinds = roi_quality(rows, None)["by_lookalike_kind"]
    for o in rows:
        it = truth[o.question_id]
        assert o.lookalike_kind == lookalike_kind(it.objects, it.target_box)
        assert o.lookalike == (o.lookalike_kind != "none")
    assert sum(v["n"] for v in kinds.values()) == len(rows)
    for kind, v in kinds.items():
        group = [o for o in rows if o.lookalike_kind == kind]
        assert v["hit_rate"] == pytest.approx(np.mean([hit(o.roi_box, o.target_box) for o in group]))
        assert v["refined_accuracy"] == pytest.approx(np.mean([o.refined_acc for o in group]))


def test_reference_gates_bound_the_bytes_of_any_gate(outcomes):
    """`fine_items` refines exactly the fine questions, `crop_helps` exactly the items whose answer
    the crop improves: crop_helps reaches at least `always`' accuracy, and each share is its bytes
    over `always`' bytes."""
    from collab.eval.report import reference_gates

    gates = reference_gates(outcomes)
    always = policy_result(outcomes, np.ones(len(outcomes), dtype=bool))
    fine = [o.kind == "fine" for o in outcomes]
    assert gates["fine_items"]["refine_rate"] == pytest.approx(np.mean(fine))
    assert gates["crop_helps"]["accuracy"] >= always["accuracy"] - 1e-9
    for r in gates.values():
        assert r["bytes_share_of_always"] == pytest.approx(r["extra_bytes_mean"] / always["extra_bytes_mean"])
    helped = [o.local_bytes for o in outcomes if o.refined_acc > o.first_acc]
    assert gates["crop_helps"]["extra_bytes_mean"] == pytest.approx(sum(helped) / len(outcomes))
