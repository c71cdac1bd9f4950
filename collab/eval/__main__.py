"""Evaluate the method: calibration, threshold sweep, bytes vs accuracy, RoI quality, layer sweep.

    python -m collab.eval --synthetic 4242:500 --out runs/eval
    python -m collab.eval --dataset /data/textvqa --config configs/llava-1.5-7b.yaml --out runs/textvqa

Writes OUT/report.json, OUT/items.jsonl (one row per item) and PNG plots, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from collab.adaptive import CalibrationCurve
from collab.backends import ModelLoadError, load_backend
from collab.config import ConfigError, load_config, parse_sets
from collab.data.synthetic import parse_split
from collab.eval import plots
from collab.eval.report import build_report, calibrate_threshold
from collab.eval.runner import EvalItem, Evaluator, dataset_items, decisions, synthetic_items
from collab.paths import DEFAULT_CONFIG, REPO_ROOT
from collab.policies import POLICIES, PolicySpec

OFFLINE_POLICIES = tuple(p for p in POLICIES if p != "adaptive")


def split_spec(text: str) -> tuple[int, int]:
    try:
        return parse_split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collab.eval",
        description="Evaluate entropy-gated, attention-guided refinement on a synthetic split or a local "
        "VQA dataset. Each item is run once through every path (first pass, refine with our RoI, refine "
        "with the ground-truth crop); every policy and threshold is then scored from those outcomes.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", type=split_spec, metavar="SEED:N", help="generate N synthetic items with SEED")
    src.add_argument("--dataset", metavar="PATH", help="local dataset: our layout, TextVQA json or VQAv2 files")
    p.add_argument("--limit", type=int, help="with --dataset: first N questions only")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    p.add_argument("--model", help="override model.path")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set attention.layer=2 --set attention.relative=false (YAML values)",
    )
    p.add_argument(
        "--policies",
        default=",".join(OFFLINE_POLICIES),
        help=f"comma list of {','.join(POLICIES)} (default: %(default)s; offline, with no load, adaptive is "
        "entropy at the static threshold)",
    )
    p.add_argument(
        "--write-curve",
        metavar="PATH",
        help="also write the adaptive policy's calibration curve (threshold -> refine rate, crop bytes) of "
        "this split to PATH: run it on a calibration split, never on an evaluation one",
    )
    p.add_argument("--threshold", type=float, help="entropy threshold (default: config gate.threshold)")
    p.add_argument(
        "--calibrate",
        type=split_spec,
        metavar="SEED:N",
        help="pick the threshold on a separate synthetic split: the highest threshold whose accuracy is "
        "within --tolerance of `always` at --confidence",
    )
    p.add_argument(
        "--tolerance", type=float, default=0.005, help="accuracy slack for --calibrate (default: %(default)s = 0.5 pt)"
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="one-sided confidence that the calibrated threshold stays within --tolerance (default: %(default)s; "
        "0.5: the highest threshold that looks within it on the calibration split, which overfits its noise)",
    )
    p.add_argument("--random-rate", type=float, help="refine probability of `random` (default: entropy's refine rate)")
    p.add_argument(
        "--layers", default="all", help="decoder layers for the RoI layer sweep: 'all', 'none' or a comma list"
    )
    p.add_argument("--out", default="runs/eval", help="output directory (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    bad = [s for s in policies if s not in POLICIES]
    if bad:
        print(f"error: unknown policies {bad}; choose from {list(POLICIES)}", file=sys.stderr)
        return 2
    if args.calibrate and args.synthetic and args.calibrate[0] == args.synthetic[0]:
        print("error: --calibrate must use a different seed than the evaluated split", file=sys.stderr)
        return 2
    try:
        overrides = parse_sets(args.set, args.model)
        config = load_config(args.config, overrides or None)
        backend = load_backend(config.model, search_roots=[REPO_ROOT])
    except (ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_layers = backend.info.num_layers
    layers = {"all": list(range(n_layers)), "none": []}.get(args.layers)
    if layers is None:
        layers = [int(x) % n_layers for x in args.layers.split(",")]
    try:
        evaluator = Evaluator(backend, config, layers=layers)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    spec = PolicySpec.from_gate(config.gate, threshold=args.threshold)
    calibration = None
    if args.calibrate:
        seed, n = args.calibrate
        cal = Evaluator(backend, config, layers=[]).run(
            synthetic_items(seed, n), total=n, desc=f"calibrating {seed}:{n}"
        )
        threshold = calibrate_threshold(cal, spec, args.tolerance, args.confidence)
        spec = replace(spec, threshold=threshold)
        calibration = {
            "split": f"synthetic {seed}:{n}",
            "threshold": threshold,
            "tolerance": args.tolerance,
            "confidence": args.confidence,
        }

    if args.synthetic:
        seed, n = args.synthetic
        items: list[EvalItem] = list(synthetic_items(seed, n))
        from collab.data.synthetic import GENERATOR_VERSION

        fine = [it for it in items if it.kind == "fine"]
        dataset = {
            "kind": "synthetic",
            "seed": seed,
            "n": n,
            "generator_version": GENERATOR_VERSION,
            "lookalike_share": float(np.mean([it.lookalike for it in fine])) if fine else None,
        }
    else:
        items = dataset_items(args.dataset, args.limit)
        dataset = {"kind": "local", "path": str(args.dataset), "n": len(items)}
    if not items:
        print("error: no items to evaluate", file=sys.stderr)
        return 2
    outcomes = evaluator.run(items, total=len(items))

    # `random` defaults to entropy's refine rate so the two are compared at equal bytes.
    if args.random_rate is None and "entropy" in policies:
        rate = float(decisions(outcomes, replace(spec, name="entropy")).mean())
    else:
        rate = args.random_rate if args.random_rate is not None else spec.random_rate
    spec = replace(spec, random_rate=rate)
    report = build_report(outcomes, spec, policies)
    report.update(
        {
            "dataset": dataset,
            "config": config.model_dump(mode="json"),
            "gate": {**spec.__dict__},
            "calibration": calibration,
            "model": asdict(backend.info),
            "seconds": round(time.time() - started, 1),
        }
    )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if args.write_curve:
        source = f"{dataset['kind']} {args.synthetic[0]}:{args.synthetic[1]}" if args.synthetic else str(args.dataset)
        local = [o.local_bytes for o in outcomes]
        curve = CalibrationCurve.from_sweep(report["sweep"], local, source=source, model=config.model.path)
        print(f"calibration curve -> {curve.save(args.write_curve)}")
    with open(out / "items.jsonl", "w") as f:
        for o in outcomes:
            row = {k: v for k, v in o.__dict__.items() if k != "attention"}
            f.write(json.dumps(row) + "\n")
    by_id = {it.question_id: it for it in items}
    plots.plot_separability(outcomes, report, out / "separability.png")
    plots.plot_sweep(report, out / "sweep.png")
    chosen_layer = None if config.attention.layer_heads is not None else config.attention.layer % n_layers
    plots.plot_layers(report, chosen_layer, out / "layers.png")
    att = config.attention
    label = ("rel. " if att.relative else "") + (
        "attention, question rows" if att.query_rows == "question" else "attention"
    )
    plots.plot_examples(outcomes, by_id, out / "examples.png", attention=label)
    print_summary(report, out)
    return 0


def print_summary(report: dict, out: Path) -> None:
    print(f"\n{report['n']} items -> {out}/report.json")
    print(f"{'policy':10s} {'accuracy':>9s} {'refine':>7s} {'extra KiB':>10s} {'total KiB':>10s}")
    for name, r in report["policies"].items():
        print(
            f"{name:10s} {100 * r['accuracy']:8.1f}% {100 * r['refine_rate']:6.1f}% "
            f"{r['extra_bytes_mean'] / 1024:10.2f} {r['total_bytes_mean'] / 1024:10.2f}"
        )
    always = report["policies"].get("always")
    if always and always["extra_bytes_mean"] and "entropy" in report["policies"]:
        share = report["policies"]["entropy"]["extra_bytes_mean"] / always["extra_bytes_mean"]
        print(f"entropy's extra bytes: {100 * share:.1f} % of always'")
    for name, r in report.get("reference_gates", {}).items():
        print(
            f"reference gate {name:10s} (not deployable): accuracy {100 * r['accuracy']:.1f}%  refine "
            f"{100 * r['refine_rate']:.1f}%  extra bytes {100 * r['bytes_share_of_always']:.1f} % of always'"
        )
    print(f"full-resolution upload: {report['bytes']['full_resolution_mean'] / 1024:.1f} KiB/query")
    for kind, s in report["separability"].items():
        if s:
            print(
                f"separability {kind:12s} overlap {s['overlap']:.3f}  bhattacharyya {s['bhattacharyya']:.3f}  auc "
                f"{s['auc']:.3f}"
            )
    roi = report["roi"]
    if roi["hit_rate"] is not None:
        on_any = f"  on some object {roi['object_hit_rate']:.3f}" if roi.get("object_hit_rate") is not None else ""
        print(
            f"RoI (fine): hit rate {roi['hit_rate']:.3f}{on_any}  mean IoU {roi['mean_iou']:.3f}  "
            f"area {roi['area_fraction']:.3f}  (n={roi['n']})"
        )
        if roi.get("hit_rate_by_objects"):
            print(
                "RoI hit rate by objects in the scene: "
                + "  ".join(f"{k}: {v:.2f}" for k, v in roi["hit_rate_by_objects"].items())
            )
        if roi.get("hit_rate_by_lookalike"):
            print(
                "RoI hit rate with / without a look-alike distractor: "
                + " / ".join(f"{roi['hit_rate_by_lookalike'].get(k, float('nan')):.2f}" for k in ("yes", "no"))
            )
        if roi.get("by_lookalike_kind"):
            print(
                "RoI hit rate / fine + our RoI by what the look-alikes share: "
                + "  ".join(
                    f"{k} {v['hit_rate']:.2f} / {100 * v['refined_accuracy']:.0f}% (n={v['n']})"
                    for k, v in roi["by_lookalike_kind"].items()
                )
            )
    if report["layers"]:
        print("layer hit rates: " + "  ".join(f"L{k}={v:.2f}" for k, v in report["layers"].items()))
    by_qtype = {k: v for k, v in report.get("stages_by_qtype", {}).items() if k != "all"}  # "all" is printed above
    for kind, s in [*report["stages"].items(), *by_qtype.items()]:
        gt = f"{100 * s['refined_gt_crop']:.1f}%" if s["refined_gt_crop"] is not None else "-"
        print(
            f"stage accuracy [{kind}]: first {100 * s['first_pass']:.1f}%  refined(RoI) {100 * s['refined_roi']:.1f}%  "
            f"refined(GT crop) {gt}  right->wrong {s['right_to_wrong']}  wrong->right {s['wrong_to_right']}"
        )


if __name__ == "__main__":
    sys.exit(main())
