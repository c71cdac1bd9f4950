"""The shipped embedded model on the benchmark (generator 2.0): loads offline through from_pretrained;
on fixed items of a split no training step saw, the fine detail is hidden in the global image (fine
answers near chance) and revealed by the ground-truth crop - the property the method relies on -
and the first pass's attention (as configs/default.yaml reads it) lands on the object the question
names.

Each property here was once a strict expected failure that a shipped model went on to meet, and
now guards it: the look-alike test since the eighth session's heads, the crop test since the
eleventh session's tower, coarse questions from the global image since the thirteenth session's
decoder (at 85 % since the fourteenth session's part, which meets issue 15's 90 % held out:
docs/embedded_model.md), the object named by both its colour and shape among look-alikes since
the fifteenth session's attention read."""

import json
import os
from pathlib import Path

import pytest

from collab import stages
from collab.backends import load_backend
from collab.config import load_config
from collab.data.synthetic import generate_item, generate_items, has_lookalike, lookalike_kind
from collab.eval.runner import gt_crop_box, hit
from collab.imaging import crop_local_image, make_global_image, round_trip
from collab.training.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
FIXED_SEED = 6060  # 6060-6062: no training stream, calibration (1001) or evaluation split (4242, 7331, 2024)
N = 60


@pytest.fixture(scope="module")
def embedded():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    config = load_config(REPO / "configs" / "default.yaml")
    backend = load_backend(config.model, search_roots=[REPO])
    return config, backend


def global_features(backend, config, image):
    g, _ = make_global_image(image, backend.info.encoder_size)
    return backend.encode_images([round_trip(g, config.imaging.format, config.imaging.jpeg_quality)])[0]


def test_shipped_files_are_small_and_complete():
    model_dir = REPO / "models" / "collab-tiny-llava"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "generation_config.json",
        "training_recipe.json",
        "training_log.jsonl",
    ):
        assert (model_dir / name).exists(), name
    assert (model_dir / "model.safetensors").stat().st_size < 20 * 2**20


def test_a_recipe_file_holds_the_shipped_weights_recipe():
    """The recipe the shipped weights' training log records is a file in configs/training/, so the
    model's story (which parts, which steps) can be rerun, not only read."""
    log = REPO / "models" / "collab-tiny-llava" / "training_log.jsonl"
    logged = json.loads(log.read_text().splitlines()[0])["recipe"]
    # fields added since at their defaults; `start` (where a run began, a path) is the log's to say
    logged = Recipe.model_validate(logged).model_dump(mode="json", exclude={"start"})
    files = sorted((REPO / "configs" / "training").glob("*.yaml"))
    matches = [f.name for f in files if load_recipe(f).model_dump(mode="json", exclude={"start"}) == logged]
    assert matches, f"no file in configs/training/ is the recipe in {log}"


def test_crop_reveals_what_the_global_image_hides(embedded):
    config, backend = embedded
    size = backend.info.encoder_size
    global_right = crop_right = n = 0
    for item in generate_items(FIXED_SEED, N, kind="fine"):
        g = global_features(backend, config, item.image)
        box = gt_crop_box(item.target_box, item.width, item.height, max(size))
        local = backend.encode_images([round_trip(crop_local_image(item.image, box, size), "jpeg", 90)])[0]
        n += 1
        global_right += backend.generate([g], item.question).answer == item.answer
        crop_right += stages.refined_pass(backend, g, local, item.question).answer == item.answer
    # digits: chance is 1/10; the held-out split gives 60.6 % with the crop (docs/embedded_model.md)
    assert global_right / n <= 0.25, (global_right, n)
    assert crop_right / n >= 0.5, (crop_right, n)


def test_the_crop_is_read_as_well_as_v1_read_it(embedded):
    config, backend = embedded
    size = backend.info.encoder_size
    right = n = 0
    for item in generate_items(FIXED_SEED, N, kind="fine"):
        box = gt_crop_box(item.target_box, item.width, item.height, max(size))
        local = backend.encode_images([round_trip(crop_local_image(item.image, box, size), "jpeg", 90)])[0]
        g = global_features(backend, config, item.image)
        right += stages.refined_pass(backend, g, local, item.question).answer == item.answer
        n += 1
    assert right / n >= 0.85, (right, n)


