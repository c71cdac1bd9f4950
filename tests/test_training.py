"""The training package: recipe files, both stages on a toy budget, streams, schedule, checkpoints."""

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from collab.backends import load_backend
from collab.config import ConfigError, ModelConfig
from collab.data.synthetic import COLORS, SHAPES, VOCABULARY, make_scene, render_scene
from collab.models.tiny import build_tokenizer
from collab.paths import REPO_ROOT
from collab.training.data import BatchSpec, BatchStream, collate, crop_box, make_example
from collab.training.loop import CosineSchedule, lookahead, make_loader
from collab.training.recipe import PROMPT, REFINE_PROMPT, Recipe, load_recipe
from collab.training.tower import ScaleCurriculum, TowerStream, patch_labels, tower_batch
from collab.training.train import TOWER_CHECKPOINT, WEIGHT_LIBRARIES, tower_state, train

TOY = {
    "model": {
        "image_size": 32,
        "patch_size": 8,
        "vision_hidden": 32,
        "vision_layers": 1,
        "vision_heads": 2,
        "text_hidden": 32,
        "text_layers": 2,
        "text_heads": 4,
        "text_kv_heads": 2,
        "text_intermediate": 64,
        "max_positions": 160,
    },
    "tower": {"steps": 3, "batch": 4},
    "vlm": {"steps": 3, "batch": 4, "warmup": 1},
    "monitor": {"every": 2, "batches": 1, "attention_items": 3, "maps": 1},
    "runtime": {"workers": 0},
}


def toy_recipe(**sections) -> Recipe:
    raw = json.loads(json.dumps(TOY))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Recipe.model_validate(raw)


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def toy_spec(**kw):
    return BatchSpec(image_size=32, tokens_per_image=16, prompt_template=PROMPT, refine_template=REFINE_PROMPT, **kw)


def test_train_saves_a_loadable_model_and_monitors_localisation(tmp_path):
    out = train(toy_recipe(), tmp_path / "model", tmp_path / "log.jsonl")
    backend = load_backend(
        ModelConfig(path=str(out), prompt_template=PROMPT, refine_template=REFINE_PROMPT, max_new_tokens=2)
    )
    feats = backend.encode_images([make_scene(1, 0).image.resize((32, 32))])
    assert feats.shape == (1, 16, 32)
    assert len(backend.generate([feats[0]], "what number is in the red circle?").token_ids) >= 1
    rows = rows_of(tmp_path / "log.jsonl")
    assert rows[0]["software"]["torch"] == torch.__version__  # what decides the weights besides the recipe
    assert set(WEIGHT_LIBRARIES) <= set(rows[0]["software"])
    assert any(r.get("stage") == 1 for r in rows)
    evals = [r for r in rows if r.get("stage") == 2]
    assert [r["step"] for r in evals] == [2, 3]  # after 2 steps, then where the stage ended
    for key in ("global_fine_acc", "local_fine_gap", "L0_plain_hit", "L1_rel_hit", "L1_rel_some", "L0_rel_hit2"):
        assert 0.0 <= evals[-1][key] <= 1.0 or key.endswith("gap"), key
    assert (out / TOWER_CHECKPOINT).exists() and (out / "monitor" / "maps_000003.png").exists()
    saved = json.loads((out / "training_recipe.json").read_text())
    assert saved["saved_at_step"] == 3 and saved["model"]["text_layers"] == 2


