"""The training script runs end to end on a toy budget and saves a model from_pretrained can load."""

import json

import numpy as np
import torch

from collab.backends import load_backend
from collab.config import ModelConfig
from collab.models.tiny import TinyLlavaSpec
from collab.training.data import BatchSpec, BatchStream, crop_box
from collab.training.train_tiny import PROMPT, REFINE_PROMPT, Recipe, ScaleCurriculum, train
from collab.data.synthetic import VOCABULARY, make_scene
from collab.models.tiny import build_tokenizer


def toy_recipe():
    spec = TinyLlavaSpec(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1)
    return Recipe(spec=spec, pretrain_steps=3, pretrain_batch=4, steps=3, batch=4, eval_every=2, eval_batches=1,
                  warmup=1, freeze_tower_steps=1, workers=0)


def test_train_saves_a_loadable_model(tmp_path):
    out = train(toy_recipe(), tmp_path / "model", tmp_path / "log.jsonl")
    backend = load_backend(ModelConfig(path=str(out), prompt_template=PROMPT, refine_template=REFINE_PROMPT, max_new_tokens=2))
    feats = backend.encode_images([make_scene(1, 0).image.resize((32, 32))])
    assert feats.shape == (1, 16, 32)
    gen = backend.generate([feats[0]], "what number is in the red circle?")
    assert len(gen.token_ids) >= 1
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == 1 for r in rows) and any("global_fine_acc" in r for r in rows)
    assert (out / "vision_tower_stage1.pt").exists() and (out / "training_recipe.json").exists()


def test_batches_have_the_answer_where_labels_say():
    tok = build_tokenizer(VOCABULARY)
    spec = BatchSpec(image_size=32, tokens_per_image=16, prompt_template=PROMPT, refine_template=REFINE_PROMPT)
    stream = BatchStream(spec, tok, batch_size=6, seed=3, curriculum=[[None, 3]], local_fraction=0.5)
    for batch, _ in zip(stream, range(4)):
        n = batch["n_images"]
        assert batch["pixel_values"].shape == (6 * n, 3, 32, 32)
        image_tokens = (batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum(1)
        assert torch.all(image_tokens == 16 * n)
        rows = torch.arange(6)
        assert torch.all(batch["input_ids"][rows, batch["answer_pos"] + 1] == tok.eos_token_id)
        answers = tok.convert_ids_to_tokens(batch["input_ids"][rows, batch["answer_pos"]].tolist())
        assert all(a in VOCABULARY for a in answers)


def test_crops_hold_their_target_and_negatives_do_not():
    scene = make_scene(7, 1, n_objects=4)
    spec = BatchSpec(image_size=96, tokens_per_image=144, prompt_template=PROMPT, refine_template=REFINE_PROMPT)
    rng = np.random.default_rng(0)
    target = scene.objects[0].box
    centre = ((target[0] + target[2]) / 2, (target[1] + target[3]) / 2)
    for _ in range(50):
        box = crop_box(rng, scene, target, spec, negative=False)
        assert box.contains_point(*centre)
        assert 96 <= box.width <= 192 + 1


def test_scale_curriculum_promotes_only_when_reading():
    c = ScaleCurriculum(start=2.5, end=4.5, promote_at=0.6, window=2)
    c.update(0.2), c.update(0.3)
    assert c.get() == 2.5
    c.update(0.9), c.update(0.8)
    assert c.get() == 3.5
    for _ in range(10):
        c.update(1.0)
    assert c.get() == 4.5


def test_warm_start_continues_from_a_saved_model(tmp_path):
    first = train(toy_recipe(), tmp_path / "a", None)
    again = train(toy_recipe(), tmp_path / "b", tmp_path / "log.jsonl", init_model=first)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("init_model" in r for r in rows) and not any(r.get("stage") == 1 for r in rows)
    assert (again / "model.safetensors").exists()


def test_patch_labels_follow_the_objects():
    """Stage-1 per-patch labels: the patch under an object's centre carries its colour and shape;
    a patch no object touches is background."""
    import numpy as np

    from collab.data.synthetic import COLORS, SHAPES, render_scene
    from collab.training.train_tiny import patch_labels

    scene = render_scene(np.random.default_rng(3), n_objects=3)
    grid = 12
    colors, shapes = patch_labels(scene, grid)
    assert len(colors) == len(shapes) == grid * grid
    width, height = scene.image.size
    covered = set()
    for obj in scene.objects:
        cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
        p = int(cy / height * grid) * grid + int(cx / width * grid)
        assert (colors[p], shapes[p]) == (list(COLORS).index(obj.color), SHAPES.index(obj.shape))
        x0, x1 = int(obj.box[0] / width * grid), int((obj.box[2] - 1) / width * grid)
        y0, y1 = int(obj.box[1] / height * grid), int((obj.box[3] - 1) / height * grid)
        covered |= {y * grid + x for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)}
    background = [p for p in range(grid * grid) if p not in covered]
    assert background and all(colors[p] == len(COLORS) and shapes[p] == len(SHAPES) for p in background)


