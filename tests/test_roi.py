import numpy as np
import pytest

from collab.geometry import Box, CanvasGeometry
from collab.roi import search_roi, window_sums


def vicrop_reference(att_map, image_size, bbox_size, ratios=(1, 1.2, 1.4, 1.6, 1.8, 2)):
    """ViCrop's bbox_from_att_image_adaptive, loops and all (resize geometry)."""
    max_att_poses, differences, block_nums, used = [], [], [], []
    block_size = image_size[0] / att_map.shape[1], image_size[1] / att_map.shape[0]
    for ratio in ratios:
        block_num = (
            max(1, min(int(bbox_size * ratio / block_size[0]), att_map.shape[1])),
            max(1, min(int(bbox_size * ratio / block_size[1]), att_map.shape[0])),
        )
        if att_map.shape[1] - block_num[0] < 1 and att_map.shape[0] - block_num[1] < 1:
            if ratio == ratios[0]:
                return 0, 0, image_size[0], image_size[1]
            continue
        block_nums.append(block_num)
        used.append(ratio)
        sliding = np.zeros((att_map.shape[0] - block_num[1] + 1, att_map.shape[1] - block_num[0] + 1))
        max_att, pos = -np.inf, (0, 0)
        for x in range(att_map.shape[1] - block_num[0] + 1):
            for y in range(att_map.shape[0] - block_num[1] + 1):
                att = att_map[y : y + block_num[1], x : x + block_num[0]].sum()
                sliding[y, x] = att
                if att > max_att:
                    max_att, pos = att, (x, y)
        adj = []
        if pos[0] > 0:
            adj.append(sliding[pos[1], pos[0] - 1])
        if pos[0] < sliding.shape[1] - 1:
            adj.append(sliding[pos[1], pos[0] + 1])
        if pos[1] > 0:
            adj.append(sliding[pos[1] - 1, pos[0]])
        if pos[1] < sliding.shape[0] - 1:
            adj.append(sliding[pos[1] + 1, pos[0]])
        differences.append((max_att - np.mean(adj)) / (block_num[0] * block_num[1]))
        max_att_poses.append(pos)
    best = int(np.argmax(differences))
    pos, block_num = max_att_poses[best], block_nums[best]
    size = bbox_size * used[best]
    xc = int(pos[0] * block_size[0] + block_size[0] * block_num[0] / 2)
    yc = int(pos[1] * block_size[1] + block_size[1] * block_num[1] / 2)
    half = int(size // 2)
    xc = min(max(xc, half), image_size[0] - half)
    yc = min(max(yc, half), image_size[1] - half)
    return max(0, xc - half), max(0, yc - half), min(image_size[0], xc + half), min(image_size[1], yc + half)


def planted(rows, cols, r0, c0, h, w, value=10.0, rng=None):
    grid = np.zeros((rows, cols)) if rng is None else rng.random((rows, cols)) * 0.1
    grid[r0 : r0 + h, c0 : c0 + w] += value
    return grid


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
    assert tuple(result.box.as_list()) == vicrop_reference(grid, size, 336)


def test_box_is_square_in_pixels_on_non_square_original():
    grid = planted(24, 24, 10, 10, 2, 2)
    result = search_roi(grid, CanvasGeometry.create((1600, 900), (336, 336), "resize"), base_side=336)
    assert result.box.width == result.box.height == int(336 * result.ratio // 2) * 2


def test_chosen_ratio_has_the_sharpest_peak():
    yy, xx = np.mgrid[0:24, 0:24]
    blob = np.exp(-((yy - 12.0) ** 2 + (xx - 9.0) ** 2) / (2 * 3.0**2))
    result = search_roi(blob, CanvasGeometry.create((1344, 1344), (336, 336), "resize"), 336)
    assert set(result.sharpness) == {1.0, 1.2, 1.4, 1.6, 1.8, 2.0}
    assert result.sharpness[result.ratio] == max(result.sharpness.values())
    assert result.box.contains_point(9.5 * 56, 12.5 * 56)


def test_agrees_with_bruteforce_reference_on_random_maps():
    rng = np.random.default_rng(42)
    for trial in range(30):
        rows = cols = int(rng.integers(6, 25))
        size = (int(rng.integers(300, 1600)), int(rng.integers(300, 1600)))
        grid = rng.random((rows, cols)) ** 4
        base = int(rng.integers(100, 400))
        ours = search_roi(grid, CanvasGeometry.create(size, (336, 336), "resize"), base)
        assert tuple(ours.box.as_list()) == vicrop_reference(grid, size, base), (trial, size, base)


def test_small_image_gives_whole_image():
    result = search_roi(np.ones((24, 24)), CanvasGeometry.create((300, 200), (336, 336), "resize"), 336)
    assert result.whole_image and result.box == Box(0, 0, 300, 200)


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