def test_the_shipped_recipe_files_load_and_the_cpu_one_trains_two_steps(tmp_path):
    """The v2 recipe file, run end to end for 2 steps a stage from the CLI; its GPU variant differs only
    in where and how fast (base: embedded.yaml)."""
    cpu = load_recipe(REPO_ROOT / "configs/training/embedded.yaml")
    gpu = load_recipe(REPO_ROOT / "configs/training/embedded_gpu.yaml")
    assert cpu.model == gpu.model and cpu.vlm.legible_fraction == gpu.vlm.legible_fraction
    assert cpu.vlm.curriculum == gpu.vlm.curriculum and cpu.tower.object_weight == gpu.tower.object_weight
    assert cpu.runtime.device == "cpu" and gpu.runtime.device == "cuda"
    cpu_parts, gpu_parts = cpu.parts(), gpu.parts()
    assert len(cpu_parts) == len(gpu_parts) >= 2  # the shipped model came in parts
    for (c, c_tower), (g, g_tower) in zip(cpu_parts, gpu_parts):
        assert c_tower == g_tower and c.tower.lr == g.tower.lr and c.tower.dense_weight == g.tower.dense_weight
        assert c.seed == g.seed and c.vlm.curriculum == g.vlm.curriculum
        assert c.vlm.caption_fraction == g.vlm.caption_fraction and c.vlm.fine_fraction == g.vlm.fine_fraction
        assert c.vlm.local_fraction == g.vlm.local_fraction and c.tower.legible_fraction == g.tower.legible_fraction
        assert c.vlm.caption_shape_first == g.vlm.caption_shape_first
    sets = [
        "tower.steps=2",
        "tower.batch=4",
        f"vlm.steps={min(cpu.vlm.steps, 2)}",  # 0 stays 0: the first part may train the tower only
        "vlm.batch=4",
        "monitor.batches=1",
        "monitor.attention_items=2",
        "runtime.workers=0",
        # each continuation writes its own steps (the recipe is in steps): 2 for each, the rest as written
        "continuations=" + json.dumps([two_steps(c) for c in cpu.continuations]),
    ]
    cmd = [
        sys.executable,
        "-m",
        "collab.training",
        "--recipe",
        str(REPO_ROOT / "configs/training/embedded.yaml"),
        "--out",
        str(tmp_path / "m"),
    ] + [x for s in sets for x in ("--set", s)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = rows_of(tmp_path / "m" / "training_log.jsonl")
    done_rows = [(r["stage_done"], r["steps"]) for r in rows if "stage_done" in r]
    expected = [
        stage
        for part, tower in cpu_parts
        for stage in ([(1, 2)] if tower else []) + ([(2, 2)] if part.vlm.steps else [])
    ]
    assert done_rows == expected and (1, 2) in done_rows[1:]  # every part, one command; a later one trains the tower
    assert done_rows[-1] == (2, 2)  # the recipe ends in stage 2
    last_part = ["--from-part", str(len(cpu_parts) - 1), "--init-model", str(tmp_path / "m")]
    resumed = subprocess.run(
        cmd + last_part + ["--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = rows_of(tmp_path / "r" / "training_log.jsonl")
    last = cpu_parts[-1]
    assert [(r["stage_done"], r.get("part")) for r in rows if "stage_done" in r] == (
        [(1, len(cpu_parts) - 1)] if last.tower else []
    ) + [(2, len(cpu_parts) - 1)]  # only the last part, from the model given


def two_steps(continuation: dict) -> dict:
    """A continuation cut to 2 steps a stage; a part that trains the tower only (no `vlm`) stays so."""
    short = {**continuation}
    if "vlm" in continuation:
        short["vlm"] = {**continuation["vlm"], "steps": 2}
    if "tower" in continuation:
        short["tower"] = {**continuation["tower"], "steps": 2, "batch": 4}
    return short


def test_recipe_errors_name_the_field_and_the_cli_exits_2(tmp_path, capsys):
    from collab.training.__main__ import main

    with pytest.raises(ConfigError, match="vlm.local_fraction"):
        load_recipe(None, {"vlm": {"local_fraction": 1.5}})
    with pytest.raises(ConfigError, match="image_size must be a multiple"):
        load_recipe(None, {"model": {"image_size": 100}})
    for bad in ([[10, 2], [5, 3], [None, 5]], [[10, 2], [None, 6]], [[10, 2], [20, 5]]):
        with pytest.raises(ConfigError, match="curriculum"):
            load_recipe(None, {"vlm": {"curriculum": bad}})
    (tmp_path / "a.yaml").write_text("base: b.yaml\nvlm: {batch: 8}\n")
    (tmp_path / "b.yaml").write_text("vlm: {batch: 4, lr: 0.002}\n")
    merged = load_recipe(tmp_path / "a.yaml")
    assert (merged.vlm.batch, merged.vlm.lr) == (8, 0.002)  # the variant's keys over its base's
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="tower.stepz"):
        load_recipe(None, {"tower": {"stepz": 1}})
    for args, message in (
        (["--set", "vlm.batch=1"], "vlm.batch"),
        (["--stages", "vlm"], "needs --init-tower"),
        (["--init-model", str(tmp_path / "absent")], "--init-model: "),
        (["--set", f"start.tower={tmp_path / 'absent'}", "--set", "start.part=1"], "start.tower: "),
        (["--stages", "decoder"], "--stages must be"),
        (["--set", "nokey"], "KEY=VALUE"),
        (["--recipe", str(tmp_path / "missing.yaml")], "not found"),
    ):
        assert main(["--out", str(tmp_path / "never"), *args]) == 2
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path / "never"), "--set", "runtime.device=cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_vlm_stage_from_a_saved_tower_keeps_it_frozen(tmp_path):
    first = train(toy_recipe(), tmp_path / "a", None, stages=("tower",))
    tower = torch.load(first / TOWER_CHECKPOINT, weights_only=True)
    second = train(
        toy_recipe(), tmp_path / "b", tmp_path / "log.jsonl", stages=("vlm",), init_tower=first / TOWER_CHECKPOINT
    )
    assert not any(r.get("stage") == 1 for r in rows_of(tmp_path / "log.jsonl"))
    saved = tower_state(second)
    assert saved.keys() == tower.keys() and all(torch.equal(saved[k], tower[k]) for k in tower)
    assert tower_state(first).keys() == tower.keys()  # a saved model directory also provides a tower
    tuned = train(
        toy_recipe(vlm={"tower_lr_scale": 1.0, "lr": 0.05}),
        tmp_path / "c",
        None,
        stages=("vlm",),
        init_tower=first / TOWER_CHECKPOINT,
    )
    assert any(not torch.equal(tower_state(tuned)[k], tower[k]) for k in tower)
    held = train(
        toy_recipe(vlm={"tower_lr_scale": 1.0, "lr": 0.05, "freeze_tower_steps": 3}),
        tmp_path / "e",
        None,
        stages=("vlm",),
        init_tower=first / TOWER_CHECKPOINT,
    )
    assert all(torch.equal(tower_state(held)[k], tower[k]) for k in tower)  # frozen for all 3 steps
    with pytest.raises(ValueError, match="init_tower"):
        train(toy_recipe(), tmp_path / "d", None, stages=("vlm",))


def test_warm_start_continues_stage_2_from_a_saved_model(tmp_path):
    from transformers import LlavaForConditionalGeneration

    first = train(toy_recipe(), tmp_path / "a", None)
    again = train(
        toy_recipe(vlm={"steps": 0}), tmp_path / "b", tmp_path / "log.jsonl", stages=("vlm",), init_model=first
    )
    a = LlavaForConditionalGeneration.from_pretrained(first).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # zero steps: exactly the saved weights
    assert any("init_model" in r for r in rows_of(tmp_path / "log.jsonl"))
    with pytest.raises(ValueError, match="sizes differ"):
        train(toy_recipe(model={"text_hidden": 64}), tmp_path / "c", None, stages=("vlm",), init_model=first)


def test_batches_have_the_answer_where_labels_say():
    tok = build_tokenizer(VOCABULARY)
    stream = BatchStream(toy_spec(), tok, batch_size=6, seed=3, curriculum=[[None, 3]], local_fraction=0.5)
    for batch, _ in zip(stream, range(4)):
        n = batch["n_images"]
        assert batch["pixel_values"].shape == (6 * n, 3, 32, 32)
        assert torch.all((batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum(1) == 16 * n)
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
        assert box.contains_point(*centre) and 96 <= box.width <= 192 + 1
        neg = crop_box(rng, scene, target, spec, negative=True)
        others = [o.box for o in scene.objects[1:]]
        assert any(neg.contains_point((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in others)


def test_legible_scenes_only_in_global_examples_and_only_when_asked(monkeypatch):
    import collab.training.data as data

    tok = build_tokenizer(VOCABULARY)
    seen = []
    original = data.render_scene
    monkeypatch.setattr(data, "render_scene", lambda *a, **k: seen.append(k.get("legible_glyphs")) or original(*a, **k))
    for i in range(10):
        make_example(np.random.default_rng(i), toy_spec(), 3, "global", tok)
        make_example(np.random.default_rng(i), toy_spec(legible_fraction=1.0), 3, "local", tok)
    assert not any(seen)
    fine = [
        make_example(
            np.random.default_rng(i), toy_spec(legible_fraction=1.0, legible_fine_fraction=1.0), 3, "global", tok
        )
        for i in range(10)
    ]
    assert all(seen[-10:]) and all(ex["kind"] == "fine" for ex in fine)


def test_streams_draw_two_or_more_objects_past_the_first_curriculum_step():
    import collab.training.data as data

    tok = build_tokenizer(VOCABULARY)
    stream = BatchStream(toy_spec(), tok, 8, 1, [[2, 2], [None, 5]], 0.0)
    counts = {}
    for step in range(6):
        batch_counts = []
        original = data.draw_scene
        data.draw_scene = lambda rng, spec, n, kind: batch_counts.append(n) or original(rng, spec, n, kind)
        try:
            stream.batch(step)
        finally:
            data.draw_scene = original
        counts[step] = batch_counts
    assert all(1 <= n <= 2 for s in (0, 1) for n in counts[s]) and any(n == 1 for s in (0, 1) for n in counts[s])
    assert all(2 <= n <= 5 for s in range(2, 6) for n in counts[s])


def test_global_only_batches_can_be_crowded_while_crop_batches_follow_the_curriculum():
    import collab.training.data as data

    tok = build_tokenizer(VOCABULARY)
    stream = BatchStream(toy_spec(), tok, 6, 1, [[None, 3]], 0.5, global_objects=(6, 8))
    seen = {"global": [], "local": []}
    original = data.draw_scene
    data.draw_scene = lambda rng, spec, n, kind: seen[kind].append(n) or original(rng, spec, n, kind)
    try:
        for step in range(8):
            stream.batch(step)
    finally:
        data.draw_scene = original
    assert seen["global"] and seen["local"]
    assert all(6 <= n <= 8 for n in seen["global"]) and all(2 <= n <= 3 for n in seen["local"])
    with pytest.raises(ConfigError, match="global_objects"):
        load_recipe(None, {"vlm": {"global_objects": [3, 9]}})


def test_scale_curriculum_promotes_only_when_reading():
    c = ScaleCurriculum(start=2.5, end=4.5, promote_at=0.6, window=2)
    c.update(0.2), c.update(0.3)
    assert c.value == 2.5
    c.update(0.9), c.update(0.8)
    assert c.value == 3.5
    for _ in range(10):
        c.update(1.0)
    assert c.value == 4.5


@pytest.mark.parametrize("workers", [0, 1])
def test_stage1_batches_do_not_depend_on_timing(workers):
    """The crop scale a batch is drawn at is the one published lag steps earlier, so a slow trainer
    (workers far ahead) and a fast one get the same batches: the scale of batch k is the start
    value for k < lag, then start + (k - lag + 1) when every step promotes."""
    cpu = torch.device("cpu")
    lag = lookahead(workers) + 1
    steps = 8

    def scales(pause_s):
        c = ScaleCurriculum(start=2.0, end=20.0, promote_at=0.0, window=1, steps=steps, lag=lag)
        seen = []
        for step, b in zip(range(steps), make_loader(TowerStream(toy_spec(), 2, 5, c, 0.0), workers, cpu)):
            seen.append(b["max_scale"])
            time.sleep(pause_s)  # a slow step: the workers render ahead meanwhile
            c.update(1.0)
            c.publish(step)
        c.close()
        return seen

    expected = [2.0 + max(0, k - lag + 1) for k in range(steps)]
    assert scales(0.0) == scales(0.05) == expected


def test_patch_labels_follow_the_objects():
    """Stage-1 per-patch labels: the patch under an object's centre carries its colour and shape;
    a patch no object touches is background."""
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


def test_cosine_schedule_follows_steps_or_a_time_budget(monkeypatch):
    import collab.training.loop as loop

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)

    reference = opt()
    lam = torch.optim.lr_scheduler.LambdaLR(
        reference, lambda s: (s + 1) / 3 if s < 3 else 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (s - 3) / 7)))
    )
    ours = opt()
    sched = CosineSchedule(ours, warmup=3, total=10)
    for step in range(12):
        sched.set(step)
        assert math.isclose(ours.param_groups[0]["lr"], reference.param_groups[0]["lr"], rel_tol=1e-12), step
        assert sched.finished(step) == (step >= 10)
        reference.step()
        lam.step()
    now = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    timed = CosineSchedule(opt(), warmup=0, total=1_000_000, budget_s=60)
    assert not timed.finished(5) and math.isclose(timed.factor(5), 1.0, abs_tol=1e-6)
    now[0] = 130.0  # half the budget: half-way down the cosine, whatever the step count says
    assert math.isclose(timed.factor(5), 0.1 + 0.45, rel_tol=1e-9)
    now[0] = 160.0
    assert timed.finished(5) and math.isclose(timed.factor(5), 0.1)
    with pytest.raises(ValueError, match="budget_s"):
        CosineSchedule(opt(), 1, 10, budget_s=0)