def test_small_scenes_only_in_global_examples_and_only_when_asked(monkeypatch):
    """Scale augmentation: small originals (<= 3 objects, side in range), for global-only examples
    and only when the fraction is set."""
    import collab.training.data as data

    tok = build_tokenizer(VOCABULARY)
    base = BatchSpec(image_size=32, tokens_per_image=16, prompt_template=PROMPT, refine_template=REFINE_PROMPT)
    for i in range(30):
        scene = data.small_scene(np.random.default_rng(i), 5, (208, 256))
        assert 208 <= scene.width == scene.height <= 256 and 1 <= len(scene.objects) <= 3
    calls = []
    original = data.small_scene
    monkeypatch.setattr(data, "small_scene", lambda *a, **k: calls.append(1) or original(*a, **k))
    data.make_example(np.random.default_rng(5), base, 4, "global", tok)  # default fraction 0
    assert calls == []
    always = BatchSpec(**{**base.__dict__, "small_scene_fraction": 1.0})
    data.make_example(np.random.default_rng(1), always, 5, "local", tok)  # crops need the benchmark's geometry
    assert calls == []
    ex = data.make_example(np.random.default_rng(1), always, 5, "global", tok)
    assert calls == [1] and len(ex["images"]) == 1


def test_globals_only_tower_phase_and_a_new_tower_under_a_saved_decoder(tmp_path):
    """--tower-global-fraction 1.0 trains on per-patch labels alone (finite losses, per-attribute
    accuracies logged); --init-model with --init-tower swaps the tower in and freezes it first."""
    import dataclasses

    import torch as _torch

    recipe = dataclasses.replace(toy_recipe(), tower_global_fraction=1.0)
    tower_dir = train(recipe, tmp_path / "tower", tmp_path / "tower.jsonl", pretrain_only=True)
    rows = [json.loads(line) for line in (tmp_path / "tower.jsonl").read_text().splitlines()]
    stage1 = [r for r in rows if r.get("stage") == 1]
    assert stage1 and all(np.isfinite(r["loss"]) and 0 <= r["object_patch_shape_acc"] <= 1 for r in stage1)
    assert all(np.isnan(r["crop_digit_acc"]) for r in stage1)  # no crops in these batches
    tower = _torch.load(tower_dir / "vision_tower_stage1.pt", weights_only=True)

    base = train(toy_recipe(), tmp_path / "base", None)
    swapped = train(dataclasses.replace(toy_recipe(), steps=1, freeze_tower_steps=5), tmp_path / "swapped",
                    tmp_path / "swap.jsonl", init_tower=tower_dir / "vision_tower_stage1.pt", init_model=base)
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(swapped).model.vision_tower.state_dict()
    for name, value in tower.items():  # frozen for the only step: exactly the tower that was put in
        assert _torch.equal(saved[name], value), name


def test_training_cli_refuses_bad_sizes_and_fractions(capsys):
    import pytest

    from collab.training.train_tiny import main

    for args, message in ((["--image-size", "100"], "multiple of the patch size"),
                          (["--patch-position-weight", "-1"], "--patch-position-weight must be >= 0"),
                          (["--patch-position-weight", "1", "--init-model", "m"], "is a stage-1 loss"),
                          (["--tower-global-fraction", "1.5"], "--tower-global-fraction must be in [0, 1]"),
                          (["--small-scene-fraction", "-0.1"], "--small-scene-fraction must be in [0, 1]")):
        with pytest.raises(SystemExit):
            main(["--out", "/nonexistent/never-written", *args])
        assert message in capsys.readouterr().err


