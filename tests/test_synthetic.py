"""The synthetic benchmark: deterministic, boxes match the pixels, questions match the objects."""

import io
import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from collab.data import synthetic as syn

SAMPLE = [syn.generate_item(11, i) for i in range(24)]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_bytes_and_different_seeds_differ():
    a, b = syn.generate_item(3, 7), syn.generate_item(3, 7)
    assert png_bytes(a.image) == png_bytes(b.image)
    assert a.to_record() == b.to_record()
    assert png_bytes(syn.generate_item(4, 7).image) != png_bytes(a.image)
    assert png_bytes(syn.generate_item(3, 8).image) != png_bytes(a.image)


def test_item_does_not_depend_on_how_many_came_before():
    items = list(syn.generate_items(5, 4))
    assert [it.index for it in items] == [0, 1, 2, 3]
    alone = syn.generate_item(5, 3)
    assert png_bytes(items[3].image) == png_bytes(alone.image)
    assert items[3].to_record() == alone.to_record()
    tail = list(syn.generate_items(5, 2, start=2))
    assert png_bytes(tail[1].image) == png_bytes(alone.image)


def test_scene_does_not_depend_on_question_mix():
    fine = syn.generate_item(9, 2, fine_fraction=1.0)
    coarse = syn.generate_item(9, 2, fine_fraction=0.0)
    assert (fine.kind, coarse.kind) == ("fine", "coarse")
    assert png_bytes(fine.image) == png_bytes(coarse.image)
    assert fine.objects == coarse.objects


def test_image_sizes():
    for it in SAMPLE:
        assert it.image.mode == "RGB"
        assert (it.width, it.height) == it.image.size
        assert it.image.size in syn.IMAGE_SIZES and min(it.image.size) >= 384
    assert len({it.image.size for it in SAMPLE}) >= 3  # several aspect ratios show up


def test_objects_unique_sized_and_apart():
    for it in SAMPLE:
        objs = it.objects
        assert 2 <= len(objs) <= 5
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= it.width and 0 <= y0 < y1 <= it.height
            lo, hi = syn.OBJECT_FRACTION
            assert (
                0.9 * lo * max(it.image.size) - 1 <= x1 - x0 <= hi * max(it.image.size) + 1
            )  # shrunk once at most here
            assert o["color"] in syn.COLORS and o["shape"] in syn.SHAPES and o["digit"] in syn.DIGITS
        for a, b in itertools.combinations(objs, 2):
            assert syn._gap(a["box"], b["box"]) >= syn.OBJECT_GAP


def test_boxes_match_pixels():
    """The object's colour fills its box; the glyph box lies inside the shape and holds ink."""
    for it in SAMPLE:
        arr = np.asarray(it.image)
        for o in it.objects:
            x0, y0, x1, y1 = o["box"]
            colour = np.array(syn.COLORS[o["color"]], dtype=np.uint8)
            region = arr[y0:y1, x0:x1]
            assert (region == colour).all(axis=-1).mean() > 0.3, o
            gx0, gy0, gx1, gy1 = o["glyph_box"]
            assert x0 <= gx0 < gx1 <= x1 and y0 <= gy0 < gy1 <= y1
            assert abs((gy1 - gy0) / (x1 - x0) - syn.GLYPH_FRACTION) <= 0.01 + 1 / (x1 - x0)
            glyph = arr[gy0:gy1, gx0:gx1]
            ink = np.array(syn.ink_for(o["color"]), dtype=np.uint8)
            is_ink = (glyph == ink).all(axis=-1)
            is_fill = (glyph == colour).all(axis=-1)
            assert (is_ink | is_fill).all(), f"glyph box of {o} leaves the shape"
            assert is_ink.sum() >= 10
            # A ring of object colour just outside the glyph box: the digit is framed by the shape.
            ring = arr[gy0 - 2 : gy1 + 2, gx0 - 2 : gx1 + 2]
            assert ((ring == ink).all(axis=-1) | (ring == colour).all(axis=-1)).all()


def test_answers_consistent_with_objects():
    for it in SAMPLE:
        assert it.answers == [it.answer] * 10
        assert re.fullmatch(r"syn-11-\d{6}", it.question_id)
        by_box = {tuple(o["box"]): o for o in it.objects}
        if it.qtype == "count":
            assert it.target_box is None and it.answer == str(len(it.objects))
            continue
        target = by_box[tuple(it.target_box)]
        if it.qtype == "number":
            assert it.kind == "fine" and it.answer == target["digit"]
            assert it.glyph_box == target["glyph_box"]
            assert f"{target['color']} {target['shape']}" in it.question
        elif it.qtype == "color":
            assert it.kind == "coarse" and it.answer == target["color"]
            assert sum(o["shape"] == target["shape"] for o in it.objects) == 1
        else:
            assert it.qtype == "shape" and it.answer == target["shape"]
            assert sum(o["color"] == target["color"] for o in it.objects) == 1


