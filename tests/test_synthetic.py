"""The synthetic benchmark: deterministic, boxes match the pixels, questions match the objects."""

import io
import itertools
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
        assert min(it.image.size) >= 384 and max(it.image.size) <= 704
    assert len({it.image.size for it in SAMPLE}) >= 3  # several aspect ratios show up


def test_objects_unique_sized_and_apart():
    for it in SAMPLE:
        objs = it.objects
        assert 2 <= len(objs) <= 5
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= it.width and 0 <= y0 < y1 <= it.height
            assert syn.OBJECT_SIZE[0] <= x1 - x0 <= syn.OBJECT_SIZE[1]
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
            assert syn.GLYPH_HEIGHT[0] <= gy1 - gy0 <= syn.GLYPH_HEIGHT[1]
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
    with pytest.raises(ValueError):
        syn.make_scene(0, 0, n_objects=6)


def test_all_digits_render_differently():
    """Every pair of digits differs in pixels at full resolution (1 vs 7 included), at every size."""
    for height in range(syn.GLYPH_HEIGHT[0], syn.GLYPH_HEIGHT[1] + 1):
        w, h, _ = syn.glyph_size(height)
        masks = {}
        for d in syn.DIGITS:
            im = Image.new("L", (w, h), 0)
            syn.draw_digit(ImageDraw.Draw(im), d, [0, 0, w, h], 255)
            masks[d] = np.asarray(im) > 0
        for a, b in itertools.combinations(syn.DIGITS, 2):
            assert (masks[a] != masks[b]).sum() >= 2 * (h // 7), (height, a, b)


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
    assert len(lines) == 3 and len(list((tmp_path / "ds" / "images").glob("*.png"))) == 3


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "collab.data.synthetic", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--seed", "--n", "--out", "--fine-fraction"):
        assert flag in out.stdout


def test_position_questions_name_the_cell_of_each_object_and_stay_out_of_the_benchmark():
    assert syn.position_word([0, 0, 10, 10], 300, 300) == "northwest"
    assert syn.position_word([140, 140, 160, 160], 300, 300) == "center"
    assert syn.position_word([290, 0, 300, 10], 300, 300) == "northeast"
    assert syn.position_word([0, 250, 20, 300], 300, 300) == "southwest"
    assert syn.position_word([250, 250, 300, 300], 300, 300) == "southeast"
    assert syn.position_word([199, 0, 200, 10], 300, 300) == "north"  # thirds are half-open: [100, 200) is the middle
    assert syn.position_word([199, 0, 201, 10], 300, 300) == "northeast"  # centre x = 200 starts the east third
    scene = syn.make_scene(3, 2, n_objects=4)
    questions = syn.position_questions(scene)
    assert [q.target_box for q in questions] == [o.box for o in scene.objects]
    for q, o in zip(questions, scene.objects):
        assert q.question == f"where is the {o.color} {o.shape}?" and q.kind == "coarse" and q.qtype == "position"
        cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
        col, row = int(3 * cx / scene.width), int(3 * cy / scene.height)
        assert q.answer == syn.POSITION_WORDS[3 * row + col]
    # training-only: the benchmark never asks them, and their words extend the vocabulary
    assert not set(syn.POSITION_VOCABULARY) & set(syn.VOCABULARY)
    assert all(tok in syn.VOCABULARY + syn.POSITION_VOCABULARY for q in questions for tok in syn.tokenize_text(q.question))
    assert all(it.qtype != "position" for it in syn.generate_items(5, 60))
