"""Linear probes of the visual tokens: what the decoder *could* read about an object, and at which scale.

    python -m collab.eval.probe --n 1600 --out runs/probe

The method needs the first pass to find "the red circle" in the global image, and the refined pass
to read it in the crop. When either fails, this says whether the visual tokens hold the needed
attribute at all (then the decoder did not learn to use it) or not (then the encoder is the limit).
For objects of the synthetic benchmark it fits one multinomial logistic regression per attribute
(shape, colour, digit, and the cell of the image it sits in) and per view, on the projected visual
tokens the decoder receives:

- ``global``: the global image's tokens whose cells' centres lie inside the object's box, averaged
  (the object's own tokens; a first pass must find them);
- ``token``: one of those tokens alone, drawn among the cells the shape itself covers (at least half
  of the cell; the most covered cell when none is): what a single attention score can match. A
  pooled vector holds shape when no one token does (an object's outline spans its cells), and the
  first pass finds an object by scoring its tokens one by one;
- ``crop``: a RoI-sized crop of the original around the object (side = the RoI search's base side
  x U(1, 2), as it picks), all tokens averaged.

``--legible-glyphs`` draws the scenes as stage 2's scale augmentation does (digits big enough to
read in the global image, training only): whether the tower passes those digits on, without which
a question about a legible digit rewards no look.

Held-out accuracy (fit on the first `--train` share of objects, scored on the rest) against the
held-out accuracy of always answering the training split's most frequent class. A probe is a lower
bound of what the tokens hold (linear, on a pooled vector), so "high" is conclusive and "low" says:
not linearly, at this size.
Works with any LLaVA-family model the config names; the scenes come from `collab.data.synthetic`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from collab.data.synthetic import COLORS, DIGITS, SHAPES, object_mask, render_scene
from collab.imaging import crop_local_image, make_global_image, round_trip
from collab.progress import progress as progress_bar
from collab.roi import box_around

# "cell": where the object is, as the 3 x 3 compass cell of the image (cell_of below).
# From the global view it asks whether a token's content says where it sits (rotary
# positions enter the decoder's attention scores, not the values tokens pass on); from the crop view
# it is a control that should stay near the majority (a crop mostly does not show where it was cut;
# crops at the image edge are shifted inside it, a small leak).
CELLS: tuple[str, ...] = (
    "northwest",
    "north",
    "northeast",
    "west",
    "center",
    "east",
    "southwest",
    "south",
    "southeast",
)


def cell_of(box: Sequence[int], width: int, height: int) -> str:
    """The compass cell (3 x 3 grid of the image, thirds half-open) that holds the box's centre."""
    col = min(int(3 * (box[0] + box[2]) / 2 / width), 2)
    row = min(int(3 * (box[1] + box[3]) / 2 / height), 2)
    return CELLS[3 * row + col]


ATTRIBUTES = {"shape": list(SHAPES), "color": list(COLORS), "digit": list(DIGITS), "cell": list(CELLS)}
VIEWS = ("global", "token", "crop")
TOKEN_COVER = 0.5  # share of a cell the shape must cover for the token view


