"""How per-head, per-row attention maps become the one map the RoI search reads."""

import numpy as np
import pytest

from collab import stages
from collab.attention import combine_maps, reduce_heads, reduce_rows
from collab.config import AttentionConfig, ConfigError, parse_config

N = 16  # a 4 x 4 token grid, flattened


def peaked(at: int | list[int], weight: float = 9.0) -> np.ndarray:
    m = np.ones(N)
    m[at] += weight
    return m


def test_sharpest_row_is_the_row_that_looks_at_one_place():
    # head 0 looks from its last row, head 1 from its first; the other rows spread over the image
    maps = np.stack([np.stack([np.ones(N), np.ones(N), peaked(5)]), np.stack([peaked(11), np.ones(N), np.ones(N)])])
    sharp = reduce_rows(maps, "sharpest")
    assert sharp.shape == (2, N)
    assert int(sharp[0].argmax()) == 5 and int(sharp[1].argmax()) == 11
    np.testing.assert_allclose(sharp.sum(axis=1), 1.0)
    # the mean dilutes each look with the rows that look nowhere
    mean = reduce_rows(maps, "mean")
    np.testing.assert_allclose(mean, maps.mean(axis=1))
    assert mean[0].max() / mean[0].mean() < sharp[0].max() / sharp[0].mean()


def test_geometric_mean_of_heads_scores_where_every_head_looks():
    """The colour word's head looks at both red objects (cells 2, 9), the shape word's at both circles
    (9, 14): only the red circle (9) draws both looks."""
    colour, shape = peaked([2, 9], 6.0), peaked([9, 14], 6.0)
    colour[2] += 8.0  # the other red object is larger: the mean of heads prefers it
    maps = np.stack([colour, shape])
    assert int(reduce_heads(maps, "mean").argmax()) == 2
    assert int(reduce_heads(maps, "geometric").argmax()) == 9


def test_geometric_mean_does_not_depend_on_each_heads_scale():
    maps = np.stack([peaked(3), peaked([3, 7])])
    scaled = maps * np.array([[100.0], [0.01]])
    np.testing.assert_allclose(reduce_heads(maps, "geometric"), reduce_heads(scaled, "geometric"))


def test_combine_divides_each_head_by_its_own_generic_map():
    """A place a head attends to whatever is asked (cell 0 for head 0) cancels in relative attention;
    head 1's generic map is flat, so its own look is kept whatever head 0's generic map is."""
    question = np.stack([np.stack([peaked([0, 6])]), np.stack([peaked(6)])])
    generic = np.stack([np.stack([peaked(0), peaked(0)]), np.stack([np.ones(N), np.ones(N)])])
    plain = combine_maps(question[:1], None, "sharpest", "mean")
    assert plain[0] == pytest.approx(plain[6])  # head 0 alone cannot tell its salient cell from the object
    relative = combine_maps(question[:1], generic[:1], "sharpest", "mean")
    assert int(relative.argmax()) == 6 and relative[6] > 2 * relative[0]
    both = combine_maps(question, generic, "sharpest", "geometric")
    assert int(both.argmax()) == 6


def test_zero_maps_and_bad_shapes():
    assert np.allclose(reduce_rows(np.zeros((1, 2, N)), "sharpest"), 1.0 / N)  # uniform, not NaN
    assert np.all(np.isfinite(reduce_heads(np.zeros((2, N)), "geometric")))
    with pytest.raises(ValueError, match="heads, rows, n"):
        reduce_rows(np.ones((2, N)), "mean")
    with pytest.raises(ValueError, match="at least one row"):
        reduce_rows(np.ones((2, 0, N)), "mean")
    with pytest.raises(ValueError, match="unknown row reduction"):
        reduce_rows(np.ones((1, 1, N)), "max")
    with pytest.raises(ValueError, match="unknown head reduction"):
        reduce_heads(np.ones((1, N)), "median")
    with pytest.raises(ValueError, match="do not match"):
        combine_maps(np.ones((2, 1, N)), np.ones((3, 1, N)), "mean", "mean")


