"""Training curves from a run's training_log.jsonl (matplotlib, headless).

python -m collab.training.plots runs/embedded/training_log.jsonl --out docs/embedded_model/training.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(stage-1 rows, stage-2 evaluation rows) of a training log; a continuation's steps count on
    from where the part before it ended, in each stage."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    tower, evals, offset = [], [], {1: 0, 2: 0}
    for r in rows:
        if r.get("stage") == 2 and "global_fine_acc" in r:
            evals.append({**r, "step": r["step"] + offset[2]})
        elif r.get("stage") == 1:
            tower.append({**r, "step": r["step"] + offset[1]})
        elif r.get("stage_done") in offset:
            offset[r["stage_done"]] += r.get("steps", 0)
    return tower, evals


def best_layer(row: dict, mode: str = "rel") -> int | None:
    """The decoder layer whose RoI hit rate is highest in an evaluation row."""
    layers = [int(k[1:].split("_")[0]) for k in row if k.startswith("L") and k.endswith(f"_{mode}_hit")]
    return max(layers, key=lambda layer: row[f"L{layer}_{mode}_hit"]) if layers else None


def plot_log(path: Path, out: Path, layer: int | None = None, mode: str = "rel") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tower, evals = read_log(path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = axes[0]
    for key, label in (
        ("crop_digit_acc", "crop digit"),
        ("object_shape_acc", "object shape (pooled tokens)"),
        ("object_patch_shape_acc", "per-patch shape"),
        ("object_patch_color_acc", "per-patch colour"),
        ("legible_object_digit_acc", "object digit, legible scenes (pooled tokens)"),
    ):
        pts = [(r["step"], r[key]) for r in tower if key in r and r[key] == r[key]]
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1)
    ax.set(title="stage 1: vision tower (training batches)", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, label in (
        ("global_fine_acc", "fine, global only"),
        ("local_fine_acc", "fine, global + crop"),
        ("global_coarse_acc", "coarse, global only"),
        ("local_coarse_acc", "coarse, global + crop"),
        ("global_legible_fine_acc", "fine, legible digits (training only)"),
    ):
        if evals and key in evals[-1]:
            ax.plot([r["step"] for r in evals], [r.get(key) for r in evals], "o-", ms=3, label=label)
    ax.set(title="stage 2: answers (fixed held-out batches)", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    ax.legend(fontsize=7)
    ax = axes[2]
    if evals:
        layer = best_layer(evals[-1], mode) if layer is None else layer
        steps = [r["step"] for r in evals]
        for key, label in (
            (f"L{layer}_{mode}_hit", "RoI on the named object"),
            (f"L{layer}_{mode}_hit2", "... 2-object scenes"),
            (f"L{layer}_{mode}_hit45", "... 4-5 objects"),
            (f"L{layer}_{mode}_some", "RoI on some object"),
        ):
            ax.plot(steps, [r.get(key) for r in evals], "o-", ms=3, label=label)
        ax.axhline(0.5, color="gray", ls=":", lw=1, label="chance on 2 objects")
        ax.set(
            title=f"stage 2: first-pass localisation, layer {layer} "
            f"({'relative' if mode == 'rel' else 'plain'} attention)",
            xlabel="step",
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m collab.training.plots", description="Plot a training run's curves.")
    p.add_argument("log", type=Path, help="training_log.jsonl of a run")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument(
        "--mode",
        choices=["rel", "plain", "qrows"],
        default="rel",
        help="the last input row, relative (ViCrop) or plain, or the question words' rows, relative "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--layer", type=int, help="decoder layer for the localisation panel (default: best at the last evaluation)"
    )
    args = p.parse_args(argv)
    if not args.log.exists():
        print(f"error: {args.log} does not exist", file=sys.stderr)
        return 2
    print(plot_log(args.log, args.out, args.layer, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