def test_cosine_schedule_is_the_step_lambda_without_a_budget_and_stops_on_time_with_one(monkeypatch):
    """Without a budget: exactly LambdaLR's warm-up + cosine on steps (the CPU recipe). With a
    wall-clock budget: progress follows elapsed time and `finished` turns true when it is spent."""
    import math

    import collab.training.train_tiny as tt

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    reference = opt()
    lam = torch.optim.lr_scheduler.LambdaLR(reference, lambda s: (s + 1) / 3 if s < 3 else
                                            0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (s - 3) / 7))))
    ours = opt()
    sched = tt.CosineSchedule(ours, warmup=3, total=10)
    for step in range(12):
        sched.set(step)
        assert math.isclose(ours.param_groups[0]["lr"], reference.param_groups[0]["lr"], rel_tol=1e-12), step
        assert sched.finished(step) == (step >= 10)
        reference.step()  # (no gradients: a no-op, but the order LambdaLR expects)
        lam.step()

    now = [100.0]
    monkeypatch.setattr(tt.time, "monotonic", lambda: now[0])
    timed = tt.CosineSchedule(opt(), warmup=0, total=1_000_000, budget_s=60)
    assert not timed.finished(5) and math.isclose(timed.factor(5), 1.0, abs_tol=1e-6)
    now[0] = 130.0  # half the budget: half-way down the cosine, whatever the step count says
    assert math.isclose(timed.factor(5), 0.1 + 0.45, rel_tol=1e-9)
    now[0] = 160.0
    assert timed.finished(5) and math.isclose(timed.factor(5), 0.1)
    import pytest

    with pytest.raises(ValueError, match="budget_s"):
        tt.CosineSchedule(opt(), 1, 10, budget_s=0)