def test_streams_are_the_same_for_any_number_of_workers():
    """Worker k renders batches k, k+n, ...; the DataLoader returns them in order, so the batch
    sequence does not depend on runtime.workers (stage 1 with a curriculum that does not move)."""
    tok = build_tokenizer(VOCABULARY)
    cpu = torch.device("cpu")

    def first(stream, workers, key, n=5):
        return [b[key] for b, _ in zip(make_loader(stream, workers, cpu), range(n))]

    stage2 = [
        first(BatchStream(toy_spec(), tok, 4, 3, [[None, 3]], 0.5, scene_reuse=2), w, "pixel_values") for w in (0, 2)
    ]
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(*stage2))
    stage1 = [
        first(TowerStream(toy_spec(), 4, 3, ScaleCurriculum(4.0, 4.0), 0.5, scene_reuse=2), w, "crop_labels")
        for w in (0, 2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*stage1))
    assert len({tuple(map(tuple, b.tolist())) for b in stage1[0]}) > 1  # not one batch repeated


def test_scene_reuse_asks_different_questions_of_one_scene(monkeypatch):
    """Stage 2 with scene_reuse=3: groups of examples share one global image with distinct questions;
    stage 1 crops of one scene take different objects."""
    import collab.training.tower as tower

    tok = build_tokenizer(VOCABULARY)
    stream = BatchStream(toy_spec(), tok, 6, 11, [[None, 5]], local_fraction=0.0, scene_reuse=3)
    for step in range(4):
        batch = stream.batch(step)
        pixels = batch["pixel_values"]
        for group in (range(0, 3), range(3, 6)):
            assert all(torch.equal(pixels[i], pixels[group[0]]) for i in group)
            assert len({tuple(batch["input_ids"][i].tolist()) for i in group}) == 3
        assert not torch.equal(pixels[0], pixels[3])
    scenes = []
    render = tower.render_scene
    monkeypatch.setattr(tower, "render_scene", lambda *a, **k: scenes.append(render(*a, **k)) or scenes[-1])
    crops = tower_batch(np.random.default_rng(0), toy_spec(), 12, 6.0, global_fraction=0.0, scene_reuse=4)
    assert len(scenes) == 3
    labels = [tuple(x) for x in crops["crop_labels"].tolist()]
    for scene, group in zip(scenes, (labels[:4], labels[4:8], labels[8:])):
        assert len({(c, s) for _, c, s in group}) == min(4, len(scene.objects))
        assert {(c, s) for _, c, s in group} <= {
            (tower.COLOR_NAMES.index(o.color), SHAPES.index(o.shape)) for o in scene.objects
        }


