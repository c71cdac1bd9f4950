"""Where to look: ViCrop's multi-scale sliding-window search over an attention grid.

For each scale ratio r the box side is `base_side * r` ORIGINAL pixels (base side = encoder
resolution, so a ratio-1 crop is fed to the encoder at native resolution). The window covers
that many grid cells in each direction (cells are rectangles of the original when the global
image was stretched, so the window is square in pixels, not in cells). A stride-one window finds
the highest summed attention; its *sharpness* is

    (max window sum - mean of the 4-neighbouring window sums) / window area

and the ratio with the sharpest peak wins. The box is centred on the winning window and shifted
(not shrunk) to lie inside the image. Window sums come from an integral image: one vectorised
pass per ratio, no Python loop per window.

Ties break as ViCrop's loops do (first maximum scanning columns, then rows; first ratio) when the
window sums are exact; with floating-point sums an integral image and ViCrop's direct sums can round
tied windows apart (tests/test_roi.py compares with upstream's code and states each difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from collab.geometry import Box, CanvasGeometry

DEFAULT_RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


@dataclass(frozen=True)
class RoIResult:
    """The chosen box in original pixels and how it was chosen."""

    box: Box
    ratio: float
    window: tuple[int, int, int, int]  # (col, row, cols, rows) on the attention grid
    sharpness: dict[float, float] = field(default_factory=dict)
    whole_image: bool = False  # the grid was too small for any window: the box is the image


def window_sums(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sum of every rows x cols window (stride one), via a zero-padded integral image."""
    g = np.asarray(grid, dtype=np.float64)
    integral = np.zeros((g.shape[0] + 1, g.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = g.cumsum(0).cumsum(1)
    return integral[rows:, cols:] - integral[:-rows, cols:] - integral[rows:, :-cols] + integral[:-rows, :-cols]


def _peak(sums: np.ndarray) -> tuple[int, int]:
    """(row, col) of the first maximum in column-major scan order (ViCrop's x-outer loop)."""
    col, row = np.unravel_index(int(np.argmax(sums.T)), sums.T.shape)
    return int(row), int(col)


def _sharpness(sums: np.ndarray, row: int, col: int, area: int) -> float:
    neighbours = []
    if col > 0:
        neighbours.append(sums[row, col - 1])
    if col < sums.shape[1] - 1:
        neighbours.append(sums[row, col + 1])
    if row > 0:
        neighbours.append(sums[row - 1, col])
    if row < sums.shape[0] - 1:
        neighbours.append(sums[row + 1, col])
    return float((sums[row, col] - np.mean(neighbours)) / area)


def search_roi(
    attention: np.ndarray,
    geometry: CanvasGeometry,
    base_side: float,
    ratios: Sequence[float] = DEFAULT_RATIOS,
) -> RoIResult:
    """Pick the RoI box (original pixels) from an attention grid of shape (rows, cols)."""
    att = np.asarray(attention, dtype=np.float64)
    if att.ndim != 2 or att.size == 0:
        raise ValueError(f"attention must be a non-empty 2-D grid, got shape {att.shape}")
    if not np.all(np.isfinite(att)):
        raise ValueError("attention grid contains NaN or inf")
    if base_side <= 0 or not ratios:
        raise ValueError("base_side must be > 0 and ratios non-empty")
    n_rows, n_cols = att.shape
    width, height = geometry.original_size
    cell_w, cell_h = geometry.grid_cell_size((n_rows, n_cols))
    origin_x, origin_y = geometry.grid_origin()

    candidates: list[tuple[float, float, int, int, int, int]] = []  # (sharp, ratio, row, col, rows, cols)
    for i, ratio in enumerate(ratios):
        side = base_side * ratio
        cols = max(1, min(int(side / cell_w), n_cols))
        rows = max(1, min(int(side / cell_h), n_rows))
        if n_cols - cols < 1 and n_rows - rows < 1:
            if i == 0:  # even the smallest box covers the whole grid: take the whole image
                return RoIResult(Box(0, 0, width, height), float(ratio), (0, 0, n_cols, n_rows), {}, True)
            continue
        sums = window_sums(att, rows, cols)
        row, col = _peak(sums)
        candidates.append((_sharpness(sums, row, col, rows * cols), float(ratio), row, col, rows, cols))

    sharpness = {c[1]: c[0] for c in candidates}
    best = candidates[int(np.argmax([c[0] for c in candidates]))]
    _, ratio, row, col, rows, cols = best
    side = base_side * ratio
    center_x = int(origin_x + col * cell_w + cell_w * cols / 2)
    center_y = int(origin_y + row * cell_h + cell_h * rows / 2)
    box = box_around(center_x, center_y, side, width, height)
    return RoIResult(box, ratio, (col, row, cols, rows), sharpness, False)


def box_around(center_x: float, center_y: float, side: float, width: int, height: int) -> Box:
    """A side x side box at the centre, shifted inside the image; clipped only if the image is smaller."""
    half = int(side // 2)
    cx = min(max(int(center_x), half), width - half)
    cy = min(max(int(center_y), half), height - half)
    return Box(max(0, cx - half), max(0, cy - half), min(width, cx + half), min(height, cy + half))
