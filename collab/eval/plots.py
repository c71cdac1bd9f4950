"""PNG plots of an evaluation report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from collab.config import POLICIES  # noqa: E402
from collab.eval.report import correct_mask  # noqa: E402
from collab.eval.runner import EvalItem, ItemOutcome  # noqa: E402
from collab.uncertainty import SCORE_KINDS, shared_histograms  # noqa: E402

TITLES = {"min_entropy": "min-entropy (bits)", "shannon": "Shannon entropy (bits)", "margin": "1 - margin"}


def plot_separability(outcomes: list[ItemOutcome], report: dict, path: Path, bins: int = 20) -> Path:
    correct = correct_mask(outcomes)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, kind in zip(axes, SCORE_KINDS):
        u = np.array([o.uncertainty(kind) for o in outcomes])
        stats = report["separability"].get(kind)
        if correct.any() and (~correct).any():
            p_wrong, p_right, edges = shared_histograms(u[~correct], u[correct], bins)
            centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
            ax.bar(
                centers, p_right, width=width, alpha=0.55, label=f"correct (n={int(correct.sum())})", color="tab:green"
            )
            ax.bar(
                centers,
                p_wrong,
                width=width,
                alpha=0.55,
                label=f"incorrect (n={int((~correct).sum())})",
                color="tab:red",
            )
        title = TITLES[kind]
        if stats:
            title += f"\noverlap {stats['overlap']:.2f}  BD {stats['bhattacharyya']:.2f}  AUC {stats['auc']:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("uncertainty (higher = less sure)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of answers")
    fig.suptitle("First-pass uncertainty: correct vs incorrect answers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


POLICY_MARKERS = {"never": "s", "always": "^", "entropy": "*", "random": "x", "adaptive": "D"}


def plot_sweep(report: dict, path: Path) -> Path:
    sweep = sorted(report["sweep"], key=lambda p: p["extra_bytes_mean"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(
        [p["extra_bytes_mean"] / 1024 for p in sweep],
        [100 * p["accuracy"] for p in sweep],
        "o-",
        ms=3,
        label="entropy (threshold sweep)",
    )
    ax.plot(
        [p["random_extra_bytes_mean"] / 1024 for p in sweep],
        [100 * p["random_accuracy"] for p in sweep],
        "--",
        color="gray",
        label="random (matched rate, expected)",
    )
    pol = report["policies"]
    for name in POLICIES:
        marker = POLICY_MARKERS[name]
        if name in pol:
            ax.plot(
                pol[name]["extra_bytes_mean"] / 1024,
                100 * pol[name]["accuracy"],
                marker,
                ms=11,
                label=f"{name} ({100 * pol[name]['accuracy']:.1f}%)",
            )
    full = report["bytes"]["full_resolution_mean"] / 1024
    ax.set_xlabel("extra uplink per query (KiB, local images)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(
        f"Accuracy vs retransmission  (global {report['bytes']['global_mean'] / 1024:.1f} KiB, full-res {full:.0f} "
        "KiB)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layers(report: dict, chosen_layer: int | None, path: Path) -> Path | None:
    """Each layer's RoI hit rate alone; `chosen_layer` (orange) is the configured one, None where
    the RoI reads (layer, head) pairs across layers (attention.layer_heads), drawn as a line."""
    layers = report.get("layers") or {}
    if not layers:
        return None
    keys = sorted(layers, key=int)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(keys) + 2), 3.2))
    colors = ["tab:orange" if chosen_layer is not None and int(k) == chosen_layer else "tab:blue" for k in keys]
    ax.bar(keys, [layers[k] for k in keys], color=colors)
    ax.set_ylim(0, 1)
    if chosen_layer is None and report.get("roi", {}).get("hit_rate") is not None:
        ax.axhline(report["roi"]["hit_rate"], color="tab:orange", linestyle="--", label="configured layer_heads")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("decoder layer" + (" (orange: configured)" if chosen_layer is not None else ""))
    ax.set_ylabel("RoI hit rate (fine questions)")
    ax.set_title("Where does attention localise? (layer sweep)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_examples(
    outcomes: list[ItemOutcome],
    items: dict[str, EvalItem],
    path: Path,
    limit: int = 8,
    attention: str = "rel. attention",
) -> Path | None:
    """Original with ground-truth (green) and RoI (red) boxes, and the relative-attention grid."""
    rows = [o for o in outcomes if o.attention is not None][:limit]
    if not rows:
        return None
    fig, axes = plt.subplots(2, len(rows), figsize=(2.6 * len(rows), 5.6), squeeze=False)
    for col, o in enumerate(rows):
        image = items[o.question_id].load()
        ax = axes[0, col]
        ax.imshow(image)
        for box, color in ((o.target_box, "lime"), (o.roi_box, "red")):
            if box:
                ax.add_patch(
                    plt.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, lw=2, ec=color)
                )
        ax.set_title(f"{o.question[:34]}\n1st: {o.first_answer} → {o.refined_answer} (gt {o.answers[0]})", fontsize=6)
        ax.axis("off")
        axes[1, col].imshow(o.attention, cmap="magma")
        axes[1, col].set_title(f"{attention}, u={o.uncertainty('min_entropy'):.2f}", fontsize=6)
        axes[1, col].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