def object_token_indices(box: Sequence[float], geometry, grid: tuple[int, int], offset: int) -> list[int]:
    """Token indices of the grid cells whose centres fall inside `box` (original pixels); the cell
    nearest the box centre when none does (objects smaller than a cell). `offset`: leading tokens
    that are not grid cells (a CLS token)."""
    rows, cols = grid
    cw, ch = (geometry.canvas_size[0] / cols, geometry.canvas_size[1] / rows)
    u0, v0 = geometry.to_canvas(box[0], box[1])
    u1, v1 = geometry.to_canvas(box[2], box[3])
    inside = [
        r * cols + c
        for r in range(rows)
        for c in range(cols)
        if u0 <= (c + 0.5) * cw < u1 and v0 <= (r + 0.5) * ch < v1
    ]
    if not inside:
        u, v = (u0 + u1) / 2, (v0 + v1) / 2
        inside = [min(int(v // ch), rows - 1) * cols + min(int(u // cw), cols - 1)]
    return [offset + i for i in inside]


def covered_cells(
    obj, original_size, geometry, grid: tuple[int, int], mode, min_cover: float = TOKEN_COVER
) -> list[int]:
    """Grid cells (row-major) of the global image whose area the object's shape covers by at least
    `min_cover`; the most covered cell when none is. Maps the shape as the global image maps pixels."""
    mask, _ = make_global_image(object_mask(obj, original_size).convert("RGB"), geometry.canvas_size, mode)
    rows, cols = grid
    cover = np.asarray(mask.convert("L").resize((cols, rows), Image.BOX), dtype=np.float32).ravel() / 255.0
    cells = np.flatnonzero(cover >= min_cover)
    return cells.tolist() if len(cells) else [int(cover.argmax())]


def collect(
    backend, config, n: int, seed: int, batch: int = 32, progress: bool = True, legible_glyphs: bool = False
) -> dict:
    """Pooled token features per view and the attribute labels of one random object per scene."""
    info = backend.info
    size = info.encoder_size
    base_side = config.roi.side_for(size)  # the RoI search's smallest box
    im = config.imaging
    offset = info.tokens_per_image - info.grid[0] * info.grid[1]
    rng = np.random.default_rng([seed, 7])
    token_rng = np.random.default_rng([seed, 8])  # its own stream: the other views' scenes stay as they were
    feats: dict[str, list[torch.Tensor]] = {v: [] for v in VIEWS}
    labels: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}

    def sent(image):
        return round_trip(image, im.format, im.jpeg_quality)

    bar = progress_bar(total=n, desc="probe: encoding objects", disable=not progress)
    done = 0
    while done < n:
        k = min(batch, n - done)
        globals_, crops, token_sets, single = [], [], [], []
        for _ in range(k):
            scene = render_scene(rng, legible_glyphs=legible_glyphs)
            obj = scene.objects[int(rng.integers(len(scene.objects)))]
            image, geometry = make_global_image(scene.image, size, im.global_mode, im.pad_color)
            globals_.append(sent(image))
            token_sets.append(object_token_indices(obj.box, geometry, info.grid, offset))
            cells = covered_cells(obj, scene.image.size, geometry, info.grid, im.global_mode)
            single.append(offset + int(token_rng.choice(cells)))
            side = base_side * rng.uniform(1.0, 2.0)
            cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
            crops.append(sent(crop_local_image(scene.image, box_around(cx, cy, side, scene.width, scene.height), size)))
            labels["shape"].append(SHAPES.index(obj.shape))
            labels["color"].append(list(COLORS).index(obj.color))
            labels["digit"].append(DIGITS.index(obj.digit))
            labels["cell"].append(CELLS.index(cell_of(obj.box, scene.width, scene.height)))
        with torch.no_grad():
            g = torch.stack([backend.visual_tokens(f) for f in backend.encode_images(globals_)]).float().cpu()
            c = torch.stack([backend.visual_tokens(f) for f in backend.encode_images(crops)]).float().cpu()
        feats["global"] += [g[i, idx].mean(0) for i, idx in enumerate(token_sets)]
        feats["token"] += [g[i, j] for i, j in enumerate(single)]
        feats["crop"] += list(c[:, offset:].mean(1))
        done += k
        bar.update(k)
    bar.close()
    return {
        "features": {v: torch.stack(f) for v, f in feats.items()},
        "labels": {a: torch.tensor(values) for a, values in labels.items()},
    }


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, n_train: int, steps: int = 500, l2: float = 1e-3
) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, Adam, L2;
    zero-initialised, so deterministic)."""
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + l2 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(-1) == y[n_train:]).float().mean())


def split_size(n: int, train_fraction: float) -> int:
    """Objects the probes are fitted on; the rest are held out. Both parts must be non-empty."""
    n_train = int(round(n * train_fraction))
    if not 0 < n_train < n:
        raise ValueError(f"--train {train_fraction} leaves no training or no held-out objects of {n}")
    return n_train


def probe_table(data: dict, train_fraction: float) -> dict:
    """{view: {attribute: {"accuracy", "majority"}}} on the held-out objects; "majority" is the
    held-out accuracy of always answering the training objects' most frequent class."""
    n = len(next(iter(data["labels"].values())))
    n_train = split_size(n, train_fraction)
    table: dict = {}
    for view, x in data["features"].items():
        table[view] = {}
        for attr, y in data["labels"].items():
            top = int(torch.bincount(y[:n_train], minlength=len(ATTRIBUTES[attr])).argmax())
            majority = float((y[n_train:] == top).float().mean())
            table[view][attr] = {"accuracy": fit_probe(x, y, len(ATTRIBUTES[attr]), n_train), "majority": majority}
    return {"n": n, "n_train": n_train, "views": table}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collab.eval.probe",
        description="Linear probes of a LLaVA model's visual tokens: can an object's shape, colour and digit "
        "be read from the global image's tokens over the object, and from a RoI-sized crop? Tells an "
        "encoder limit (tokens do not hold it) from a decoder one (they do, the answers do not use it).",
    )
    p.add_argument("--config", type=Path, default=None, help="method config YAML (default: configs/default.yaml)")
    p.add_argument("--model", help="override model.path (e.g. a training run's output directory)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, as in python -m collab.eval (YAML values)",
    )
    p.add_argument("--n", type=int, default=1600, help="objects (one per synthetic scene; default %(default)s)")
    p.add_argument("--seed", type=int, default=123, help="scene seed (default %(default)s)")
    p.add_argument(
        "--train", type=float, default=0.75, help="share of objects the probes are fitted on (default %(default)s)"
    )
    p.add_argument(
        "--legible-glyphs",
        action="store_true",
        help="scenes drawn with digits legible in the global image (stage 2's training-only scale augmentation)",
    )
    p.add_argument("--out", type=Path, default=None, help="write OUT/probe.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from collab.backends import ModelLoadError, load_backend
    from collab.config import ConfigError, load_config, parse_sets
    from collab.paths import DEFAULT_CONFIG, REPO_ROOT

    args = build_parser().parse_args(argv)
    if args.n < 8:
        print("error: --n must be at least 8", file=sys.stderr)
        return 2
    try:
        split_size(args.n, args.train)  # refuse a bad split before encoding anything
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        overrides = parse_sets(args.set, args.model)
        config = load_config(args.config or DEFAULT_CONFIG, overrides or None)
        backend = load_backend(config.model, search_roots=[REPO_ROOT])
    except (ConfigError, ModelLoadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = collect(
        backend, config, args.n, args.seed, progress=not args.no_progress, legible_glyphs=args.legible_glyphs
    )
    report = probe_table(data, args.train)
    report["model"] = str(config.model.path)
    report["config"] = config.model_dump(mode="json")
    report["seed"] = args.seed
    report["legible_glyphs"] = args.legible_glyphs
    print(
        f"linear probes on {report['n'] - report['n_train']} held-out objects (fit on {report['n_train']}); "
        "accuracy (in brackets: always the training split's most frequent class)"
    )
    print(f"{'view':8s}" + "".join(f"{a:>18s}" for a in ATTRIBUTES))
    for view, row in report["views"].items():
        print(f"{view:8s}" + "".join(f"{row[a]['accuracy']:>11.3f} ({row[a]['majority']:.2f})" for a in ATTRIBUTES))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"-> {args.out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
