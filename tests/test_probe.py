"""collab.eval.probe: token selection over an object, probe fitting, and the CLI on a tiny model."""

import json

import numpy as np
import pytest
import torch
import yaml

from collab.data.synthetic import COLORS, SHAPES, render_scene
from collab.eval.probe import ATTRIBUTES, VIEWS, covered_cells, main, object_token_indices, probe_table
from collab.geometry import CanvasGeometry


def test_object_tokens_are_the_cells_whose_centres_lie_in_the_box():
    geometry = CanvasGeometry.create((960, 960), (96, 96), "resize")  # 10x smaller, 8 px cells
    # original [0, 160) -> canvas [0, 16): cells 0 and 1 on each axis; token 0 is a CLS
    assert object_token_indices([0, 0, 160, 160], geometry, (12, 12), offset=1) == [1, 2, 13, 14]
    # non-square original: x shrinks 20x, y 10x
    wide = CanvasGeometry.create((1920, 960), (96, 96), "resize")
    assert object_token_indices([0, 0, 320, 80], wide, (12, 12), offset=0) == [0, 1]
    # a box holding no cell centre falls back to the cell under its centre
    assert object_token_indices([500, 500, 520, 520], geometry, (12, 12), offset=0) == [6 * 12 + 6]
    # pad mode: 1920x960 -> 96x48 content 24 px below the canvas top; x, y shrink 20x
    padded = CanvasGeometry.create((1920, 960), (96, 96), "pad")
    assert object_token_indices([0, 0, 160, 160], padded, (12, 12), offset=0) == [3 * 12 + 0]
    assert object_token_indices([0, 0, 320, 320], padded, (12, 12), offset=0) == [36, 37, 48, 49]


def test_single_tokens_are_the_cells_the_shape_covers_as_stage_1_labels_them():
    """The token view's cells are those stage 1's dense labels give the object (at the same cover),
    inside its box, and a triangle covers fewer of its box's cells than a square does."""
    from collab.training.tower import patch_labels

    for seed in range(6):
        scene = render_scene(np.random.default_rng(seed), n_objects=4)
        geometry = CanvasGeometry.create(scene.image.size, (96, 96), "resize")
        colors, shapes = patch_labels(scene, 12, min_cover=0.5)
        for obj in scene.objects:
            cells = covered_cells(obj, scene.image.size, geometry, (12, 12), "resize")
            own = (list(COLORS).index(obj.color), SHAPES.index(obj.shape))
            labelled = [p for p, label in enumerate(zip(colors, shapes)) if label == own]
            assert cells == labelled, (obj.shape, cells, labelled)
            assert set(cells) <= set(object_token_indices(obj.box, geometry, (12, 12), 0))
    scene = render_scene(np.random.default_rng(0), n_objects=1, size=(576, 576))
    obj = scene.objects[0]
    obj.box = [96, 96, 288, 288]  # 4 x 4 cells of the 96 px global image
    geometry = CanvasGeometry.create(scene.image.size, (96, 96), "resize")
    obj.shape = "square"
    square = covered_cells(obj, scene.image.size, geometry, (12, 12), "resize")
    obj.shape = "triangle"
    triangle = covered_cells(obj, scene.image.size, geometry, (12, 12), "resize")
    assert sorted(square) == [r * 12 + c for r in range(2, 6) for c in range(2, 6)]
    assert set(triangle) < set(square)


def test_probe_reads_an_encoded_attribute_and_not_noise():
    g = torch.Generator().manual_seed(0)
    n = 400
    labels = {a: torch.randint(len(v), (n,), generator=g) for a, v in ATTRIBUTES.items()}
    encoded = torch.nn.functional.one_hot(labels["shape"], len(ATTRIBUTES["shape"])).float()
    noise = torch.randn(n, 16, generator=g)
    data = {
        "features": {"global": torch.cat([noise, 0.1 * noise[:, :5] + encoded], 1), "crop": noise},
        "labels": labels,
    }
    table = probe_table(data, 0.75)
    assert table["n"] == n and table["n_train"] == 300
    assert table["views"]["global"]["shape"]["accuracy"] > 0.95
    for attr in ATTRIBUTES:  # pure noise: no better than chance plus a margin
        row = table["views"]["crop"][attr]
        assert row["accuracy"] < 1.0 / len(ATTRIBUTES[attr]) + 0.15, (attr, row)
        assert 0 < row["majority"] <= 1


