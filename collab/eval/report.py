"""Aggregate per-item outcomes into the report: policies, separability, sweep, RoI quality, layers.

Report keys are stable so runs can be compared: `policies.<name>.{accuracy, refine_rate,
extra_bytes_mean, total_bytes_mean}`, `separability.<score>.{overlap, bhattacharyya, auc}`,
`roi.{hit_rate, mean_iou, area_fraction, object_hit_rate, hit_rate_by_objects, hit_rate_by_lookalike,
by_lookalike_kind}`,
`sweep` (list of points), `layers`, `aggregation`, `stages`, `n`,
`reference_gates.<fine_items|crop_helps>.{accuracy, refine_rate, bytes_share_of_always}`.
"""

from __future__ import annotations

from dataclasses import replace
from statistics import NormalDist

import numpy as np

from collab.data.synthetic import LOOKALIKE_KINDS
from collab.eval.runner import ItemOutcome, decisions, length_key, policy_result
from collab.geometry import Box
from collab.policies import PolicySpec
from collab.uncertainty import SCORE_KINDS, separability


def correct_mask(outcomes: list[ItemOutcome]) -> np.ndarray:
    """A first-pass answer counts as correct when its VQA accuracy is at least 0.5."""
    return np.array([o.first_acc >= 0.5 for o in outcomes])


def separability_table(outcomes: list[ItemOutcome], length: str = "all", bins: int = 20) -> dict:
    """Incorrect vs correct first-pass answers, per score kind (the paper's Table II)."""
    correct = correct_mask(outcomes)
    if correct.all() or not correct.any():
        return {k: None for k in SCORE_KINDS}
    out = {}
    for kind in SCORE_KINDS:
        u = np.array([o.uncertainty(kind, length) for o in outcomes])
        out[kind] = separability(u[~correct], u[correct], bins).as_dict()
    return out


def expected_random_accuracy(outcomes: list[ItemOutcome], rate: float) -> float:
    """Expected accuracy of refining a random `rate` of the queries (exact, no sampling noise)."""
    first = np.array([o.first_acc for o in outcomes])
    refined = np.array([o.refined_acc for o in outcomes])
    return float(((1 - rate) * first + rate * refined).mean())


def reference_gates(outcomes: list[ItemOutcome]) -> dict:
    """Two gates no server can run, as bounds for the ones it can: `fine_items` refines exactly the
    questions that need the detail (the best a gate that cannot foresee the RoI's success can do
    when every fine question is unsure), `crop_helps` exactly those whose answer the crop makes
    more right. Each with its extra bytes as a share of `always`'."""
    always = float(np.mean([o.local_bytes for o in outcomes])) if outcomes else 0.0
    gates = {
        "fine_items": np.array([o.kind == "fine" for o in outcomes], dtype=bool),
        "crop_helps": np.array([o.refined_acc > o.first_acc for o in outcomes], dtype=bool),
    }
    out = {}
    for name, refine in gates.items():
        res = policy_result(outcomes, refine)
        out[name] = {**res, "bytes_share_of_always": res["extra_bytes_mean"] / always if always else 0.0}
    return out


def gate_scores(outcomes: list[ItemOutcome], spec: PolicySpec) -> np.ndarray:
    """Each item's uncertainty as `spec`'s gate reads it (its score kind and aggregation length)."""
    return np.array([o.uncertainty(spec.score, length_key(spec.aggregation_length)) for o in outcomes])


def sweep_thresholds(u: np.ndarray, spec: PolicySpec, points: int) -> list[float]:
    """The thresholds a sweep visits: `points` quantiles of the scores `u`, one above them all
    (refine nothing) and the configured threshold."""
    return sorted(set(np.quantile(u, np.linspace(0, 1, points)).tolist()) | {float(u.max()) + 1e-9, spec.threshold})