def test_config_names_the_reductions_and_when_a_prefill_serves():
    assert not AttentionConfig().per_head
    assert stages.prefill_captures(AttentionConfig(query_rows="last_input"))
    per_head = AttentionConfig(query_rows="last_input", head_reduce="geometric")
    assert per_head.per_head and not stages.prefill_captures(per_head)
    assert AttentionConfig(rows="sharpest").per_head
    with pytest.raises(ConfigError, match="rows"):
        parse_config({"attention": {"rows": "loudest"}})


def test_per_head_read_on_a_model(tiny_backend):
    """stages' per-head read: one map per layer on the token grid, finite, the reduction of the
    backend's unreduced maps (relative: divided head by head by the generic prompt's)."""
    from collab.backends.base import AttentionRequest

    cfg = AttentionConfig(layer=0, query_rows="question", heads=[0, 1], rows="sharpest", head_reduce="geometric")
    features = tiny_backend.encode_images([_image()])[0]
    maps = stages.attention_maps(tiny_backend, features, "what number is in the red circle?", [], cfg, [0, 1])
    assert len(maps) == 2 and all(m.shape == tiny_backend.info.grid and np.all(np.isfinite(m)) for m in maps)
    question = AttentionRequest(features, "what number is in the red circle?")
    (q,) = tiny_backend.attention_rows_batch([question], [0], "question", [0, 1])[0]
    (g,) = tiny_backend.attention_rows_batch([AttentionRequest(features, cfg.generic_prompt)], [0], "question", [0, 1])[
        0
    ]
    expected = combine_maps(q.reshape(2, q.shape[1], -1), g.reshape(2, g.shape[1], -1), "sharpest", "geometric")
    np.testing.assert_allclose(maps[0].ravel(), expected, rtol=1e-6)


def test_layer_heads_read_pairs_from_several_layers_as_one_set_of_heads(tiny_backend):
    """attention.layer_heads: the listed (layer, head) maps reduced together, as one layer's heads
    would be; one pair is the per-head read of that layer and head; a pair the model lacks is a
    configuration error at start-up."""
    from collab.backends.base import AttentionRequest

    cfg = AttentionConfig(
        query_rows="question", rows="sharpest", head_reduce="geometric", layer_heads=[(0, 1), (-1, 0)]
    )
    assert cfg.per_head and not stages.prefill_captures(cfg)
    features = tiny_backend.encode_images([_image()])[0]
    question = "what number is in the red circle?"
    got = stages.attention_map(tiny_backend, features, question, [], cfg)
    last = tiny_backend.info.num_layers - 1
    q0, q1 = tiny_backend.attention_rows_batch([AttentionRequest(features, question)], [0, last], "question")[0]
    g0, g1 = tiny_backend.attention_rows_batch([AttentionRequest(features, cfg.generic_prompt)], [0, last], "question")[
        0
    ]
    q, g = np.stack([q0[1], q1[0]]), np.stack([g0[1], g1[0]])
    expected = combine_maps(q.reshape(2, q.shape[1], -1), g.reshape(2, g.shape[1], -1), "sharpest", "geometric")
    assert got.shape == tiny_backend.info.grid
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-6)

    one_pair = cfg.model_copy(update={"layer_heads": [(last, 1)]})
    one_layer = cfg.model_copy(update={"layer_heads": None, "layer": last, "heads": [1]})
    np.testing.assert_allclose(
        stages.attention_map(tiny_backend, features, question, [], one_pair),
        stages.attention_map(tiny_backend, features, question, [], one_layer),
        rtol=1e-6,
    )
    n_layers, n_heads = tiny_backend.info.num_layers, tiny_backend.info.num_heads
    for bad in ([(n_layers, 0)], [(0, n_heads)]):
        with pytest.raises(ConfigError, match="attention"):
            stages.check_attention_fits(cfg.model_copy(update={"layer_heads": bad}), tiny_backend.info)
    for bad in ([], [[0, 1], [0, 1]], [[0, -1]]):
        with pytest.raises(ConfigError, match="layer_heads"):
            parse_config({"attention": {"layer_heads": bad}})


def _image():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