def test_budgeted_bf16_run_stops_on_time_and_logs_it(tmp_path):
    """A wall-clock budget ends each stage early; the model is still saved and the log says how
    many steps ran (autocast bf16 on CPU exercises the GPU recipe's code path)."""
    recipe = toy_recipe(
        tower={"steps": 10_000, "budget_s": 3.0},
        vlm={"steps": 10_000, "budget_s": 3.0},
        runtime={"amp_dtype": "bfloat16", "scene_reuse": 2, "workers": 0},
        monitor={"every": 10_000},
    )
    out = train(recipe, tmp_path / "m", tmp_path / "log.jsonl")
    rows = rows_of(tmp_path / "log.jsonl")
    done = {r["stage_done"]: r["steps"] for r in rows if "stage_done" in r}
    assert 0 < done[1] < 10_000 and 0 < done[2] < 10_000
    final = [r for r in rows if r.get("stage") == 2][-1]
    assert final["step"] == done[2] and np.isfinite(final["loss_ema"])  # evaluated where the budget stopped it
    assert json.loads((out / "training_recipe.json").read_text())["saved_at_step"] == done[2]


def test_collate_labels_answer_and_eos_only():
    tok = build_tokenizer(VOCABULARY)
    examples = [make_example(np.random.default_rng(i), toy_spec(), 3, "global", tok) for i in range(3)]
    batch = collate(examples, toy_spec(), tok.pad_token_id, tok.eos_token_id)
    for i, ex in enumerate(examples):
        n = len(ex["ids"])
        assert batch["answer_pos"][i] == n and batch["input_ids"][i, n] == ex["answer"]
        assert batch["attention_mask"][i].sum() == n + 2


