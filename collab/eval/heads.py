"""Which (layer, head) pairs should the RoI search read? Chosen on a calibration split.

    python -m collab.eval.heads --model runs/e2e2 --split 1001:200 --out runs/heads

A model puts its looks where its training put them: the shipped model's shape word and colour word
look from heads 1 and 2 of layer 0; a second run of the same recipe put the colour word's look at
layer 1. So the read is measured, not assumed. Each fine item's per-head maps are read once at
every layer, plain and relative to the generic prompt, and reduced over rows as the config's
`attention.rows` says; then any set of pairs is scored without the model: its maps combined by
`attention.head_reduce`, the RoI search run on the result, a hit when the target's centre is in
the box (as `collab.eval` scores it). Greedy forward selection adds the pair that most raises the
hits and stops when none does by at least --min-gain; it runs for plain and for relative maps, and
the better read wins (a tie: the config's). It prints each pair's hit rate alone and the selection
paths, and writes heads.json with the chosen `attention.layer_heads` and `attention.relative`.

Run it on a calibration split, never on the split you report.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collab import stages
from collab.attention import per_head_maps, reduce_heads
from collab.config import ConfigError, load_config, parse_sets
from collab.data.synthetic import parse_split
from collab.eval.runner import hit, synthetic_items
from collab.imaging import decode_image, global_payload, load_image
from collab.progress import progress

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ItemMaps:
    """One fine item's per-(layer, head) maps, row-reduced: (layers * heads, grid cells), by
    whether they are relative to the generic prompt."""

    question_id: str
    maps: dict[bool, np.ndarray]
    grid: tuple[int, int]
    original_size: tuple[int, int]
    global_size: tuple[int, int]
    target_box: list[int]


def collect(backend, config, seed: int, n: int, show_progress: bool = True) -> list[ItemMaps]:
    """Every layer's every head's map for the fine items among the split's first n."""
    info, im = backend.info, config.imaging
    cfg = config.attention.model_copy(update={"relative": True})  # the generic rows too: both reads are scored
    layers = list(range(info.num_layers))
    out = []
    items = [it for it in synthetic_items(seed, n) if it.kind == "fine" and it.target_box is not None]
    for item in progress(items, desc=f"heads: reading {seed}:{n}", disable=not show_progress):
        original = load_image(item.load())
        global_size = info.global_size(original.size)
        sent = global_payload(original, global_size, im.global_mode, im.format, im.jpeg_quality, im.pad_color)
        features = backend.encode_images([decode_image(sent.data)])[0]
        answer_ids: list[int] = []
        if cfg.query_rows in ("answer", "all"):
            gen = backend.generate([features], item.question)
            answer_ids = gen.token_ids[: gen.n_answer_tokens]
        request = stages.MapRequest(features, item.question, answer_ids)
        (questions,), (generic,) = stages.head_rows_batch(backend, [request], cfg, layers, None)
        flat = [(q.reshape(*q.shape[:2], -1), g.reshape(*g.shape[:2], -1)) for q, g in zip(questions, generic)]
        maps = {
            relative: np.concatenate(
                [per_head_maps(q, g if relative else None, cfg.rows, cfg.epsilon) for q, g in flat]
            )
            for relative in (False, True)
        }
        grid = questions[0].shape[2:]
        out.append(ItemMaps(item.question_id, maps, grid, original.size, global_size, item.target_box))
    return out


def rois(items: list[ItemMaps], pairs: list[int], relative: bool, config, encoder_size) -> list[list[int]]:
    """Each item's RoI box (original pixels) read from these pair indices."""
    out = []
    for it in items:
        grid = reduce_heads(it.maps[relative][pairs], config.attention.head_reduce).reshape(it.grid)
        roi = stages.locate(
            grid, it.original_size, it.global_size, config.imaging.global_mode, config.roi, encoder_size
        )
        out.append(roi.box.as_list())
    return out


def hits(items: list[ItemMaps], pairs: list[int], relative: bool, config, encoder_size) -> np.ndarray:
    """Whether the RoI read from these pair indices holds each item's target."""
    boxes = rois(items, pairs, relative, config, encoder_size)
    return np.asarray([hit(box, it.target_box) for box, it in zip(boxes, items)], dtype=bool)


