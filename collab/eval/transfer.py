"""Does a threshold calibrated on one split hold on others? Refine-rate and accuracy drift.

    python -m collab.eval.transfer --calibrate 1001:150 --splits 4242:200,7331:200 [--dataset DIR]

A static entropy threshold is calibrated once (on `--calibrate`: the highest threshold within
`--tolerance` of `always` at `--confidence`, as `collab.eval --calibrate` picks it). On another split the same number
can refine far more or far less: the scores move with the images and questions. For each split this
reports, next to the calibration split's own figures:

- **static**: the calibrated threshold as it is: refine rate, accuracy, extra bytes;
- **rate-held**: the adaptive policy's offline equivalent. Without load its controller keeps the
  static threshold; what it adds offline is the calibration curve, which turns a refine-rate
  budget into a threshold. Holding the calibration split's refine rate on the new split (the
  threshold at that quantile of the split's own scores, which a running server would track from
  its recent first passes) shows what a rate budget keeps and what it loses against the static
  threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from collab.data.synthetic import parse_split
from collab.eval.report import calibrate_threshold, gate_scores
from collab.eval.runner import Evaluator, dataset_items, policy_result, synthetic_items
from collab.policies import PolicySpec


def row(outcomes, refine: np.ndarray, threshold: float) -> dict:
    res = policy_result(outcomes, refine)
    return {
        "threshold": float(threshold) if np.isfinite(threshold) else None,
        "refine_rate": res["refine_rate"],
        "accuracy": res["accuracy"],
        "extra_bytes_mean": res["extra_bytes_mean"],
    }


def transfer_table(
    calibration, splits: dict[str, list], spec: PolicySpec, tolerance: float, confidence: float = 0.95
) -> dict:
    """{"threshold", "calibration": {...}, "splits": {name: {"static", "rate_held", "never", "always"}}}."""
    threshold = calibrate_threshold(calibration, spec, tolerance, confidence)
    cal_u = gate_scores(calibration, spec)
    target = float((cal_u >= threshold).mean())
    out = {"threshold": threshold, "target_refine_rate": target, "splits": {}}

    def entry(outcomes) -> dict:
        u = gate_scores(outcomes, spec)
        held = float(np.quantile(u, 1 - target)) if 0 < target < 1 else (np.inf if target == 0 else -np.inf)
        return {
            "static": row(outcomes, u >= threshold, threshold),
            "rate_held": row(outcomes, u >= held, held),
            "never": row(outcomes, np.zeros(len(u), bool), np.inf),
            "always": row(outcomes, np.ones(len(u), bool), -np.inf),
        }

    out["calibration"] = entry(calibration)
    for name, outcomes in splits.items():
        out["splits"][name] = entry(outcomes)
    return out


def render(table: dict) -> str:
    lines = [
        f"static threshold {table['threshold']:.3f} bits; calibration refine rate {table['target_refine_rate']:.1%}",
        f"{'split':22s} {'static: refine':>14s} {'acc':>6s}   {'rate-held: refine':>17s} {'acc':>6s}   "
        f"{'never':>6s} {'always':>6s}",
    ]
    for name, e in [("calibration", table["calibration"]), *table["splits"].items()]:
        s, h = e["static"], e["rate_held"]
        lines.append(
            f"{name:22s} {s['refine_rate']:14.1%} {s['accuracy']:6.1%}   {h['refine_rate']:17.1%} {h['accuracy']:6.1%}"
            f"   {e['never']['accuracy']:6.1%} {e['always']['accuracy']:6.1%}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collab.eval.transfer",
        description="Calibrate the entropy threshold on one synthetic split and report its refine rate and "
        "accuracy on other splits (and a local dataset), next to holding the calibrated refine rate.",
    )
    p.add_argument("--calibrate", required=True, help="SEED:N of the calibration split")
    p.add_argument("--splits", default="4242:200,7331:200", help="comma list of SEED:N evaluation splits")
    p.add_argument("--dataset", help="also a local dataset (our layout, TextVQA or VQAv2 files)")
    p.add_argument("--limit", type=int, help="with --dataset: first N questions")
    p.add_argument("--config", default=None, help="method config YAML (default: configs/default.yaml)")
    p.add_argument("--model", help="override model.path")
    p.add_argument("--tolerance", type=float, default=0.005, help="accuracy slack of the calibration (0.5 pt)")
    p.add_argument(
        "--confidence", type=float, default=0.95, help="one-sided confidence of that slack (collab.eval --help)"
    )
    p.add_argument("--out", type=Path, help="write OUT/transfer.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from collab.backends import ModelLoadError, load_backend
    from collab.config import ConfigError, load_config, parse_sets
    from collab.paths import DEFAULT_CONFIG, REPO_ROOT

    args = build_parser().parse_args(argv)
    try:
        cal_seed, cal_n = parse_split(args.calibrate)
        splits = [parse_split(s) for s in args.splits.split(",") if s.strip()]
        if any(seed == cal_seed for seed, _ in splits):
            raise ValueError("an evaluation split must not use the calibration seed")
        config = load_config(args.config or DEFAULT_CONFIG, parse_sets([], args.model) or None)
        backend = load_backend(config.model, search_roots=[REPO_ROOT])
    except (ValueError, ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spec = replace(PolicySpec.from_gate(config.gate), name="entropy")
    evaluator = Evaluator(backend, config, layers=[])
    calibration = evaluator.run(synthetic_items(cal_seed, cal_n), total=cal_n, desc=f"calibration {args.calibrate}")
    outcomes = {
        f"synthetic {seed}:{n}": evaluator.run(synthetic_items(seed, n), total=n, desc=f"split {seed}:{n}")
        for seed, n in splits
    }
    if args.dataset:
        items = dataset_items(args.dataset, args.limit)
        outcomes[f"dataset {Path(args.dataset).name}"] = evaluator.run(items, total=len(items), desc="dataset")
    table = transfer_table(calibration, outcomes, spec, args.tolerance, args.confidence)
    table["calibration_split"] = args.calibrate
    print(render(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "transfer.json").write_text(json.dumps(table, indent=1))
        print(f"wrote {args.out / 'transfer.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