def roi_hits(
    config, backend, n_objects: int, lookalike: bool | str, want: int = 16, seed: int = FIXED_SEED + 2
) -> tuple[int, int]:
    """RoIs on the named object, over the first `want` fine items with (or without) a look-alike, or
    with look-alikes of one kind (collab.data.synthetic.lookalike_kind: color, shape, both, none)."""
    hits = n = 0
    for i in range(400):
        item = generate_item(seed, i, kind="fine", n_objects=n_objects)
        if isinstance(lookalike, str):
            if lookalike_kind(item.objects, item.target_box) != lookalike:
                continue
        elif has_lookalike(item.objects, item.target_box) != lookalike:
            continue
        g = global_features(backend, config, item.image)
        grid = stages.attention_map(backend, g, item.question, [], config.attention)
        roi = stages.locate(grid, item.image.size, backend.info.encoder_size, config.imaging.global_mode, config.roi)
        hits += hit(roi.box, item.target_box)
        n += 1
        if n == want:
            break
    assert n == want
    return hits, n


@pytest.mark.parametrize("n_objects, at_least", [(2, 14), (4, 12)])  # chance: about 8 and 4 of 16
def test_first_pass_attention_follows_the_question(embedded, n_objects, at_least):
    """Objects that differ in colour and shape: the RoI of the question's first pass holds the one it names."""
    hits, n = roi_hits(*embedded, n_objects, lookalike=False)
    assert hits >= at_least, (hits, n)


def test_coarse_questions_are_answered_from_the_global_image(embedded):
    config, backend = embedded
    items = list(generate_items(FIXED_SEED + 1, 40, kind="coarse"))
    right = sum(
        backend.generate([global_features(backend, config, it.image)], it.question).answer == it.answer for it in items
    )
    assert right / len(items) >= 0.85, right  # v29: 37 of 40; v28: 0.75 held out


def test_first_pass_attention_follows_the_question_on_look_alike_pairs(embedded):
    """Two objects sharing a colour or a shape: asked about either, the RoI must hold that one (the
    eighth session's model, over every head: 8 of 16, chance; the shipped model's held-out
    look-alikes overall: 0.81, docs/embedded_model.md)."""
    hits, n = roi_hits(*embedded, 2, lookalike=True)
    assert hits >= 12, (hits, n)  # chance: about 8 of 16


def test_first_pass_attention_finds_the_object_that_has_both_named_attributes(embedded):
    """Four objects, one sharing the named object's colour and another its shape: only the object
    that has both is right. The colour word's head and the shape word's each look at two objects;
    reading each head's sharpest row and their geometric mean (configs/default.yaml) finds it 16 of
    16 times here, the mean over rows and heads 9 (chance: about 4)."""
    hits, n = roi_hits(*embedded, 4, lookalike="both", seed=FIXED_SEED + 3)
    assert hits >= 13, (hits, n)


def test_the_read_the_heads_tool_chooses_is_the_shipped_read(embedded):
    """`python -m collab.eval.heads` on fixed items picks, among every (layer, head) pair plain and
    relative, the heads and layer configs/default.yaml reads: the shipped read is the model's, and
    a retrained model whose looks moved would fail here until its read is chosen again."""
    from collab.eval import heads

    config, backend = embedded
    items = heads.collect(backend, config, FIXED_SEED + 1, 120, show_progress=False)
    chosen = heads.choose(items, backend.info.num_heads, config, backend.info.encoder_size, max_pairs=4, min_gain=0.05)
    shipped = {(config.attention.layer % backend.info.num_layers, h) for h in config.attention.heads}
    assert {tuple(pair) for pair in chosen["layer_heads"]} == shipped
    assert chosen["hit_rate"] >= 0.85
