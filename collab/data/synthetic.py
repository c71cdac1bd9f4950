"""Synthetic fine-detail VQA (generator v2): coloured shapes, each holding one small digit, on a cluttered background.

Why it exists: the method only pays off when the global (downscaled) image hides a detail that a
crop of the original reveals, while what NAMES the object stays visible, as a sign stays visible
in a 336 px photo and only its text does not. The scale relations keep that premise for a 96 px
global image (8 px patches):

- objects are squares of side 0.23-0.27 of the original's long side: 22-26 px (about 3 x 3 patches)
  in the global image, so colour and shape are legible there;
- the digit is 0.12 of the object's side: 2.6-3.5 px tall in the global image (unreadable, 2 px
  strokes become a smudge) and about 9 px tall in a crop of 1.25 object sides resized to 96 px
  (the evaluation's ground-truth crop; readable);
- 2-5 objects with unique (colour, shape) pairs, so "the red circle" names one object while
  another object shares its colour or its shape in about half the fine questions.

Determinism: item ``index`` of seed ``seed`` is drawn from ``numpy.random.default_rng([seed,
index, stream])`` only (stream 0 renders the scene, stream 1 picks the question), so it never
depends on how many items came before it, on ``fine_fraction`` (for the scene), on global random
state or on the machine: digits are drawn as seven-segment rectangles, no font files.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the original, half-open ``[x0, x1) x [y0, y1)`` (the
convention of ``collab.geometry.Box`` and ``PIL.Image.crop``).

Text: questions are lower-case and end in "?" glued to the last word ("what color is the
circle?"); ``tokenize_text`` splits the "?" off, and ``VOCABULARY`` lists every token (the "?"
included) that any question or answer can contain. Answers are single tokens.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

GENERATOR_NAME = "collab.data.synthetic"
GENERATOR_VERSION = "2.0"

# Width x height of the originals: 1:1 at two sizes, 17:15 and 15:17. Mild aspect ratios: the
# global image is the original stretched to a square, and a strong stretch would make the digit
# legible along the short axis (or the shape illegible along the long one) before the other.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((448, 448), (512, 512), (544, 480), (480, 544))
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 60, 185),
    "orange": (240, 130, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
OBJECT_FRACTION = (0.23, 0.27)  # object side as a fraction of the image's long side (uniform)
GLYPH_FRACTION = 0.12  # digit height as a fraction of the object side (+-0.01 jitter)
# Training-only scale augmentation (``legible_glyphs=True``): digits big enough to read in the
# global image (about 10 px tall there), so that "look at the named object, then read" is rewarded
# by plain answers as it is for real VLMs, whose training answers are mostly visible.
LEGIBLE_GLYPH_FRACTION = (0.40, 0.48)
OBJECT_GAP = 12  # minimum free pixels between two object boxes
BORDER = 8  # minimum free pixels between an object box and the image edge
MAX_OBJECTS = 5  # per benchmark scene
TRAIN_MAX_OBJECTS = 8  # crowded training scenes (still ~3 x 3 patches an object at 96 px)
CROSS_ARM = 0.46  # arm width of the cross as a fraction of its box side: wide enough for the digit

INK_DARK = (20, 20, 20)
INK_LIGHT = (245, 245, 245)

FINE_TEMPLATE = "what number is in the {color} {shape}?"
COLOR_TEMPLATE = "what color is the {shape}?"
SHAPE_TEMPLATE = "what shape is the {color} object?"
COUNT_QUESTION = "how many objects are there?"

# Seven-segment layout: a top, b upper right, c lower right, d bottom, e lower left, f upper left,
# g middle. 6 and 9 keep their tails (a resp. d) so that they differ from b and from 4-like shapes.
SEGMENTS: dict[str, str] = {
    "0": "abcdef",
    "1": "bc",
    "2": "abged",
    "3": "abgcd",
    "4": "fgbc",
    "5": "afgcd",
    "6": "afgedc",
    "7": "abc",
    "8": "abcdefg",
    "9": "abcdfg",
}

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize_text(text: str) -> list[str]:
    """Lower-case word tokens with punctuation ("?") split off; same split as a Whitespace pre-tokenizer."""
    return _TOKEN_RE.findall(text.lower())


def _build_vocabulary() -> list[str]:
    texts = [FINE_TEMPLATE.format(color=c, shape=s) for c in COLORS for s in SHAPES]
    texts += [COLOR_TEMPLATE.format(shape=s) for s in SHAPES]
    texts += [SHAPE_TEMPLATE.format(color=c) for c in COLORS]
    texts += [COUNT_QUESTION, *DIGITS]
    return sorted({tok for t in texts for tok in tokenize_text(t)})


VOCABULARY: list[str] = _build_vocabulary()


@dataclass
class SceneObject:
    """One filled shape with its digit; boxes are half-open original pixels."""

    shape: str
    color: str
    digit: str
    box: list[int]
    glyph_box: list[int]

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "digit": self.digit,
            "box": list(self.box),
            "glyph_box": list(self.glyph_box),
        }


@dataclass
class Scene:
    """A rendered image and the objects in it: the unit a trainer can ask many questions about."""

    image: Image.Image
    objects: list[SceneObject]
    legible_glyphs: bool = False  # training-only scale augmentation (digits readable globally)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass(frozen=True)
class Question:
    """One question about a scene; target_box is None for questions about the whole scene."""

    question: str
    answer: str
    kind: str  # "fine" (needs the digit) or "coarse" (answerable from the global image)
    qtype: str  # "number", "color", "shape" or "count"
    target_box: list[int] | None
    glyph_box: list[int] | None = None


@dataclass
class SyntheticItem:
    """One image + one question with its ground truth (VQA-style: 10 identical answers)."""

    question_id: str
    image: Image.Image
    question: str
    answers: list[str]
    answer: str
    kind: str
    qtype: str
    target_box: list[int] | None
    glyph_box: list[int] | None
    objects: list[dict]
    width: int
    height: int
    seed: int
    index: int

    @property
    def image_name(self) -> str:
        return f"{self.question_id}.png"

    def to_record(self) -> dict:
        """The JSON-able ground truth; ``image`` is the file name under ``images/``."""
        return {
            "question_id": self.question_id,
            "image": self.image_name,
            "question": self.question,
            "answers": list(self.answers),
            "answer": self.answer,
            "kind": self.kind,
            "qtype": self.qtype,
            "target_box": self.target_box,
            "glyph_box": self.glyph_box,
            "objects": self.objects,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "index": self.index,
        }


# ----------------------------------------------------------------------------------------------
# Rendering


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, np.ndarray]:
    """Muted, tinted grey with smooth blotches and pixel noise: texture without saturated colour.

    Returns the image and its mean level (RGB), which the clutter uses to stay low-contrast.
    """
    base = rng.uniform(95, 195) + rng.uniform(-10, 10, size=3)
    gh, gw = height // 48 + 2, width // 48 + 2
    tone = rng.normal(0, 20, size=(gh, gw, 1)) + rng.normal(0, 5, size=(gh, gw, 3))  # mostly luminance
    coarse = np.clip(base + tone, 0, 255).astype(np.uint8)
    smooth = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    grain = np.frombuffer(rng.bytes(width * height), dtype=np.uint8) >> 4  # uniform 0..15
    grain_l = Image.frombytes("L", (width, height), grain.tobytes())
    image = ImageChops.add(smooth, Image.merge("RGB", (grain_l, grain_l, grain_l)), scale=1.0, offset=-8)
    return image, base


def _near(rng: np.random.Generator, base: np.ndarray, spread: float) -> tuple[int, int, int]:
    """A grey-ish colour within `spread` of the background level: low contrast by construction."""
    level = float(base.mean()) + rng.uniform(-spread, spread)
    rgb = np.clip(level + rng.uniform(-6, 6, size=3), 0, 255)
    return tuple(int(v) for v in rgb)


def _draw_clutter(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, base: np.ndarray, width: int, height: int, clutter: float
) -> None:
    """Lines, blobs and small grey marks (outlines, digits) that are not valid objects."""
    for _ in range(int(round(clutter * rng.integers(6, 15)))):
        pts = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(pts, fill=_near(rng, base, 30), width=int(rng.integers(1, 4)))
    for _ in range(int(round(clutter * rng.integers(3, 9)))):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 60)
        rx, ry = int(r), int(r * rng.uniform(0.5, 1.5))
        draw.ellipse((int(cx) - rx, int(cy) - ry, int(cx) + rx, int(cy) + ry), fill=_near(rng, base, 22))
    for _ in range(int(round(clutter * rng.integers(3, 9)))):
        s = int(rng.integers(10, 28))
        x0, y0 = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
        ink = _near(rng, base, 60)
        if rng.random() < 0.5:
            gh = min(s, 14)
            draw_digit(draw, DIGITS[int(rng.integers(10))], [x0, y0, x0 + glyph_size(gh)[0], y0 + gh], ink)
        else:
            poly = _shape_points(SHAPES[int(rng.integers(len(SHAPES)))], [x0, y0, x0 + s, y0 + s])
            draw.polygon(poly, outline=ink, width=int(rng.integers(1, 3)))


def _place_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> list[list[int]]:
    """Square boxes of random side, at least OBJECT_GAP apart, by rejection sampling. A layout whose
    next box finds no room is started again; after every 10 failed layouts the side range shrinks
    by 5 % (crowded 5-object scenes)."""
    long_side = max(width, height)
    lo, hi = OBJECT_FRACTION
    for layout in range(200):
        if layout and layout % 10 == 0:
            lo, hi = 0.95 * lo, 0.95 * hi
        boxes: list[list[int]] = []
        for _ in range(n):
            for _attempt in range(200):
                s = int(round(long_side * rng.uniform(lo, hi)))
                x0 = int(rng.integers(BORDER, width - BORDER - s + 1))
                y0 = int(rng.integers(BORDER, height - BORDER - s + 1))
                box = [x0, y0, x0 + s, y0 + s]
                if all(_gap(box, other) >= OBJECT_GAP for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} objects in {width}x{height}")  # pragma: no cover


def _gap(a: Sequence[int], b: Sequence[int]) -> int:
    """Free pixels between two half-open boxes along the axis where they are separated (<0 = overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _shape_points(shape: str, box: Sequence[int]) -> list[tuple[float, float]]:
    """Polygon of a shape that touches all four sides of the half-open box (circle approximated)."""
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(x0, y1), (cx, y0), (x1, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a = (x1 - x0) * CROSS_ARM / 2
        return [
            (cx - a, y0), (cx + a, y0), (cx + a, cy - a), (x1, cy - a), (x1, cy + a), (cx + a, cy + a),
            (cx + a, y1), (cx - a, y1), (cx - a, cy + a), (x0, cy + a), (x0, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return [(cx + (x1 - x0) / 2 * np.cos(a), cy + (y1 - y0) / 2 * np.sin(a)) for a in t]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
    else:
        draw.polygon(_shape_points(shape, box), fill=fill)


def object_mask(obj: SceneObject, size: tuple[int, int]) -> Image.Image:
    """The pixels of the original (`size`) that the object's filled shape covers, as an "L" image
    (255 on the shape): the ground truth of which patches show the object, not just its box."""
    mask = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.box, 255)
    return mask


def _glyph_center(shape: str, box: Sequence[int]) -> tuple[float, float]:
    """Where the digit sits: the box centre, or the incentre for the triangle (its widest region)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        s = x1 - x0
        r = s * s / (s + 2 * np.hypot(s / 2, s))  # inradius = 2 * area / perimeter
        cy = y1 - r
    return cx, cy


def glyph_size(height: int) -> tuple[int, int, int]:
    """(width, height, stroke) of a digit of the given height: stroke scales with size."""
    return max(5, int(round(0.55 * height))), height, _stroke(height)


def _stroke(height: int) -> int:
    """Thin strokes (2 px up to 20 px tall): they vanish on a 3-4x downscale but survive a crop."""
    return max(2, height // 7) if height >= 10 else 1


def draw_digit(draw: ImageDraw.ImageDraw, digit: str, box: Sequence[int], ink: tuple[int, int, int]) -> None:
    """A seven-segment digit filling the half-open box, drawn with rectangles (no fonts, exact)."""
    x0, y0, x1, y1 = box
    t = _stroke(y1 - y0)
    ym = y0 + (y1 - y0 - t) // 2
    rects = {
        "a": (x0, y0, x1 - 1, y0 + t - 1),
        "d": (x0, y1 - t, x1 - 1, y1 - 1),
        "g": (x0, ym, x1 - 1, ym + t - 1),
        "f": (x0, y0, x0 + t - 1, ym + t - 1),
        "b": (x1 - t, y0, x1 - 1, ym + t - 1),
        "e": (x0, ym, x0 + t - 1, y1 - 1),
        "c": (x1 - t, ym, x1 - 1, y1 - 1),
    }
    for seg in SEGMENTS[digit]:
        draw.rectangle(rects[seg], fill=ink)


def ink_for(color: str) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with the object's colour (luma threshold)."""
    r, g, b = COLORS[color]
    return INK_DARK if 0.299 * r + 0.587 * g + 0.114 * b > 140 else INK_LIGHT


def _glyph_box(shape: str, box: Sequence[int], glyph_height: int) -> list[int]:
    gw, gh, _ = glyph_size(glyph_height)
    cx, cy = _glyph_center(shape, box)
    gx0, gy0 = int(round(cx - gw / 2)), int(round(cy - gh / 2))
    return [gx0, gy0, gx0 + gw, gy0 + gh]


def _sample_objects(
    rng: np.random.Generator, n: int, width: int, height: int, legible_glyphs: bool = False
) -> list[SceneObject]:
    """n objects with unique (colour, shape) pairs, random digits, non-overlapping boxes."""
    pairs = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
    colors = list(COLORS)
    objects = []
    for pair, box in zip(pairs, _place_boxes(rng, n, width, height)):
        color, shape = colors[int(pair) // len(SHAPES)], SHAPES[int(pair) % len(SHAPES)]
        side = box[2] - box[0]
        fraction = rng.uniform(*LEGIBLE_GLYPH_FRACTION) if legible_glyphs else GLYPH_FRACTION + rng.uniform(-0.01, 0.01)
        gh = max(10, int(round(side * fraction)))
        digit = DIGITS[int(rng.integers(10))]
        objects.append(SceneObject(shape, color, digit, box, _glyph_box(shape, box, gh)))
    return objects


def render_scene(
    rng: np.random.Generator,
    *,
    n_objects: int | None = None,
    clutter: float = 1.0,
    size: tuple[int, int] | None = None,
    legible_glyphs: bool = False,
) -> Scene:
    """Draw one scene from `rng`. n_objects defaults to 2-5 at random (the benchmark's); training may
    crowd up to TRAIN_MAX_OBJECTS; clutter scales the marks; legible_glyphs (training only) draws
    digits readable in the global image."""
    if n_objects is not None and not 1 <= n_objects <= TRAIN_MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{TRAIN_MAX_OBJECTS}, got {n_objects}")
    width, height = size or IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    n = n_objects or int(rng.integers(2, MAX_OBJECTS + 1))
    image, base = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, base, width, height, clutter)
    objects = _sample_objects(rng, n, width, height, legible_glyphs)
    for obj in objects:
        _draw_shape(draw, obj.shape, obj.box, COLORS[obj.color])
        draw_digit(draw, obj.digit, obj.glyph_box, ink_for(obj.color))
    return Scene(image=image, objects=objects, legible_glyphs=legible_glyphs)


def make_scene(seed: int, index: int, **kw) -> Scene:
    """Scene `index` of `seed`, from its own random stream (independent of any other index)."""
    return render_scene(np.random.default_rng([seed, index, 0]), **kw)


# ----------------------------------------------------------------------------------------------
# Questions


def questions_for_scene(scene: Scene) -> list[Question]:
    """Every valid question about the scene: fine ones for each object, coarse ones when unambiguous."""
    shape_counts = _counts(o.shape for o in scene.objects)
    color_counts = _counts(o.color for o in scene.objects)
    out = []
    for o in scene.objects:
        out.append(
            Question(
                FINE_TEMPLATE.format(color=o.color, shape=o.shape),
                o.digit,
                "fine",
                "number",
                list(o.box),
                list(o.glyph_box),
            )
        )
    for o in scene.objects:
        if shape_counts[o.shape] == 1:
            out.append(Question(COLOR_TEMPLATE.format(shape=o.shape), o.color, "coarse", "color", list(o.box)))
        if color_counts[o.color] == 1:
            out.append(Question(SHAPE_TEMPLATE.format(color=o.color), o.shape, "coarse", "shape", list(o.box)))
    out.append(Question(COUNT_QUESTION, str(len(scene.objects)), "coarse", "count", None))
    return out


LOOKALIKE_KINDS = ("color", "shape", "both", "none")


def lookalike_kind(objects: Sequence[dict], target_box: Sequence[int] | None) -> str | None:
    """Which of the target's attributes other objects share: "color" (some object has its colour,
    none its shape), "shape", "both" (some share one, some the other) or "none"; None when no object
    is the target. A model that finds objects by one attribute fails where the other is the only
    one that tells them apart. `objects` as in item records."""
    target = next((o for o in objects if list(o["box"]) == list(target_box or [])), None)
    if target is None:
        return None
    others = [o for o in objects if o is not target]
    colour = any(o["color"] == target["color"] for o in others)
    shape = any(o["shape"] == target["shape"] for o in others)
    return "both" if colour and shape else "color" if colour else "shape" if shape else "none"


def has_lookalike(objects: Sequence[dict], target_box: Sequence[int] | None) -> bool:
    """Whether another object shares the target's colour or its shape (a distractor that a model
    naming objects by one attribute only would confuse with it). `objects` as in item records."""
    return lookalike_kind(objects, target_box) not in (None, "none")


def lookalike_share(records: Sequence[dict]) -> float | None:
    """Share of fine items with a look-alike distractor (None without fine items)."""
    fine = [r for r in records if r["kind"] == "fine"]
    return float(np.mean([has_lookalike(r["objects"], r["target_box"]) for r in fine])) if fine else None


def _counts(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def item_from_scene(
    scene: Scene, question: Question, *, question_id: str, seed: int = -1, index: int = -1
) -> SyntheticItem:
    """Pair a scene with one of its questions as a VQA item (10 identical answers)."""
    return SyntheticItem(
        question_id=question_id,
        image=scene.image,
        question=question.question,
        answers=[question.answer] * 10,
        answer=question.answer,
        kind=question.kind,
        qtype=question.qtype,
        target_box=question.target_box,
        glyph_box=question.glyph_box,
        objects=[o.to_dict() for o in scene.objects],
        width=scene.width,
        height=scene.height,
        seed=seed,
        index=index,
    )


def generate_item(
    seed: int,
    index: int,
    *,
    fine_fraction: float = 0.5,
    kind: str | None = None,
    n_objects: int | None = None,
    clutter: float = 1.0,
) -> SyntheticItem:
    """Item `index` of split `seed`: a fine question with probability fine_fraction, unless `kind` forces one."""
    if kind not in (None, "fine", "coarse"):
        raise ValueError(f"kind must be None, 'fine' or 'coarse', got {kind!r}")
    if not 0.0 <= fine_fraction <= 1.0:
        raise ValueError(f"fine_fraction must be in [0, 1], got {fine_fraction}")
    scene = make_scene(seed, index, n_objects=n_objects, clutter=clutter)
    qrng = np.random.default_rng([seed, index, 1])
    draw_fine = qrng.random() < fine_fraction
    want = kind or ("fine" if draw_fine else "coarse")
    candidates = [q for q in questions_for_scene(scene) if q.kind == want]
    question = candidates[int(qrng.integers(len(candidates)))]
    return item_from_scene(scene, question, question_id=f"syn-{seed}-{index:06d}", seed=seed, index=index)


def parse_split(text: str) -> tuple[int, int]:
    """'4242:500' -> (4242, 500): the SEED:N that names a split on every command line and config."""
    seed, sep, n = str(text).strip().partition(":")
    try:
        if not sep:
            raise ValueError
        seed_i, n_i = int(seed), int(n)
    except ValueError:
        raise ValueError(f"expected SEED:N (e.g. 4242:500), got {text!r}") from None
    if n_i < 1 or seed_i < 0:
        raise ValueError(f"SEED must be >= 0 and N >= 1 in SEED:N, got {text!r}")
    return seed_i, n_i


def generate_items(seed: int, n: int, *, start: int = 0, **kw) -> Iterator[SyntheticItem]:
    """Items start .. start+n-1 of split `seed` (keyword arguments as for generate_item)."""
    for index in range(start, start + n):
        yield generate_item(seed, index, **kw)


# ----------------------------------------------------------------------------------------------
# Files


def write_dataset(
    out_dir: str | Path, seed: int, n: int, *, fine_fraction: float = 0.5, progress: bool = True, **kw
) -> Path:
    """Write images/<question_id>.png, questions.jsonl and dataset.json under out_dir; returns out_dir."""
    from collab.progress import progress as progress_bar

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items = generate_items(seed, n, fine_fraction=fine_fraction, **kw)
    records = []
    with open(out / "questions.jsonl", "w", encoding="utf-8") as f:
        for item in progress_bar(items, total=n, desc=f"synthetic seed={seed}", disable=not progress, unit="item"):
            # Level 1: the grain makes PNGs ~400 KiB at any level; 1 is 4x faster than the default 6.
            item.image.save(out / "images" / item.image_name, format="PNG", compress_level=1)
            records.append(item.to_record())
            f.write(json.dumps(records[-1]) + "\n")
    meta = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "fine_fraction": fine_fraction,
        **kw,
        "box_convention": "[x0, y0, x1, y1], half-open, pixels of the original image",
        "lookalike_share": lookalike_share(
            records
        ),  # fine items whose target shares colour or shape with another object
        "vocabulary": VOCABULARY,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m collab.data.synthetic", description="Write a synthetic fine-detail VQA dataset."
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (item i depends only on seed and i)")
    p.add_argument("--n", type=int, default=1000, help="number of items")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--fine-fraction", type=float, default=0.5, help="probability that a question needs the digit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    out = write_dataset(args.out, args.seed, args.n, fine_fraction=args.fine_fraction, progress=not args.no_progress)
    print(out)


if __name__ == "__main__":
    main()