def test_probe_rejects_a_split_without_held_out_objects():
    data = {"features": {"crop": torch.zeros(4, 3)}, "labels": {"shape": torch.zeros(4, dtype=torch.long)}}
    with pytest.raises(ValueError, match="held-out"):
        probe_table(data, 1.0)


def test_cli_on_tiny_model(tiny_config, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json")))
    assert main(["--config", str(cfg), "--n", "16", "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert report["n"] == 16 and report["n_train"] == 12
    assert set(report["views"]) == set(VIEWS)
    for view in VIEWS:
        assert set(report["views"][view]) == set(ATTRIBUTES)
        for row in report["views"][view].values():
            assert 0.0 <= row["accuracy"] <= 1.0
    assert "held-out objects" in capsys.readouterr().out
    assert main(["--config", str(cfg), "--n", "2"]) == 2
    assert main(["--config", "/nonexistent.yaml", "--n", "16", "--train", "1.0"]) == 2  # split refused first
    assert "no held-out objects" in capsys.readouterr().err


def test_collect_labels_each_object_with_its_own_attributes_and_cell(tiny_backend, tiny_config, monkeypatch):
    """Scenes with one object at a known place: every label is that object's, the cell its compass cell."""
    import numpy as np

    import collab.eval.probe as probe
    from collab.data.synthetic import COLORS, DIGITS, SHAPES, render_scene

    corners = {"northwest": (8, 8), "southeast": (440, 440), "center": (230, 230), "east": (440, 230)}
    drawn = []

    def one_object_scene(rng, legible_glyphs=False):
        assert not legible_glyphs  # the benchmark's scenes unless asked
        name = list(corners)[len(drawn) % len(corners)]
        scene = render_scene(np.random.default_rng(len(drawn)), n_objects=1, size=(576, 576))
        obj = scene.objects[0]
        x, y = corners[name]
        side = obj.box[2] - obj.box[0]
        obj.box = [x, y, x + side, y + side]  # labels only read the box; the pixels do not matter here
        drawn.append((name, obj))
        return scene

    monkeypatch.setattr(probe, "render_scene", one_object_scene)
    data = probe.collect(tiny_backend, tiny_config, 8, seed=0, batch=3, progress=False)
    labels = {a: y.tolist() for a, y in data["labels"].items()}
    assert [probe.CELLS[c] for c in labels["cell"]] == [name for name, _ in drawn]
    assert [SHAPES[s] for s in labels["shape"]] == [o.shape for _, o in drawn]
    assert [list(COLORS)[c] for c in labels["color"]] == [o.color for _, o in drawn]
    assert [DIGITS[d] for d in labels["digit"]] == [o.digit for _, o in drawn]
    assert {v: f.shape[0] for v, f in data["features"].items()} == {v: 8 for v in VIEWS}


def test_legible_glyphs_draws_training_scenes_with_digits_legible_globally(tiny_backend, tiny_config, monkeypatch):
    """--legible-glyphs probes stage 2's scale augmentation: its digits are several times taller."""
    import collab.eval.probe as probe
    from collab.data import synthetic

    heights = {}
    for legible in (False, True):
        drawn = []

        def recording(rng, legible_glyphs=False, _drawn=drawn):
            scene = synthetic.render_scene(rng, legible_glyphs=legible_glyphs)
            _drawn.append(scene)
            return scene

        monkeypatch.setattr(probe, "render_scene", recording)
        probe.collect(tiny_backend, tiny_config, 4, seed=0, batch=2, progress=False, legible_glyphs=legible)
        assert all(s.legible_glyphs == legible for s in drawn) and len(drawn) == 4
        heights[legible] = min(
            (o.glyph_box[3] - o.glyph_box[1]) / (o.box[3] - o.box[1]) for s in drawn for o in s.objects
        )
    assert heights[True] > 3 * heights[False]


def test_cli_takes_model_and_set_overrides(tiny_config, tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                **tiny_config.model_dump(mode="json"),
                "model": {**tiny_config.model.model_dump(mode="json"), "path": str(tmp_path / "absent")},
            }
        )
    )
    assert main(["--config", str(cfg), "--n", "8", "--no-progress"]) == 2  # the config's model is absent
    capsys.readouterr()
    assert (
        main(
            [
                "--config",
                str(cfg),
                "--model",
                str(tiny_model_dir),
                "--n",
                "8",
                "--no-progress",
                "--set",
                "imaging.jpeg_quality=70",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert report["model"] == str(tiny_model_dir) and report["config"]["imaging"]["jpeg_quality"] == 70
    assert main(["--config", str(cfg), "--set", "imaging.jpeg_quality"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