def test_object_cells_are_the_probes_object_tokens():
    """Stage 1's pooled-object loss reads the same tokens as collab.eval.probe: cells whose centres lie
    in the box (the centre cell for a box smaller than a cell)."""
    from collab.eval.probe import object_token_indices
    from collab.geometry import CanvasGeometry
    from collab.training.tower import object_cells

    scene = render_scene(np.random.default_rng(8), n_objects=4)
    geometry = CanvasGeometry.create(scene.image.size, (96, 96), "resize")
    for box in [o.box for o in scene.objects] + [[200, 200, 203, 203]]:
        mask = object_cells(box, scene.width, scene.height, 12)
        assert sorted(np.flatnonzero(mask).tolist()) == sorted(object_token_indices(box, geometry, (12, 12), 0))
    batch = tower_batch(np.random.default_rng(1), toy_spec(), 6, 3.0, global_fraction=0.5)
    assert batch["object_cells"].shape[0] == len(batch["object_image"]) == len(batch["object_shape"]) >= 3
    assert set(batch["object_image"].tolist()) == {0, 1, 2} and torch.all(batch["object_cells"].sum(1) >= 1)


def test_evaluations_are_labelled_by_steps_done_and_never_repeated(tmp_path):
    train(
        toy_recipe(vlm={"steps": 4}, monitor={"attention_items": 0}),
        tmp_path / "a",
        tmp_path / "a.jsonl",
        stages=("tower", "vlm"),
    )
    assert [r["step"] for r in rows_of(tmp_path / "a.jsonl") if r.get("stage") == 2] == [2, 4]
    out = train(toy_recipe(vlm={"steps": 0}), tmp_path / "b", tmp_path / "b.jsonl")  # a model is saved all the same
    assert json.loads((out / "training_recipe.json").read_text())["saved_at_step"] == 0