def threshold_sweep(outcomes: list[ItemOutcome], spec: PolicySpec, points: int = 25) -> list[dict]:
    """Accuracy vs extra bytes of `entropy` over thresholds, with random at the matched rate."""
    u = gate_scores(outcomes, spec)
    local = np.array([o.local_bytes for o in outcomes])
    rows = []
    for t in sweep_thresholds(u, spec, points):
        refine = u >= t
        res = policy_result(outcomes, refine)
        rows.append(
            {
                "threshold": float(t),
                "refine_rate": res["refine_rate"],
                "accuracy": res["accuracy"],
                "extra_bytes_mean": res["extra_bytes_mean"],
                "random_accuracy": expected_random_accuracy(outcomes, res["refine_rate"]),
                "random_extra_bytes_mean": float(local.mean() * res["refine_rate"]),
            }
        )
    return rows


def calibrate_threshold(
    outcomes: list[ItemOutcome], spec: PolicySpec, tolerance: float = 0.005, confidence: float = 0.95
) -> float:
    """The highest threshold (fewest refinements) whose accuracy is within `tolerance` of `always`
    at one-sided `confidence`: the mean accuracy lost by the items it leaves unrefined, plus z
    standard errors of that mean, is at most `tolerance`. The highest threshold that merely looks
    within tolerance is the luckiest point of a noisy curve: on 150 items of one seed it stopped
    refining where refining still paid, and lost 1.2 pt on the same seed's next 250
    (docs/embedded_model.md). `confidence` 0.5 (z = 0) is that point rule."""
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    z = NormalDist().inv_cdf(confidence)
    u = gate_scores(outcomes, spec)
    gain = np.array([o.refined_acc - o.first_acc for o in outcomes], dtype=float)
    ok = []
    for t in sweep_thresholds(u, spec, points=101):
        lost = gain * (u < t)  # what each item left unrefined costs against `always`
        bound = lost.mean() + (z * lost.std(ddof=1) / np.sqrt(len(lost)) if len(lost) > 1 else 0.0)
        if bound <= tolerance + 1e-12:
            ok.append(t)
    return max(ok) if ok else float("-inf")


def roi_quality(outcomes: list[ItemOutcome], kind: str | None = "fine") -> dict:
    """Hit rate (GT centre in box), mean IoU and box area fraction over items with a target box."""
    rows = [o for o in outcomes if o.target_box is not None and (kind is None or o.kind == kind)]
    if not rows:
        return {"hit_rate": None, "mean_iou": None, "area_fraction": None, "object_hit_rate": None, "n": 0}
    hits, ious, areas = [], [], []
    for o in rows:
        box, target = Box.from_seq(o.roi_box), Box.from_seq(o.target_box)
        hits.append(box.contains_point(*target.center))
        ious.append(box.iou(target))
        areas.append(box.area / float(o.original_size[0] * o.original_size[1]))
    return {
        "hit_rate": float(np.mean(hits)),
        "mean_iou": float(np.mean(ious)),
        "area_fraction": float(np.mean(areas)),
        # on SOME annotated object, the asked one or not (hit_rate far below it: attention finds
        # objects but not the one the question names); None without object annotations
        "object_hit_rate": float(np.mean(annotated))
        if (annotated := [o.object_hit for o in rows if o.object_hit is not None])
        else None,
        # hit rate by objects in the scene (annotated data only): chance falls as 1/n, so binding
        # shows on crowded scenes; {"2": rate, ...}
        "hit_rate_by_objects": {
            str(n): float(np.mean([h for h, o in zip(hits, rows) if o.n_objects == n]))
            for n in sorted({o.n_objects for o in rows if o.n_objects is not None})
        },
        # hit rate where another object shares the target's colour or shape ("yes") and where none
        # does ("no"): a model that names objects by one attribute fails the first
        "hit_rate_by_lookalike": {
            key: float(np.mean([h for h, o in zip(hits, rows) if o.lookalike is flag]))
            for key, flag in (("yes", True), ("no", False))
            if any(o.lookalike is flag for o in rows)
        },
        # by which attribute the look-alikes share (synthetic.lookalike_kind): hit rate and accuracy
        # with our RoI, and items; a look found by colour only fails on "color" and "both"
        "by_lookalike_kind": {
            kind: {
                "hit_rate": float(np.mean([h for h, o in zip(hits, rows) if o.lookalike_kind == kind])),
                "refined_accuracy": float(np.mean([o.refined_acc for o in rows if o.lookalike_kind == kind])),
                "n": sum(o.lookalike_kind == kind for o in rows),
            }
            for kind in LOOKALIKE_KINDS
            if any(o.lookalike_kind == kind for o in rows)
        },
        "n": len(rows),
    }