def test_streams_are_the_same_for_any_number_of_workers():
    """Worker k renders batches k, k+n, ...; the DataLoader returns them in order, so the batch
    sequence does not depend on --workers (stage 1 here with a curriculum that does not move: a live
    one is read when a batch is rendered, so there the timing matters too)."""
    from collab.training.train_tiny import ScaleCurriculum, TowerStream, _loader

    tok = build_tokenizer(VOCABULARY)
    spec = BatchSpec(image_size=32, tokens_per_image=16, prompt_template=PROMPT, refine_template=REFINE_PROMPT)
    cpu = torch.device("cpu")

    def first(stream, workers, key, n=5):
        return [b[key] for b, _ in zip(_loader(stream, workers, cpu), range(n))]

    stage2 = [first(BatchStream(spec, tok, 4, 3, [[None, 3]], 0.5, scene_reuse=2), w, "pixel_values") for w in (0, 2)]
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(*stage2))
    stage1 = [first(TowerStream(spec, 4, 3, ScaleCurriculum(), 0.5, scene_reuse=2), w, "crop_labels") for w in (0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(*stage1))
    assert len({tuple(map(tuple, b.tolist())) for b in stage1[0]}) > 1  # not one batch repeated


def test_scene_reuse_asks_different_questions_of_one_scene():
    """Stage 2 with scene_reuse=3: examples come in groups sharing one global image, with distinct
    questions while the scene has them; stage 1 crops of one scene take different objects."""
    from collab.training.train_tiny import tower_batch

    tok = build_tokenizer(VOCABULARY)
    spec = BatchSpec(image_size=32, tokens_per_image=16, prompt_template=PROMPT, refine_template=REFINE_PROMPT)
    stream = BatchStream(spec, tok, 6, 11, [[None, 5]], local_fraction=0.0, scene_reuse=3)
    for step in range(4):
        batch = stream.batch(step)
        pixels = batch["pixel_values"]
        for group in (range(0, 3), range(3, 6)):
            first = group[0]
            assert all(torch.equal(pixels[i], pixels[first]) for i in group)
            questions = {tuple(batch["input_ids"][i].tolist()) for i in group}
            assert len(questions) == 3
        assert not torch.equal(pixels[0], pixels[3])
    import collab.training.train_tiny as tt

    scenes = []
    render = tt.render_scene

    def recording(*args, **kwargs):
        scenes.append(render(*args, **kwargs))
        return scenes[-1]

    tt.render_scene = recording
    try:
        crops = tower_batch(np.random.default_rng(0), spec, 12, 6.0, global_fraction=0.0, scene_reuse=4)
    finally:
        tt.render_scene = render
    assert len(scenes) == 3
    labels = [tuple(x) for x in crops["crop_labels"].tolist()]
    for scene, group in zip(scenes, (labels[:4], labels[4:8], labels[8:])):
        # (digit, colour, shape): every object of the scene before any repeats
        assert len({(c, s) for _, c, s in group}) == min(4, len(scene.objects))
        assert {(c, s) for _, c, s in group} <= {(tt.COLOR_NAMES.index(o.color), tt.SHAPES.index(o.shape)) for o in scene.objects}


def test_budgeted_bf16_run_stops_on_time_and_logs_it(tmp_path):
    """A wall-clock budget ends each stage early; the model is still saved and the log says how
    many steps ran (autocast bf16 on CPU exercises the GPU recipe's code path)."""
    import dataclasses

    recipe = dataclasses.replace(toy_recipe(), pretrain_steps=10_000, steps=10_000, pretrain_budget_s=3.0, budget_s=3.0,
                                 amp_dtype="bfloat16", scene_reuse=2, eval_every=10_000)
    out = train(recipe, tmp_path / "m", tmp_path / "log.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    done = {r["stage_done"]: r["steps"] for r in rows if "stage_done" in r}
    assert 0 < done[1] < 10_000 and 0 < done[2] < 10_000
    final = [r for r in rows if r.get("stage") == 2][-1]
    assert final["step"] == done[2] - 1 and np.isfinite(final["loss_ema"])  # evaluated where the budget stopped it
    assert json.loads((out / "training_recipe.json").read_text())["saved_at_step"] == done[2]


def test_training_cli_refuses_bad_throughput_options(capsys):
    import pytest

    from collab.training.train_tiny import main

    cases = [(["--scene-reuse", "0"], "--scene-reuse must be >= 1"), (["--budget-s", "0"], "--budget-s must be > 0"),
             (["--pretrain-budget-s", "-5"], "--pretrain-budget-s must be > 0")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "torch sees no CUDA device"))
    for args, message in cases:
        with pytest.raises(SystemExit):
            main(["--out", "/nonexistent/never-written", *args])
        assert message in capsys.readouterr().err


def test_default_stream_is_the_one_example_per_scene_stream():
    """scene_reuse=1 (the CPU recipe) draws exactly what the stream drew before reuse existed: per
    batch, a kind, then for each example a scene size and make_example (same random stream)."""
    from collab.training.data import collate, make_example

    tok = build_tokenizer(VOCABULARY)
    spec = BatchSpec(image_size=32, tokens_per_image=16, prompt_template=PROMPT, refine_template=REFINE_PROMPT,
                     small_scene_fraction=0.3)
    stream = BatchStream(spec, tok, 5, 9, [[2, 1], [None, 5]], 0.5)
    for step in range(5):
        rng = np.random.default_rng([9, step])
        kind = "local" if rng.random() < 0.5 else "global"
        top = stream.max_objects(step)
        examples = [make_example(rng, spec, int(rng.integers(1, top + 1)), kind, tok) for _ in range(5)]
        expected = collate(examples, spec, tok.pad_token_id, tok.eos_token_id)
        got = stream.batch(step)
        for key in ("input_ids", "pixel_values", "answer_pos", "fine", "negative"):
            assert torch.equal(got[key], expected[key]), (step, key)


def test_position_questions_only_in_global_examples_and_only_when_asked():
    from collab.data.synthetic import POSITION_VOCABULARY, POSITION_WORDS
    from collab.training.data import make_example

    tok = build_tokenizer(VOCABULARY + POSITION_VOCABULARY)
    plain = build_tokenizer(VOCABULARY)
    assert all(tok.convert_tokens_to_ids(w) == plain.convert_tokens_to_ids(w) for w in VOCABULARY)  # ids kept
    base = BatchSpec(image_size=32, tokens_per_image=16, prompt_template=PROMPT, refine_template=REFINE_PROMPT)
    always = BatchSpec(**{**base.__dict__, "position_fraction": 1.0})
    where = tok.convert_tokens_to_ids("where")
    for i in range(20):
        assert make_example(np.random.default_rng(i), base, 4, "global", tok)["qtype"] != "position"
        assert make_example(np.random.default_rng(i), always, 4, "local", tok)["qtype"] != "position"
        ex = make_example(np.random.default_rng(i), always, 4, "global", tok)
        assert ex["qtype"] == "position" and where in ex["ids"]
        assert tok.convert_ids_to_tokens(ex["answer"]) in POSITION_WORDS


def test_warm_start_with_position_questions_grows_the_vocabulary(tmp_path):
    """A saved model without the position words gets new rows for them; every old row is kept."""
    import dataclasses

    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from collab.data.synthetic import POSITION_VOCABULARY
    from collab.training.train_tiny import grow_vocabulary

    first = train(toy_recipe(), tmp_path / "a", None)
    model = LlavaForConditionalGeneration.from_pretrained(first)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    grow_vocabulary(model, len(old_in) + 3)
    assert torch.equal(model.get_input_embeddings().weight[: len(old_in)], old_in)
    assert torch.equal(model.get_output_embeddings().weight[: len(old_out)], old_out)
    assert model.get_output_embeddings().weight.shape[0] == len(old_in) + 3
    import pytest

    with pytest.raises(ValueError, match="only"):
        grow_vocabulary(model, 5)

    recipe = dataclasses.replace(toy_recipe(), position_fraction=0.5)
    again = train(recipe, tmp_path / "b", tmp_path / "log.jsonl", init_model=first)
    from collab.models.tiny import build_tokenizer as build

    (tmp_path / "odd").mkdir()
    build(["zebra"] + VOCABULARY).save_pretrained(tmp_path / "odd")  # same words, other ids
    model.save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="would change id"):
        train(recipe, tmp_path / "c", None, init_model=tmp_path / "odd")
    tok = AutoTokenizer.from_pretrained(again)
    assert len(tok) == len(old_in) + len(POSITION_VOCABULARY)
    grown = LlavaForConditionalGeneration.from_pretrained(again)
    assert grown.get_input_embeddings().weight.shape[0] == len(tok)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any(0.0 <= r.get("global_position_acc", -1) <= 1.0 for r in rows)