def test_training_curves_plot_from_a_log(tmp_path):
    from collab.training.plots import best_layer, main, read_log

    train(toy_recipe(), tmp_path / "m", tmp_path / "log.jsonl")
    tower, evals = read_log(tmp_path / "log.jsonl")
    assert tower and [r["step"] for r in evals] == [2, 3]
    row = {"L0_rel_hit": 0.2, "L1_rel_hit": 0.7, "L1_plain_hit": 0.9}
    assert best_layer(row) == 1 and best_layer(row, "plain") == 1 and best_layer({}) is None
    assert main([str(tmp_path / "log.jsonl"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 5000
    assert main([str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "d.png")]) == 2


class Oracle(torch.nn.Module):
    """Logits that predict every next token of the batch, but flat at one (row, position) `wrong_at`."""

    def __init__(self, vocab_size: int, wrong_at: tuple[int, int] | None = None):
        super().__init__()
        self.vocab_size, self.wrong_at = vocab_size, wrong_at

    def forward(self, input_ids, attention_mask, pixel_values):
        logits = torch.full((*input_ids.shape, self.vocab_size), -10.0)
        logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 10.0)
        if self.wrong_at is not None:
            row, at = self.wrong_at
            logits[row, at - 1] = 0.0
        return type("Out", (), {"logits": logits})()


def test_captions_name_every_object_and_are_labelled_token_by_token():
    from collab.data.synthetic import COLORS, SHAPES, tokenize_text
    from collab.training.data import CAPTION_QUESTION, answer_loss

    assert set(tokenize_text(CAPTION_QUESTION)) <= set(VOCABULARY)  # the shipped tokenizer covers it
    tok = build_tokenizer(VOCABULARY)
    spec = toy_spec(caption_fraction=1.0, caption_shape_first=0.5)
    examples = [make_example(np.random.default_rng(i), spec, 2 + i % 3, "global", tok) for i in range(6)]
    assert all(ex["kind"] == "caption" for ex in examples)
    assert not any(make_example(np.random.default_rng(i), spec, 3, "local", tok)["kind"] == "caption" for i in range(6))
    batch = collate(examples, spec, tok.pad_token_id, tok.eos_token_id)
    for i, ex in enumerate(examples):
        words = tok.convert_ids_to_tokens(ex["answer_ids"])
        assert len(words) == 2 * (2 + i % 3)  # colour and shape per object, no legible digits
        pairs = [set(words[j : j + 2]) for j in range(0, len(words), 2)]
        assert all(len(p & set(COLORS)) == 1 and len(p & set(SHAPES)) == 1 for p in pairs)
        p, n = int(batch["answer_pos"][i]), int(batch["answer_len"][i])
        assert batch["input_ids"][i, p : p + n].tolist() == ex["answer_ids"]
        assert batch["input_ids"][i, p + n] == tok.eos_token_id and batch["attention_mask"][i].sum() == p + n + 1
    firsts = [set(tok.convert_ids_to_tokens(ex["answer_ids"])[::2]) for ex in examples]
    assert all(f <= set(COLORS) or f <= set(SHAPES) for f in firsts)  # one order per description
    assert any(f <= set(COLORS) for f in firsts) and any(f <= set(SHAPES) for f in firsts)  # both orders drawn
    colour_first = [
        make_example(np.random.default_rng(i), toy_spec(caption_fraction=1.0), 3, "global", tok) for i in range(4)
    ]
    assert all(w in COLORS for ex in colour_first for w in tok.convert_ids_to_tokens(ex["answer_ids"])[::2])

    _, per_ex, correct = answer_loss(Oracle(len(tok)), batch, eos_weight=0.2)
    assert correct.all() and per_ex.max() < 1e-3
    last = int(batch["answer_pos"][0] + batch["answer_len"][0] - 1)  # the last caption token only
    _, per_ex, correct = answer_loss(Oracle(len(tok), (0, last)), batch, eos_weight=0.2)
    assert not correct[0] and correct[1:].all() and per_ex[0] > 0.1


def test_object_starts_can_be_left_out_of_a_descriptions_loss():
    from collab.training.data import answer_loss

    tok = build_tokenizer(VOCABULARY)
    spec = toy_spec(caption_fraction=1.0, caption_object_starts=False)
    examples = [make_example(np.random.default_rng(i), spec, 3, "global", tok) for i in range(4)]
    batch = collate(examples, spec, tok.pad_token_id, tok.eos_token_id)
    for i, ex in enumerate(examples):
        assert ex["answer_weights"] == [0.0, 1.0] * 3  # colour (a pick among the rest) out, shape in
        assert batch["answer_weight"][i].tolist() == ex["answer_weights"]
    plain = [make_example(np.random.default_rng(i), toy_spec(), 3, "global", tok) for i in range(4)]
    assert all(ex["answer_weights"] == [1.0] * len(ex["answer_ids"]) for ex in plain)

    start = int(batch["answer_pos"][0])
    _, per_ex, correct = answer_loss(Oracle(len(tok), (0, start)), batch, eos_weight=0.2)  # first colour: not scored
    assert correct.all() and per_ex.max() < 1e-3
    _, per_ex, correct = answer_loss(Oracle(len(tok), (0, start + 1)), batch, eos_weight=0.2)  # its shape: scored
    assert not correct[0] and per_ex[0] > 0.1


def test_a_caption_recipe_trains_and_monitors_caption_reading(tmp_path):
    recipe = toy_recipe(vlm={"caption_fraction": 0.5, "caption_shape_first": 0.5})
    out = train(recipe, tmp_path / "model", tmp_path / "log.jsonl")
    evals = [r for r in rows_of(tmp_path / "log.jsonl") if r.get("stage") == 2 and "L0_qrows_hit" in r]
    assert evals and all(0.0 <= r["global_caption_look_acc"] <= 1.0 for r in evals)
    assert all(0.0 <= r["global_caption_shape_look_acc"] <= 1.0 for r in evals)
    # the look-alike split of the RoI hit covers every monitored item
    assert all(("L0_qrows_hit_alike" in r) or ("L0_qrows_hit_distinct" in r) for r in evals)
    assert (out / "model.safetensors").exists()


def test_continuations_run_in_one_go_and_count_on_in_the_plots(tmp_path):
    from collab.training.plots import read_log

    raw = json.loads(json.dumps(TOY))
    raw["vlm"]["stop_after"] = 2  # cut short mid-schedule, as the shipped model's first part was
    raw["continuations"] = [
        {"seed": 1, "vlm": {"steps": 2, "stop_after": None, "caption_fraction": 0.5}},
        {"seed": 2, "tower": {"steps": 2, "lr": 5e-4}, "vlm": {"steps": 2, "stop_after": None}},
    ]
    recipe = Recipe.model_validate(raw)
    (first, first_tower), (second, second_tower), (third, third_tower) = recipe.parts()
    assert (first_tower, second_tower, third_tower) == (True, False, True)
    assert (first.vlm.stop_after, second.vlm.steps, second.vlm.caption_fraction, second.seed) == (2, 2, 0.5, 1)
    assert (third.tower.steps, third.tower.lr, third.tower.batch, first.tower.steps) == (2, 5e-4, 4, 3)
    assert not first.continuations and not second.continuations and second.model == recipe.model
    out = train(recipe, tmp_path / "model", tmp_path / "log.jsonl")
    rows = rows_of(tmp_path / "log.jsonl")
    assert [(r["stage_done"], r.get("part", 0)) for r in rows if "stage_done" in r] == [
        (1, 0),
        (2, 0),
        (2, 1),
        (1, 2),
        (2, 2),
    ]
    tower, evals = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in evals] == [2, 4, 6]  # each continuation's steps count on from the part before's
    assert [r["step"] for r in tower] == [0, 2, 3, 4]  # stage 1: 3 steps (0 and the last logged), then 2 more
    assert (out / "monitor" / "part1" / "maps_000002.png").exists()
    saved = json.loads((out / "training_recipe.json").read_text())
    assert (saved["seed"], saved["stage2_part"], saved["saved_at_step"]) == (2, 2, 2)  # saved by the last part
    for bad in ({"model": {"text_layers": 3}}, {"vlm": {"nonsense": 1}}, {"tower": {"steps": -1}}):
        with pytest.raises(ValueError):
            Recipe.model_validate({**raw, "continuations": [bad]})
    with pytest.raises(ValueError, match="init_model"):
        train(recipe, tmp_path / "m2", from_part=2)
    with pytest.raises(ValueError, match="from_part"):
        train(recipe, tmp_path / "m2", from_part=3, init_model=out)