def test_questions_for_scene_covers_every_object():
    scene = syn.make_scene(2, 5)
    qs = syn.questions_for_scene(scene)
    fine = [q for q in qs if q.kind == "fine"]
    assert len(fine) == len(scene.objects)
    assert sorted(q.answer for q in fine) == sorted(o.digit for o in scene.objects)
    assert sum(q.qtype == "count" for q in qs) == 1
    for q in qs:
        assert all(tok in syn.VOCABULARY for tok in syn.tokenize_text(q.question))
        assert q.answer in syn.VOCABULARY


def test_vocabulary_and_tokenizer():
    assert syn.tokenize_text("What color is the circle?") == ["what", "color", "is", "the", "circle", "?"]
    assert "?" in syn.VOCABULARY and "color" in syn.VOCABULARY and "colour" not in syn.VOCABULARY
    assert set(syn.DIGITS) | set(syn.COLORS) | set(syn.SHAPES) <= set(syn.VOCABULARY)
    assert syn.VOCABULARY == sorted(set(syn.VOCABULARY))
    for it in SAMPLE:
        assert it.question == it.question.lower()
        assert all(tok in syn.VOCABULARY for tok in syn.tokenize_text(it.question))
        assert syn.tokenize_text(it.answer) == [it.answer]


def test_kind_and_fine_fraction():
    assert all(syn.generate_item(1, i, kind="fine").kind == "fine" for i in range(5))
    assert all(syn.generate_item(1, i, kind="coarse").kind == "coarse" for i in range(5))
    assert all(syn.generate_item(1, i, fine_fraction=0.0).kind == "coarse" for i in range(5))
    kinds = [it.kind for it in SAMPLE]  # default fine_fraction 0.5
    assert 4 <= kinds.count("fine") <= 20
    with pytest.raises(ValueError):
        syn.generate_item(1, 0, kind="medium")
    with pytest.raises(ValueError):
        syn.generate_item(1, 0, fine_fraction=1.5)


def test_n_objects_and_clutter_controls():
    one = syn.make_scene(0, 0, n_objects=1, clutter=0.0)
    assert len(one.objects) == 1
    assert {q.qtype for q in syn.questions_for_scene(one)} == {"number", "color", "shape", "count"}
    assert len(syn.make_scene(0, 0, n_objects=5).objects) == 5
    crowded = syn.make_scene(0, 0, n_objects=syn.TRAIN_MAX_OBJECTS)  # training only
    assert len(crowded.objects) == syn.TRAIN_MAX_OBJECTS
    assert min(o.box[2] - o.box[0] for o in crowded.objects) >= 0.2 * max(crowded.width, crowded.height)
    with pytest.raises(ValueError):
        syn.make_scene(0, 0, n_objects=syn.TRAIN_MAX_OBJECTS + 1)


