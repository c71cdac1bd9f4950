"""Does the first pass look at the named object, or read a bag of every object's tokens?

    python -m collab.eval.binding --model runs/v3 --split 1001:80

The RoI search needs the first pass's attention to land on "the red circle". A small decoder can
answer "what shape is the red object?" without that look: if each object's tokens carry its colour
and shape together, an average over all objects' tokens still says which shape goes with red, up
to a few objects. Two measurements tell the look from the bag:

- **coarse accuracy by objects in the scene** (colour and shape questions, 1-5 objects): a look
  reads one object whatever the count; a bag gets worse as objects are added;
- **named-object hit per decoder layer, head and query token**, for questions that name the object
  by colour, by shape and by both: from every question token's row
  (not only the last one, which the RoI search reads), is the named object the object with the
  most attention per cell? Chance is about 1 / objects. If no row of any head is above chance, the
  answers do not come from a look, whatever layer the RoI search reads.

For LLaVA-family models on the synthetic benchmark (`collab.data.synthetic`); scenes come from the
split's seed, from index 10,000 on (never the items an evaluation of that split uses).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from collab.data.synthetic import MAX_OBJECTS, generate_item, parse_split
from collab.imaging import make_global_image, round_trip
from collab.progress import progress

FIRST_INDEX = 10_000
# Question types whose rows are measured: "what shape is the red object?" names by colour, "what
# color is the circle?" by shape (the look colour cannot give), "what number is in the red circle?" by both.
ROW_QTYPES = ("shape", "color", "number")


def object_cells(objects: Sequence[dict], size: tuple[int, int], grid: tuple[int, int]) -> list[np.ndarray]:
    """Per object, the flat indices of the grid cells whose centres lie in its box (stretched global image)."""
    rows, cols = grid
    cy = (np.arange(rows) + 0.5) * size[1] / rows
    cx = (np.arange(cols) + 0.5) * size[0] / cols
    out = []
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        inside = (cy[:, None] >= y0) & (cy[:, None] < y1) & (cx[None, :] >= x0) & (cx[None, :] < x1)
        out.append(np.flatnonzero(inside))
    return out


def named_hits(attention: np.ndarray, cells: list[np.ndarray], target: int) -> np.ndarray:
    """attention: (..., visual tokens). 1 where the target object has the most attention per cell."""
    scores = np.stack([attention[..., c].mean(-1) if len(c) else np.full(attention.shape[:-1], -1.0) for c in cells])
    return (scores.argmax(0) == target).astype(float)


def _global_features(backend, item):
    image, _ = make_global_image(item.image, backend.info.encoder_size)
    return backend.encode_images([round_trip(image, "jpeg", 90)])[0]


@torch.inference_mode()
def coarse_by_objects(backend, seed: int, per_count: int) -> dict:
    """{qtype: {objects: accuracy}} of the first pass's first answer token on coarse questions."""
    out: dict[str, dict[int, float]] = {}
    bar = progress(total=2 * MAX_OBJECTS * per_count, desc="binding: coarse answers")
    for qtype in ("color", "shape"):
        out[qtype] = {}
        for n in range(1, MAX_OBJECTS + 1):
            right = seen = 0
            index = FIRST_INDEX
            while seen < per_count:
                item = generate_item(seed, index, kind="coarse", n_objects=n)
                index += 1
                if item.qtype != qtype:
                    continue
                gen = backend.generate([_global_features(backend, item)], item.question)
                right += gen.answer == item.answer
                seen += 1
                bar.update(1)
            out[qtype][n] = right / seen
    bar.close()
    return out