def test_stage_2_parts_in_one_go_equal_the_same_parts_one_at_a_time(tmp_path):
    """A recipe's stage-2 parts run in one process give, tensor by tensor, what they give run one at a
    time, each from the weights the part before saved (--from-part N --init-model DIR): a model made
    part by part is what its recipe file makes in one command."""
    from safetensors.torch import load_file

    raw = json.loads(json.dumps(TOY))
    raw["vlm"]["steps"] = 2
    raw["continuations"] = [{"seed": 1, "vlm": {"steps": 2, "caption_fraction": 0.3}}, {"seed": 2, "vlm": {"steps": 2}}]
    whole = train(Recipe.model_validate(raw), tmp_path / "whole", tmp_path / "whole.jsonl")
    first = train(Recipe.model_validate({**raw, "continuations": []}), tmp_path / "p0")
    second = train(
        Recipe.model_validate({**raw, "continuations": raw["continuations"][:1]}),
        tmp_path / "p1",
        stages=("vlm",),
        from_part=1,
        init_model=first,
    )
    third = train(
        Recipe.model_validate(raw),
        tmp_path / "p2",
        tmp_path / "p2.jsonl",
        stages=("vlm",),
        from_part=2,
        init_model=second,
    )
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(third / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = [r for r in rows_of(tmp_path / "whole.jsonl") if r.get("part") == 2 and "loss_ema" in r]
    alone = [r for r in rows_of(tmp_path / "p2.jsonl") if "loss_ema" in r]
    assert last and [r["loss_ema"] for r in last] == [r["loss_ema"] for r in alone]
    one_part = load_file(str(first / "model.safetensors"))
    (head,) = [k for k in a if "lm_head" in k]
    assert not torch.equal(one_part[head], a[head])  # the later parts did train


def test_tower_only_parts_then_a_fresh_decoder_resumable_from_the_tower(tmp_path):
    """Parts with vlm.steps 0 train the tower only; the recipe's stage 2 then starts on a decoder no
    part has trained, so it can be resumed from the tower alone (--from-part with --init-tower)."""
    from transformers import LlavaForConditionalGeneration

    raw = json.loads(json.dumps(TOY))
    raw["vlm"]["steps"] = 0
    raw["continuations"] = [{"seed": 1, "tower": {"steps": 2}}, {"seed": 2, "vlm": {"steps": 2}}]
    recipe = Recipe.model_validate(raw)
    out = train(recipe, tmp_path / "full", tmp_path / "full.jsonl")
    rows = rows_of(tmp_path / "full.jsonl")
    assert [(r["stage_done"], r.get("part", 0)) for r in rows if "stage_done" in r] == [(1, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="init_tower"):
        train(recipe, tmp_path / "none", from_part=2)
    resumed = train(recipe, tmp_path / "resumed", tmp_path / "resumed.jsonl", init_tower=out, from_part=2)
    rows = rows_of(tmp_path / "resumed.jsonl")
    assert [(r["stage_done"], r.get("part", 0)) for r in rows if "stage_done" in r] == [(2, 2)]
    full = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    again = LlavaForConditionalGeneration.from_pretrained(resumed).state_dict()
    tower_keys = [k for k in full if ".vision_tower." in k]
    assert tower_keys and all(torch.equal(full[k], again[k]) for k in tower_keys)  # the tower as given, frozen
    # a recipe whose parts all train the tower only still saves a loadable model
    towers_only = Recipe.model_validate({**raw, "continuations": [{"seed": 1, "tower": {"steps": 1}}]})
    saved = train(towers_only, tmp_path / "towers", tmp_path / "towers.jsonl")
    assert (saved / "model.safetensors").exists()
    assert [r["stage_done"] for r in rows_of(tmp_path / "towers.jsonl") if "stage_done" in r] == [1, 1]


def test_each_stage_runs_at_its_own_thread_count(tmp_path, monkeypatch):
    import collab.training.train as train_module

    calls = []
    monkeypatch.setattr(train_module.torch, "set_num_threads", calls.append)
    raw = json.loads(json.dumps(TOY))
    raw["runtime"].update(threads=1, vlm_threads=2)
    raw["continuations"] = [{"vlm": {"steps": 1}}, {"vlm": {"steps": 1}, "runtime": {"vlm_threads": 3}}]
    train(Recipe.model_validate(raw), tmp_path / "model", tmp_path / "log.jsonl")
    assert calls == [1, 2, 2, 3]  # the tower at `threads`; stage 2 and each continuation at their `vlm_threads`
    raw["runtime"]["vlm_threads"] = None
    calls.clear()
    train(Recipe.model_validate({**raw, "continuations": []}), tmp_path / "model2", tmp_path / "log2.jsonl")
    assert calls == [1, 1]


def test_stage1_releases_waiting_workers_when_it_fails(tmp_path, monkeypatch):
    """A stage-1 part that raises mid-loop still publishes every step's crop scale, so a data worker
    waiting on one is released at once rather than left for the loader's shutdown timeout."""
    import collab.training.tower as tower_module

    made = []

    class Recording(ScaleCurriculum):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(tower_module, "ScaleCurriculum", Recording)
    recipe = toy_recipe(tower={"steps": 5, "batch": 4, "scale_start": 2.0, "scale_end": 8.0})
    tokenizer = build_tokenizer(VOCABULARY)
    from collab.models.tiny import build_tiny_llava
    from collab.training.train import batch_spec

    model = build_tiny_llava(tokenizer, recipe.model.spec(), seed=0)

    def failing_log(row):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        tower_module.train_tower(model, batch_spec(recipe), recipe, failing_log)
    (curriculum,) = made
    assert curriculum.moves and not any(math.isnan(v) for v in curriculum.published)


def test_a_recipe_file_can_start_from_a_saved_tower_with_its_own_decoder_seed(tmp_path):
    """`start` and `decoder_seed` put in the file what a reproduction needs: a plain run of a file
    that starts at part 1 from a saved tower, with the decoder drawn at another seed, gives the
    weights of the same run asked for with flags, and its fresh decoder is the one that seed draws."""
    import yaml
    from safetensors.torch import load_file

    from collab.models.tiny import build_tiny_llava
    from collab.training.train import initial_model

    raw = json.loads(json.dumps(TOY))
    raw["vlm"]["steps"] = 0
    raw["continuations"] = [{"seed": 2, "vlm": {"steps": 2}}]
    tower_run = train(Recipe.model_validate(raw), tmp_path / "tower")  # part 0: the tower only
    flags = train(
        Recipe.model_validate({**raw, "decoder_seed": 5}), tmp_path / "flags", init_tower=tower_run, from_part=1
    )
    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "start.yaml"
    path.write_text(yaml.safe_dump({**raw, "decoder_seed": 5, "start": {"part": 1, "tower": "../tower"}}))
    recipe = load_recipe(path)
    assert recipe.start.tower == str(tower_run.resolve())  # relative to the file
    plain = train(recipe, tmp_path / "plain", tmp_path / "plain.jsonl")
    log = rows_of(tmp_path / "plain.jsonl")
    assert log[1]["from_part"] == 1 and log[2]["init_tower"] == str(tower_run.resolve())
    a, b = load_file(str(flags / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    tokenizer = build_tokenizer(VOCABULARY)
    model = initial_model(tokenizer, Recipe.model_validate({**raw, "decoder_seed": 5})).state_dict()
    at0 = build_tiny_llava(tokenizer, Recipe.model_validate(raw).model.spec(), seed=0).state_dict()
    at5 = build_tiny_llava(tokenizer, Recipe.model_validate(raw).model.spec(), seed=5).state_dict()
    for key, value in model.items():
        assert torch.equal(value, (at0 if ".vision_tower." in key else at5)[key]), key
    assert not torch.equal(at0["lm_head.weight"], at5["lm_head.weight"])
    for change in ({"start": {"part": 1}}, {"decoder_seed": 1}):
        with pytest.raises(ValueError, match="cannot change in a continuation"):
            Recipe.model_validate({**raw, "continuations": [change]})
    # the decoder's seed draws nothing else: stage 1 of a whole-recipe run trains the same tower
    towers = []
    for seed in (None, 5):
        run = train(Recipe.model_validate({**raw, "decoder_seed": seed}), tmp_path / f"whole{seed}")
        towers.append(load_file(str(run / "model.safetensors")))
    tower_keys = [k for k in towers[0] if "vision_tower." in k]
    (head,) = [k for k in towers[0] if "lm_head" in k]
    assert tower_keys and all(torch.equal(towers[0][k], towers[1][k]) for k in tower_keys)
    assert not torch.equal(towers[0][head], towers[1][head])
