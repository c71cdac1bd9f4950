"""RoI search (collab/roi.py) against a verbatim port of upstream ViCrop.

The reference is ``tests/vicrop_upstream.py``: ``bbox_from_att_image_adaptive`` from
saccharomycetes/mllms_know utils.py (commit a64c5d5), copied unchanged. Where both should
agree the boxes must be EXACTLY equal; every known difference has its own test below
(``test_differs_*``) that shows the difference exists and what ``search_roi`` does instead.

Exact agreement holds in "resize" geometry (square or non-square originals, square or
non-square grids) whenever (i) no grid cell is wider or taller than ``base_side`` original
pixels and (ii) the map has no ties that floating-point rounding can break differently
(continuous random maps, or ties among exactly representable sums such as integer maps).
"""

import warnings

import numpy as np
import pytest
from vicrop_upstream import bbox_from_att_image_adaptive

from collab.geometry import Box, CanvasGeometry
from collab.roi import DEFAULT_RATIOS, search_roi, window_sums


def upstream_box(att_map, image_size, bbox_size):
    """Upstream's box, checked to be whole numbers (upstream returns floats like 201.0 for
    non-integer ratios), as an int tuple."""
    box = bbox_from_att_image_adaptive(att_map, image_size, bbox_size)
    assert all(float(v).is_integer() for v in box), box
    return tuple(int(v) for v in box)


def ours(grid, size, base, mode="resize"):
    return search_roi(grid, CanvasGeometry.create(size, (336, 336), mode), base)


def planted(rows, cols, r0, c0, h, w, value=10.0, rng=None):
    grid = np.zeros((rows, cols)) if rng is None else rng.random((rows, cols)) * 0.1
    grid[r0 : r0 + h, c0 : c0 + w] += value
    return grid


def test_upstream_port_is_the_published_loop():
    """Guard the reference itself with a hand-worked case. 4x4 grid, 2x2 block of ones at rows/cols
    1-2, 400x400 original, bbox 200: cells are 100 px. Ratios 1, 1.2, 1.4 -> 2x2 windows, peak 4 at
    (x=1, y=1), its 4 neighbours 2 each -> sharpness (4 - 2) / 4 = 0.5; ratios 1.6, 1.8 -> 3x3
    windows, all four sums 4 -> sharpness 0; ratio 2 -> 4x4 covers the grid, skipped. First best
    is ratio 1: centre 1 * 100 + 100 * 2 / 2 = 200, half 100 -> (100, 100, 300, 300)."""
    grid = np.zeros((4, 4))
    grid[1:3, 1:3] = 1.0
    assert bbox_from_att_image_adaptive(grid, (400, 400), 200) == (100, 100, 300, 300)
    assert upstream_box(grid, (400, 400), 200) == tuple(ours(grid, (400, 400), 200).box.as_list())


def test_window_sums_match_loops():
    rng = np.random.default_rng(1)
    g = rng.random((7, 9))
    sums = window_sums(g, 3, 4)
    assert sums.shape == (5, 6)
    for r in range(5):
        for c in range(6):
            assert sums[r, c] == pytest.approx(g[r : r + 3, c : c + 4].sum())


@pytest.mark.parametrize(
    "size,r0,c0,h,w",
    [
        ((1024, 1024), 10, 10, 3, 3),  # middle, small
        ((1024, 1024), 0, 0, 3, 3),  # top-left corner
        ((1024, 1024), 21, 21, 3, 3),  # bottom-right corner
        ((1024, 1024), 0, 12, 4, 4),  # top border
        ((1024, 1024), 8, 8, 7, 7),  # larger block: bigger ratio
        ((1536, 768), 5, 18, 3, 2),  # wide original: cells are 2:1 rectangles
        ((600, 1500), 19, 3, 2, 4),  # tall original
    ],
)
def test_planted_block_is_found(size, r0, c0, h, w):
    grid = planted(24, 24, r0, c0, h, w, rng=np.random.default_rng(0))
    geometry = CanvasGeometry.create(size, (336, 336), "resize")
    result = search_roi(grid, geometry, base_side=336)
    cell_w, cell_h = geometry.grid_cell_size(grid.shape)
    cx, cy = (c0 + w / 2) * cell_w, (r0 + h / 2) * cell_h  # block centre in original pixels
    assert result.box.contains_point(cx, cy)
    # the block (in original pixels) lies inside the box, and the box is inside the image
    block = Box(int(c0 * cell_w), int(r0 * cell_h), int((c0 + w) * cell_w), int((r0 + h) * cell_h))
    assert result.box.x0 <= block.x0 + 1 and result.box.x1 >= block.x1 - 1
    assert result.box.y0 <= block.y0 + 1 and result.box.y1 >= block.y1 - 1
    assert 0 <= result.box.x0 < result.box.x1 <= size[0] and 0 <= result.box.y0 < result.box.y1 <= size[1]
    assert tuple(result.box.as_list()) == upstream_box(grid, size, 336)