@torch.inference_mode()
def hits_by_row(backend, template: str, seed: int, n: int, qtype: str) -> dict:
    """Named-object hit rate per (layer, head or mean, question token) over n items of one question type."""
    total, names, used, chance = None, None, 0, []
    index = FIRST_INDEX + 50_000
    bar = progress(total=n, desc=f"binding: attention rows ({qtype})")
    while used < n:
        item = generate_item(seed, index, kind="fine" if qtype == "number" else "coarse")
        index += 1
        if item.qtype != qtype or item.target_box is None:
            continue
        features = _global_features(backend, item)
        prompt = backend.prompt_ids(template, item.question, 1)
        out = backend._eager_pass(prompt, prompt[:, :0], features)
        visual = backend._visual_positions(prompt)
        first = int(visual[-1]) + 1
        tokens = backend.tokenizer.convert_ids_to_tokens(prompt[0, first:].tolist())
        if names is not None and len(tokens) != len(names):
            continue  # one question template at a time: rows must line up
        att = torch.stack([a[0][:, first:][:, :, visual] for a in out.attentions]).float().numpy()  # L, H, Q, V
        att = np.concatenate([att, att.mean(1, keepdims=True)], axis=1)  # the heads' mean last
        cells = object_cells(item.objects, (item.width, item.height), backend.info.grid)
        target = next(i for i, o in enumerate(item.objects) if list(o["box"]) == list(item.target_box))
        got = named_hits(att, cells, target)
        total = got if total is None else total + got
        names, used = tokens, used + 1
        chance.append(1 / len(item.objects))
        bar.update(1)
    bar.close()
    rates = total / used
    heads = [f"h{h}" for h in range(rates.shape[1] - 1)] + ["mean"]
    return {
        "qtype": qtype,
        "items": used,
        "chance": float(np.mean(chance)),
        "tokens": names,
        "hit": {
            f"L{layer}": {h: rates[layer, i].round(3).tolist() for i, h in enumerate(heads)}
            for layer in range(len(rates))
        },
        "best": float(rates.max()),
    }


def render(report: dict) -> str:
    lines = ["coarse accuracy (first answer token) by objects in the scene:"]
    for qtype, by_n in report["coarse_by_objects"].items():
        lines.append(f"  {qtype:5s} " + "  ".join(f"{n}: {acc:.2f}" for n, acc in by_n.items()))
    for rows in report["rows"]:
        lines.append(
            f"named-object hit by layer, head and query token ({rows['qtype']} questions, {rows['items']} items, "
            f"chance {rows['chance']:.2f}, best {rows['best']:.2f}):"
        )
        lines.append("          " + " ".join(f"{t[:6]:>6s}" for t in rows["tokens"]))
        for layer, heads in rows["hit"].items():
            for head, values in heads.items():
                lines.append(f"  {layer:3s} {head:4s} " + " ".join(f"{v:6.2f}" for v in values))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collab.eval.binding",
        description="Tell a first pass that looks at the named object from one that reads a bag of every "
        "object's tokens: coarse accuracy by object count, and named-object attention hits for every layer, "
        "head and question token.",
    )
    p.add_argument("--config", type=Path, default=None, help="method config YAML (default: configs/default.yaml)")
    p.add_argument("--model", help="override model.path (e.g. a training run's output directory)")
    p.add_argument("--split", default="1001:80", help="SEED:N: scenes of that seed, N items per measurement")
    p.add_argument("--out", type=Path, default=None, help="write OUT/binding.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from collab.backends import ModelLoadError, load_backend
    from collab.config import ConfigError, load_config, parse_sets
    from collab.paths import DEFAULT_CONFIG, REPO_ROOT

    args = build_parser().parse_args(argv)
    try:
        seed, n = parse_split(args.split)
        config = load_config(args.config or DEFAULT_CONFIG, parse_sets([], args.model) or None)
        backend = load_backend(config.model, search_roots=[REPO_ROOT])
    except (ValueError, ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.model.family != "llava":
        print("error: collab.eval.binding reads LLaVA-family models on the synthetic benchmark", file=sys.stderr)
        return 2
    template = config.model.prompt_template
    report = {
        "model": config.model.path,
        "split": args.split,
        "coarse_by_objects": coarse_by_objects(backend, seed, max(8, n // 2)),
        "rows": [hits_by_row(backend, template, seed, n, qtype) for qtype in ROW_QTYPES],
    }
    print(render(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "binding.json").write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out / 'binding.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