def test_all_digits_render_differently():
    """Every pair of digits differs in pixels at full resolution (1 vs 7 included), at every size used."""
    for height in range(10, 20):
        w, h, _ = syn.glyph_size(height)
        masks = {}
        for d in syn.DIGITS:
            im = Image.new("L", (w, h), 0)
            syn.draw_digit(ImageDraw.Draw(im), d, [0, 0, w, h], 255)
            masks[d] = np.asarray(im) > 0
        for a, b in itertools.combinations(syn.DIGITS, 2):
            assert (masks[a] != masks[b]).sum() >= 2 * (h // 7), (height, a, b)


def test_scale_relations_keep_the_method_premise():
    """In the 96 px global image an object spans about 3 patches (its colour and shape legible) while its
    digit is under 4 px tall; in the evaluation's ground-truth crop (1.25 object sides, resized to 96 px)
    the digit is about 9 px tall."""
    for it in [syn.generate_item(21, i) for i in range(60)]:
        sx, sy = 96 / it.width, 96 / it.height
        for o in it.objects:
            side = o["box"][2] - o["box"][0]
            glyph = o["glyph_box"][3] - o["glyph_box"][1]
            assert 19 <= side * min(sx, sy) <= 27
            assert glyph * sy < 4.0
            assert glyph * 96 / (1.25 * side) >= 8.0


def test_lookalike_distractors_are_common_and_counted():
    """Another object shares the target's colour or shape in at least 30 % of fine items; the share is
    computed from the records and written into dataset.json."""
    records = [it.to_record() for it in syn.generate_items(13, 300)]
    share = syn.lookalike_share(records)
    assert 0.3 <= share <= 0.9
    fine = [r for r in records if r["kind"] == "fine"]
    by_hand = np.mean(
        [
            any(
                o["box"] != r["target_box"] and (o["color"] == t["color"] or o["shape"] == t["shape"])
                for o in r["objects"]
            )
            for r in fine
            for t in [next(o for o in r["objects"] if o["box"] == r["target_box"])]
        ]
    )
    assert share == pytest.approx(by_hand)
    assert syn.lookalike_share([r for r in records if r["kind"] == "coarse"]) is None


def test_lookalike_kind_names_the_attribute_the_distractors_share():
    def obj(box, color, shape):
        return {"box": box, "color": color, "shape": shape}

    target = obj([0, 0, 10, 10], "red", "circle")
    cases = {
        "none": [obj([20, 0, 30, 10], "blue", "square")],
        "color": [obj([20, 0, 30, 10], "red", "square")],
        "shape": [obj([20, 0, 30, 10], "blue", "circle")],
        "both": [obj([20, 0, 30, 10], "red", "square"), obj([40, 0, 50, 10], "blue", "circle")],
    }
    for kind, others in cases.items():
        assert syn.lookalike_kind([target, *others], target["box"]) == kind
        assert syn.has_lookalike([target, *others], target["box"]) == (kind != "none")
    assert syn.lookalike_kind(cases["none"], target["box"]) is None  # the target is not in the scene


def test_legible_glyphs_are_a_training_option_that_only_enlarges_the_digit():
    plain = syn.render_scene(np.random.default_rng(5), n_objects=3)
    big = syn.render_scene(np.random.default_rng(5), n_objects=3, legible_glyphs=True)
    assert big.legible_glyphs and not plain.legible_glyphs
    for a, b in zip(plain.objects, big.objects):
        assert (a.box, a.color, a.shape) == (b.box, b.color, b.shape)
        side = b.box[2] - b.box[0]
        assert (
            syn.LEGIBLE_GLYPH_FRACTION[0] - 0.01
            <= (b.glyph_box[3] - b.glyph_box[1]) / side
            <= syn.LEGIBLE_GLYPH_FRACTION[1] + 0.01
        )
        assert (b.glyph_box[3] - b.glyph_box[1]) * 96 / max(big.image.size) >= 8  # readable in the global image
    for i in range(5):  # the benchmark never draws them
        scene = syn.make_scene(5, i)
        assert not scene.legible_glyphs
        assert all(
            abs((o.glyph_box[3] - o.glyph_box[1]) / (o.box[2] - o.box[0]) - syn.GLYPH_FRACTION) <= 0.02
            for o in scene.objects
        )


def test_scenes_differing_only_in_digit_differ_only_in_glyph():
    scene = syn.make_scene(4, 1)
    obj = scene.objects[0]
    other = "7" if obj.digit != "7" else "1"
    changed = scene.image.copy()
    draw = ImageDraw.Draw(changed)
    gx0, gy0, gx1, gy1 = obj.glyph_box
    draw.rectangle((gx0, gy0, gx1 - 1, gy1 - 1), fill=syn.COLORS[obj.color])
    syn.draw_digit(draw, other, obj.glyph_box, syn.ink_for(obj.color))
    diff = (np.asarray(changed) != np.asarray(scene.image)).any(axis=-1)
    ys, xs = np.nonzero(diff)
    assert len(ys) > 0
    assert gx0 <= xs.min() and xs.max() < gx1 and gy0 <= ys.min() and ys.max() < gy1


def test_cli_writes_a_dataset(tmp_path):
    syn.main(["--seed", "2", "--n", "3", "--out", str(tmp_path / "ds"), "--fine-fraction", "1", "--no-progress"])
    lines = (tmp_path / "ds" / "questions.jsonl").read_text().splitlines()
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["version"] == "2.0" and meta["lookalike_share"] == syn.lookalike_share([json.loads(x) for x in lines])
    assert len(lines) == 3 and len(list((tmp_path / "ds" / "images").glob("*.png"))) == 3


def test_cli_help():
    out = subprocess.run(
        [sys.executable, "-m", "collab.data.synthetic", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for flag in ("--seed", "--n", "--out", "--fine-fraction"):
        assert flag in out.stdout