def test_patch_position_loss_teaches_the_tower_where_its_tokens_are(tmp_path):
    """Stage 1 with patch_position_weight: each global token's row and column become readable
    from its features (logged accuracy rises far above the 1/16 of a toy 4 x 4 grid); without it
    nothing about positions is logged."""
    import dataclasses

    recipe = dataclasses.replace(toy_recipe(), pretrain_steps=60, tower_global_fraction=1.0, patch_position_weight=1.0,
                                 pretrain_lr=3e-3, warmup=1)
    train(recipe, tmp_path / "pos", tmp_path / "pos.jsonl", pretrain_only=True)
    rows = [json.loads(line) for line in (tmp_path / "pos.jsonl").read_text().splitlines()]
    stage1 = [r for r in rows if r.get("stage") == 1]
    assert stage1[0]["patch_position_acc"] < 0.3 and stage1[-1]["patch_position_acc"] > 0.5, stage1
    assert all(np.isfinite(r["position_loss"]) for r in stage1)
    train(dataclasses.replace(recipe, pretrain_steps=2, patch_position_weight=0.0), tmp_path / "plain",
          tmp_path / "plain.jsonl", pretrain_only=True)
    plain = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert not any("patch_position_acc" in r for r in plain)


def test_init_tower_takes_a_checkpoint_or_a_saved_models_tower(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from collab.training.train_tiny import tower_state

    model_dir = train(toy_recipe(), tmp_path / "m", None)
    from_dir = tower_state(model_dir)
    saved = LlavaForConditionalGeneration.from_pretrained(model_dir).model.vision_tower.state_dict()
    assert from_dir.keys() == saved.keys() and all(torch.equal(from_dir[k], saved[k]) for k in saved)
    stage1 = tower_state(model_dir / "vision_tower_stage1.pt")
    assert stage1.keys() == saved.keys()
    assert any(not torch.equal(stage1[k], saved[k]) for k in saved)  # stage 2 trained the tower further