def layer_sweep(outcomes: list[ItemOutcome], kind: str | None = "fine") -> dict[str, float]:
    rows = [o for o in outcomes if o.layer_hits and (kind is None or o.kind == kind)]
    if not rows:
        return {}
    layers = sorted(rows[0].layer_hits)
    return {str(layer): float(np.mean([o.layer_hits[layer] for o in rows])) for layer in layers}


def stage_table(outcomes: list[ItemOutcome], by: str = "kind") -> dict:
    """Accuracy per group and stage, and how the second stage changed answers (always refine).

    `by` is the ItemOutcome field that groups items: "kind" (fine/coarse) or "qtype" (question type:
    which ability fails, e.g. shape questions at chance while colour questions are right)."""
    kinds = sorted({getattr(o, by) for o in outcomes if getattr(o, by)}) or [None]
    table = {}
    for kind in kinds + (["all"] if kinds != [None] else []):
        rows = [o for o in outcomes if kind in ("all", None) or getattr(o, by) == kind]
        first = np.array([o.first_acc >= 0.5 for o in rows])
        refined = np.array([o.refined_acc >= 0.5 for o in rows])
        gt = [o.gt_refined_acc for o in rows if o.gt_refined_acc is not None]
        table[str(kind)] = {
            "n": len(rows),
            "first_pass": float(np.mean([o.first_acc for o in rows])),
            "refined_roi": float(np.mean([o.refined_acc for o in rows])),
            "refined_gt_crop": float(np.mean(gt)) if gt else None,
            "right_to_wrong": int((first & ~refined).sum()),
            "wrong_to_right": int((~first & refined).sum()),
        }
    return table


def build_report(outcomes: list[ItemOutcome], spec: PolicySpec, policies: list[str]) -> dict:
    """The whole report for one evaluated split."""
    n = len(outcomes)
    results = {}
    for name in policies:
        refine = decisions(outcomes, replace(spec, name=name))  # the serving gate's own rule, per policy
        results[name] = policy_result(outcomes, refine)
    if "entropy" in results:
        rate = results["entropy"]["refine_rate"]
        results["entropy"]["random_at_same_rate_accuracy"] = expected_random_accuracy(outcomes, rate)
    full = float(np.mean([o.full_bytes for o in outcomes]))
    return {
        "n": n,
        "policies": results,
        "separability": separability_table(outcomes),
        "aggregation": {length: separability_table(outcomes, length) for length in ("1", "2", "all")},
        "sweep": threshold_sweep(outcomes, spec),
        "roi": {**roi_quality(outcomes, "fine"), "all_targets": roi_quality(outcomes, None)},
        "layers": layer_sweep(outcomes, "fine"),
        "stages": stage_table(outcomes),
        "stages_by_qtype": stage_table(outcomes, "qtype") if any(o.qtype for o in outcomes) else {},
        "bytes": {
            "global_mean": float(np.mean([o.global_bytes for o in outcomes])),
            "local_mean": float(np.mean([o.local_bytes for o in outcomes])),
            "full_resolution_mean": full,
        },
        "reference_gates": reference_gates(outcomes),
    }