def test_box_is_square_in_pixels_on_non_square_original():
    """Not a difference: upstream also counts cells per axis (block_size is (W/cols, H/rows)),
    so its window and box are square in original pixels too, and the boxes are identical."""
    grid = planted(24, 24, 10, 10, 2, 2)
    result = ours(grid, (1600, 900), 336)
    assert result.box.width == result.box.height == int(336 * result.ratio // 2) * 2
    assert tuple(result.box.as_list()) == upstream_box(grid, (1600, 900), 336)


def test_chosen_ratio_has_the_sharpest_peak():
    yy, xx = np.mgrid[0:24, 0:24]
    blob = np.exp(-((yy - 12.0) ** 2 + (xx - 9.0) ** 2) / (2 * 3.0**2))
    result = ours(blob, (1344, 1344), 336)
    assert set(result.sharpness) == {1.0, 1.2, 1.4, 1.6, 1.8, 2.0}
    assert result.sharpness[result.ratio] == max(result.sharpness.values())
    assert result.box.contains_point(9.5 * 56, 12.5 * 56)
    assert tuple(result.box.as_list()) == upstream_box(blob, (1344, 1344), 336)


@pytest.mark.parametrize(
    "rows,cols,base",
    [(24, 24, 336), (16, 16, 224), (12, 12, 336), (7, 7, 150), (24, 12, 336), (9, 20, 224)],
)
def test_agrees_exactly_with_upstream_on_random_maps(rows, cols, base):
    """Continuous random maps (no ties), square and non-square originals, any image no larger
    than base_side per cell: the box is identical to upstream's, bit for bit."""
    rng = np.random.default_rng(rows * 100 + cols)
    yy, xx = np.mgrid[0:rows, 0:cols]
    ratios_seen, whole, skipped, non_square = set(), 0, 0, 0
    for trial in range(40):
        w = int(rng.integers(base // 2, base * min(rows, cols) + 1))
        h = w if trial % 3 == 0 else int(rng.integers(base // 2, base * rows + 1))
        grid = rng.random((rows, cols)) ** 4
        if trial % 2:  # plus a blob of random width, so that larger ratios win too
            cy, cx, sigma = rng.random() * rows, rng.random() * cols, 0.5 + rng.random() * rows / 3
            grid = 0.2 * grid + np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        result = ours(grid, (w, h), base)
        assert tuple(result.box.as_list()) == upstream_box(grid, (w, h), base), (trial, (w, h))
        ratios_seen.add(result.ratio)
        whole += result.whole_image
        skipped += (not result.whole_image) and len(result.sharpness) < len(DEFAULT_RATIOS)
        non_square += w != h
    # the cases exercised: several winning ratios, non-square originals, and ratios dropped
    # because their window covers the whole grid (where upstream indexes `ratios` by position)
    assert len(ratios_seen) >= 3 and non_square >= 20 and skipped >= 1, (ratios_seen, skipped)


def test_agrees_exactly_on_exact_ties():
    """Ties whose sums are exact in floating point (integer maps, noise-free planted blocks):
    both take the first maximum in upstream's x-outer, y-inner scan, so boxes are identical."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        size = (int(rng.integers(336, 4000)), int(rng.integers(336, 4000)))
        grid = rng.integers(0, 3, (24, 24)).astype(float)
        assert tuple(ours(grid, size, 336).box.as_list()) == upstream_box(grid, size, 336), trial
    for r0, c0 in [(0, 0), (10, 4), (20, 20), (3, 17)]:
        grid = planted(24, 24, r0, c0, 2, 2)  # many tied windows contain the whole block
        assert tuple(ours(grid, (1344, 1344), 336).box.as_list()) == upstream_box(grid, (1344, 1344), 336)


def test_small_image_gives_whole_image():
    """Not a difference: upstream returns the whole image when the ratio-1 window already
    covers the whole grid; so does ours."""
    result = ours(np.ones((24, 24)), (300, 200), 336)
    assert result.whole_image and result.box == Box(0, 0, 300, 200)
    assert upstream_box(np.ones((24, 24)), (300, 200), 336) == (0, 0, 300, 200)


def test_differs_when_a_cell_is_larger_than_the_crop():
    """Difference 1: cells wider than base_side*ratio original pixels (24x24 grid on a 9000 px
    image, base 336: cells are 375 px). Upstream's block_num is int(336/375) = 0, so its windows
    are empty, its sharpness is 0/0 = nan (RuntimeWarning), np.argmax takes the nan ratio and the
    box is pinned to the top-left corner whatever the attention. Ours clamps the window to at
    least one cell (max(1, ...)), so it still finds the peak. Why: a crop must follow attention."""
    grid = np.zeros((24, 24))
    grid[15, 18] = 1.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upstream = upstream_box(grid, (9000, 9000), 336)
    assert upstream == (0, 0, 336, 336)
    assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    result = ours(grid, (9000, 9000), 336)
    assert result.window == (18, 15, 1, 1) and result.ratio == 1.0
    assert result.box == Box(6769, 5644, 7105, 5980)  # centre int(18.5 * 375), int(15.5 * 375)
    assert result.box.contains_point(18.5 * 375, 15.5 * 375)


def test_differs_in_pad_geometry():
    """Difference 2: upstream has no letterbox; it always maps the grid as stretched over the
    whole original (our "resize" geometry). With a "pad" global image (3200x1600 -> 336x168
    content at offset (0, 84)) a grid cell is 133.3 px and the grid starts at y = -800, so the
    block at rows 7-8 lies at y ~ 267; upstream, and ours in "resize", put it at y ~ 533 and miss
    it. Why: ours maps through the geometry the edge actually used to build the global image."""
    size = (3200, 1600)
    grid = planted(24, 24, 7, 11, 2, 2, rng=np.random.default_rng(0))
    upstream = upstream_box(grid, size, 336)
    assert upstream == tuple(ours(grid, size, 336, "resize").box.as_list())  # upstream == resize
    padded = ours(grid, size, 336, "pad")
    geometry = CanvasGeometry.create(size, (336, 336), "pad")
    (cell_w, cell_h), (ox, oy) = geometry.grid_cell_size(grid.shape), geometry.grid_origin()
    true_x, true_y = ox + 12 * cell_w, oy + 8 * cell_h  # block centre, original pixels
    assert (true_x, true_y) == pytest.approx((1600.0, 266.667), abs=1e-3)
    assert padded.box == Box(1432, 98, 1768, 434)
    assert padded.box.contains_point(true_x, true_y)
    assert not Box(*upstream).contains_point(true_x, true_y)


def test_differs_on_ties_broken_by_rounding():
    """Difference 3 (not intended; floating point): where many windows tie mathematically but
    their sums are not exact (a flat map of 1/576 plus one spike), which tied window is "first"
    depends on rounding. Upstream sums each window directly; ours uses an integral image, whose
    rounding differs, so the chosen window (and from it the sharpness and ratio) can differ.
    Both choices are genuine maxima to within rounding and both boxes contain the spike."""
    grid = np.full((24, 24), 1 / 576.0)
    grid[12, 12] += 0.5
    size = (1344, 1344)  # 56 px cells
    upstream = upstream_box(grid, size, 336)
    result = ours(grid, size, 336)
    assert upstream == (392, 616, 728, 952)
    assert result.box == Box(667, 667, 1069, 1069) and result.ratio == 1.2
    assert tuple(result.box.as_list()) != upstream
    spike = (12.5 * 56, 12.5 * 56)
    assert result.box.contains_point(*spike) and Box(*upstream).contains_point(*spike)
    # our window, re-summed upstream's way, is a maximum over all windows of its shape
    col, row, cols, rows = result.window
    direct = np.array(
        [[grid[y : y + rows, x : x + cols].sum() for x in range(24 - cols + 1)] for y in range(24 - rows + 1)]
    )
    assert direct[row, col] == pytest.approx(direct.max(), rel=1e-12, abs=0)


def test_differs_in_coordinate_types():
    """Difference 4 (cosmetic): for a non-integer ratio upstream's selected_bbox_size is a float,
    so it returns floats (1549.0, ...); ours returns int pixel boxes with the same values."""
    grid = np.random.default_rng(3).random((24, 24)) ** 4
    raw = bbox_from_att_image_adaptive(grid, (2000, 1500), 336)
    result = ours(grid, (2000, 1500), 336)
    assert result.ratio == 1.2 and raw == (1549.0, 361.0, 1951.0, 763.0)
    assert all(isinstance(v, float) for v in raw)
    assert result.box.as_list() == [1549, 361, 1951, 763] and all(type(v) is int for v in result.box.as_list())


def test_differs_on_invalid_maps():
    """Difference 5: upstream accepts a map containing NaN and silently returns some box; ours
    refuses it (ValueError), since a NaN attention map means the attention step is broken."""
    grid = np.random.default_rng(0).random((24, 24))
    grid[3, 3] = np.nan
    assert upstream_box(grid, (1000, 1000), 336) == (82, 664, 418, 1000)
    with pytest.raises(ValueError):
        ours(grid, (1000, 1000), 336)


def test_pad_mode_maps_through_letterbox():
    # 1600x800 padded into 336x336: content 336x168 at offset (0, 84); grid rows 6..17 show the image.
    geometry = CanvasGeometry.create((1600, 800), (336, 336), "pad")
    assert geometry.content_size == (336, 168) and geometry.offset == (0, 84)
    grid = planted(24, 24, 12, 20, 2, 2)  # right side, vertical middle of the content
    result = search_roi(grid, geometry, base_side=336)
    cell = geometry.grid_cell_size(grid.shape)
    ox, oy = geometry.grid_origin()
    cx, cy = ox + 21 * cell[0], oy + 13 * cell[1]
    assert result.box.contains_point(cx, cy)
    assert result.box.x1 <= 1600 and result.box.y1 <= 800 and result.box.y0 >= 0


def test_bad_inputs():
    geometry = CanvasGeometry.create((500, 500), (336, 336), "resize")
    with pytest.raises(ValueError):
        search_roi(np.zeros((0, 0)), geometry, 336)
    with pytest.raises(ValueError):
        search_roi(np.array([[np.nan, 1.0], [1.0, 1.0]]), geometry, 336)
    with pytest.raises(ValueError):
        search_roi(np.ones((4, 4)), geometry, 0)


@pytest.mark.parametrize(
    "original,budget", [((400, 300), 24), ((1920, 1080), 256), ((1080, 1920), 256), ((500, 500), 64)]
)
def test_budget_geometry_non_square_grids_agree_with_upstream(original, budget):
    """Qwen-VL's native resolution: the global image keeps the photo's aspect ratio at a token
    budget, so the grid after the 2 x 2 merge is non-square (e.g. 16:9 -> 12 x 21 at 256 tokens).
    Cells are W / cols x H / rows original pixels exactly, and the box is upstream's."""
    from collab.imaging import GlobalBudget

    unit = 28
    canvas = GlobalBudget(unit, budget).size_for(original)
    rows, cols = canvas[1] // unit, canvas[0] // unit
    geometry = CanvasGeometry.create(original, canvas, "resize")
    assert geometry.grid_cell_size((rows, cols)) == pytest.approx((original[0] / cols, original[1] / rows), rel=1e-15)
    assert geometry.to_original(*geometry.to_canvas(123.0, 77.0)) == pytest.approx((123.0, 77.0))
    rng = np.random.default_rng(budget)
    base = 4 * unit  # the local image's side: a 4 x 4-token crop
    for _ in range(20):
        grid = rng.random((rows, cols)) ** 4
        result = search_roi(grid, geometry, base)
        assert tuple(result.box.as_list()) == upstream_box(grid, original, base)
        assert 0 <= result.box.x0 < result.box.x1 <= original[0] and 0 <= result.box.y0 < result.box.y1 <= original[1]