def select(
    items: list[ItemMaps], n_heads: int, relative: bool, config, encoder_size, max_pairs: int, min_gain: float
) -> dict:
    """Each pair alone, and greedy forward selection by hit count (ties: the lower layer, head):
    the best pair first, then a pair only where it adds at least `min_gain` to the hit rate."""
    n_pairs = items[0].maps[relative].shape[0]
    name = [(p // n_heads, p % n_heads) for p in range(n_pairs)]
    alone = {p: hits(items, [p], relative, config, encoder_size) for p in range(n_pairs)}
    chosen: list[int] = []
    best = -len(items)
    path = []
    while len(chosen) < min(max_pairs, n_pairs):
        scores = {
            p: int(hits(items, [*chosen, p], relative, config, encoder_size).sum())
            for p in range(n_pairs)
            if p not in chosen
        }
        p, score = max(scores.items(), key=lambda kv: (kv[1], -kv[0]))
        if score - best < max(min_gain * len(items), 1):
            break
        chosen.append(p)
        best = score
        path.append({"add": list(name[p]), "hit_rate": score / len(items)})
    return {
        "relative": relative,
        "items": len(items),
        "alone": [{"layer": name[p][0], "head": name[p][1], "hit_rate": float(h.mean())} for p, h in alone.items()],
        "path": path,
        "layer_heads": [list(name[p]) for p in chosen],
        "hit_rate": best / len(items),
        "rois": {it.question_id: box for it, box in zip(items, rois(items, chosen, relative, config, encoder_size))},
    }


def choose(items: list[ItemMaps], n_heads: int, config, encoder_size, max_pairs: int, min_gain: float) -> dict:
    """The better of the plain and the relative selection (a tie: the config's `relative`)."""
    reads = [select(items, n_heads, r, config, encoder_size, max_pairs, min_gain) for r in (False, True)]
    best = max(reads, key=lambda read: (read["hit_rate"], read["relative"] == config.attention.relative))
    return {**best, "reads": [{k: v for k, v in read.items() if k != "rois"} for read in reads]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collab.eval.heads",
        description="Choose the (layer, head) pairs the RoI search reads, on a calibration split "
        "(greedy forward selection by RoI hit rate on its fine questions).",
        epilog="Then set attention.layer_heads and attention.relative as printed (configs/*.yaml or --set) "
        "and evaluate on another split.",
    )
    p.add_argument("--split", required=True, metavar="SEED:N", help="calibration split, e.g. 1001:200")
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "default.yaml"), help="YAML config")
    p.add_argument("--model", help="override model.path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--max-pairs", type=int, default=6, help="stop the selection at this many pairs (default 6)")
    p.add_argument(
        "--min-gain",
        type=float,
        default=0.05,
        help="a pair joins only if it raises the hit rate by this much (default 0.05: on a second run of the "
        "recipe, a third pair that added 0.033 on 1001:400 lost 0.034 on another split)",
    )
    p.add_argument("--out", help="directory for heads.json (default: print only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from collab.backends import ModelLoadError, load_backend

    try:
        seed, n = parse_split(args.split)
        if args.max_pairs < 1 or not 0 <= args.min_gain < 1:
            raise ValueError("--max-pairs must be at least 1 and --min-gain in [0, 1)")
        overrides = parse_sets(args.set)
        if args.model:
            overrides.setdefault("model", {})["path"] = args.model
        config = load_config(args.config, overrides or None)
        backend = load_backend(config.model, search_roots=[REPO_ROOT])
    except (ValueError, ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = backend.info
    if info.num_heads is None:
        print(f"error: {info.model_name} does not report its heads", file=sys.stderr)
        return 2
    items = collect(backend, config, seed, n)
    if not items:
        print(f"error: no fine questions among {args.split}'s items", file=sys.stderr)
        return 2
    result = choose(items, info.num_heads, config, info.encoder_size, args.max_pairs, args.min_gain)
    result.update(split=args.split, model=info.model_name, attention=config.attention.model_dump(mode="json"))
    print(f"{result['items']} fine questions of {args.split}; hit rate of each (layer, head) alone, plain / relative:")
    plain, relative = (read["alone"] for read in result["reads"])
    for a, b in zip(plain, relative):
        print(f"  L{a['layer']} h{a['head']}: {a['hit_rate']:.3f} / {b['hit_rate']:.3f}")
    for read in result["reads"]:
        print(f"greedy selection, {'relative' if read['relative'] else 'plain'} maps:")
        for step in read["path"]:
            print(f"  + L{step['add'][0]} h{step['add'][1]} -> {step['hit_rate']:.3f}")
    print(f"attention.layer_heads: {json.dumps(result['layer_heads'])}")
    print(f"attention.relative: {json.dumps(result['relative'])}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "heads.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out / 'heads.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
