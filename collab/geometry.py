"""Boxes and the exact mapping between the original image and the encoder canvas.

The edge makes the global image from the original in one of two ways:

- ``resize``: stretch the whole original onto the encoder's W x H canvas (aspect not kept).
  Canvas u = x * Wc / W, v = y * Hc / H. A grid cell is a rectangle of the original.
- ``pad``: scale by s = min(Wc / W, Hc / H) so the original fits, centre it, fill the rest
  (LLaVA's "pad" aspect mode). The content occupies round(W s) x round(H s) pixels at offset
  ((Wc - cw) // 2, (Hc - ch) // 2); we map with the realised content size, so both directions
  are exact inverses of what the pixels show.

The server only knows the original's size (the edge reports it), which is all the mapping needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GlobalMode = Literal["resize", "pad"]


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixels, [x0, x1) x [y0, y1)."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"empty or inverted box {self.as_list()}")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)

    def contains_point(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1

    def iou(self, other: Box) -> float:
        ix = max(0, min(self.x1, other.x1) - max(self.x0, other.x0))
        iy = max(0, min(self.y1, other.y1) - max(self.y0, other.y0))
        inter = ix * iy
        return inter / float(self.area + other.area - inter)

    def clamp_to(self, width: int, height: int) -> Box:
        """Clip to the image; raises if nothing is left."""
        return Box(max(0, self.x0), max(0, self.y0), min(width, self.x1), min(height, self.y1))

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]

    @classmethod
    def from_seq(cls, seq) -> Box:
        if len(seq) != 4:
            raise ValueError(f"a box needs 4 numbers [x0, y0, x1, y1], got {len(seq)}")
        return cls(*(int(round(float(v))) for v in seq))


@dataclass(frozen=True)
class CanvasGeometry:
    """Affine map original -> canvas: u = x * sx + ox, v = y * sy + oy."""

    original_size: tuple[int, int]  # (W, H) of the original
    canvas_size: tuple[int, int]  # (Wc, Hc) of the global image
    mode: GlobalMode
    content_size: tuple[int, int]  # pixels of the canvas that show the original
    offset: tuple[int, int]  # where that content starts on the canvas

    @classmethod
    def create(cls, original_size: tuple[int, int], canvas_size: tuple[int, int], mode: GlobalMode) -> CanvasGeometry:
        w, h = (int(v) for v in original_size)
        cw, ch = (int(v) for v in canvas_size)
        if w < 1 or h < 1 or cw < 1 or ch < 1:
            raise ValueError(f"sizes must be positive, got original {original_size}, canvas {canvas_size}")
        if mode == "resize":
            return cls((w, h), (cw, ch), mode, (cw, ch), (0, 0))
        if mode == "pad":
            s = min(cw / w, ch / h)
            content = (max(1, round(w * s)), max(1, round(h * s)))
            offset = ((cw - content[0]) // 2, (ch - content[1]) // 2)
            return cls((w, h), (cw, ch), mode, content, offset)
        raise ValueError(f"unknown global image mode {mode!r}; expected 'resize' or 'pad'")

    @property
    def scale(self) -> tuple[float, float]:
        return (self.content_size[0] / self.original_size[0], self.content_size[1] / self.original_size[1])

    def to_canvas(self, x: float, y: float) -> tuple[float, float]:
        sx, sy = self.scale
        return (x * sx + self.offset[0], y * sy + self.offset[1])

    def to_original(self, u: float, v: float) -> tuple[float, float]:
        sx, sy = self.scale
        return ((u - self.offset[0]) / sx, (v - self.offset[1]) / sy)

    def grid_cell_size(self, grid: tuple[int, int]) -> tuple[float, float]:
        """Size in ORIGINAL pixels of one attention-grid cell; grid = (rows, cols)."""
        # One division of exact integers: correctly rounded, so cell edges land on whole pixels
        # exactly when they should (int() of a centre must not flip on a last-bit error).
        (cw, ch), (w, h), (kw, kh) = self.canvas_size, self.original_size, self.content_size
        return (cw * w / (grid[1] * kw), ch * h / (grid[0] * kh))

    def grid_origin(self) -> tuple[float, float]:
        """Original-pixel coordinates of the grid's top-left corner (negative when padded)."""
        return self.to_original(0.0, 0.0)
