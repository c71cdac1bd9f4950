"""Train the embedded default model (a tiny LLaVA) from scratch on synthetic fine-detail VQA.

    python -m collab.training.train_tiny --out models/collab-tiny-llava

Two stages, both from plain labels, neither touching attention or boxes:

1. Vision tower pre-training. Real VLMs start from a pre-trained encoder; ours learns from
   image-level labels: for crops, the digit, colour and shape of the object the crop is about;
   for global images, which colours and shapes are present and how many objects there are.
2. VLM training. The whole LLaVA (tower, projector, decoder) on answers only: global-only batches
   (fine questions there teach the model to be unsure) and global + local batches (crops of the
   original around the question's object, jittered, with hard negatives), with a curriculum from
   one object per scene to five. The tower stays frozen for the first steps so the decoder learns
   to read its features before they move.

Progress shows loss, per-kind accuracy and the shuffled-image loss gap (loss with images shuffled
across the batch minus loss with the right images: near zero means the model ignores the image).
Seeded; the checkpoint is saved with save_pretrained and loads through LlavaBackend.from_pretrained.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from PIL import Image, ImageDraw

from collab.data.synthetic import COLORS, MAX_OBJECTS, POSITION_VOCABULARY, SHAPES, VOCABULARY, _draw_shape, render_scene
from collab.imaging import crop_local_image, make_global_image
from collab.roi import box_around
from collab.models.tiny import TinyLlavaSpec, build_image_processor, build_tiny_llava, build_tokenizer, save_tiny_llava
from collab.training.data import BatchSpec, BatchStream, collate, jpeg_round_trip, make_example, to_pixels, worker_shard

# LLaVA-1.5's order, image first. Tried question-first (visual tokens then know the question):
# the answer could then be gathered into later visual tokens instead of read from the object's
# patches, and the RoI hit rate fell to 0.04-0.20 on the calibration split (image-first: 0.31).
PROMPT = "USER: <image>\n{question} ASSISTANT:"
REFINE_PROMPT = "USER: <image>\n<image>\n{question} ASSISTANT:"
COLOR_NAMES = list(COLORS)


@dataclass
class Recipe:
    """Everything that determines the trained weights."""

    seed: int = 0
    spec: TinyLlavaSpec = field(
        default_factory=lambda: TinyLlavaSpec(
            image_size=96, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4,
            text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=4, text_intermediate=512,
            max_positions=512,
        )
    )
    prompt_template: str = PROMPT
    refine_template: str = REFINE_PROMPT
    pretrain_steps: int = 3500
    pretrain_batch: int = 48
    pretrain_lr: float = 1e-3
    dense_weight: float = 1.0  # stage 1: weight of the per-patch colour/shape loss on global images
    # stage 1: weight of a per-patch loss on each global-image token's own row and column. Rotary
    # positions enter the decoder's attention scores, not the values a token passes on, so an
    # answer about where something is needs it in the token's content (probe: barely, 0.21 vs
    # 0.17 majority for the 3 x 3 cell) or a multi-step attention pattern.
    patch_position_weight: float = 0.0
    background_weight: float = 0.05  # class weight of "no object" patches in that loss
    tower_global_fraction: float | None = None  # stage 1: share of global images per batch (None: 1/4)
    steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    tower_lr_scale: float = 0.3
    freeze_tower_steps: int = 200
    warmup: int = 100
    weight_decay: float = 0.01
    eos_weight: float = 0.2
    local_fraction: float = 0.5
    fine_fraction: float = 0.5
    negative_fraction: float = 0.15
    small_scene_fraction: float = 0.0  # stage 2: global-only examples from small originals (see BatchSpec)
    position_fraction: float = 0.0  # stage 2: global-only examples asking "where is the red circle?" (see BatchSpec)
    curriculum: list = field(default_factory=lambda: [[300, 1], [700, 2], [1200, 3], [None, MAX_OBJECTS]])
    curriculum_offset: int = 0  # warm starts: begin the objects-per-scene curriculum (and data stream) here
    eval_every: int = 200
    eval_batches: int = 3
    eval_seed: int = 777_000  # never a benchmark seed
    threads: int = 1
    workers: int = 1
    # Where and how fast. The CPU recipe leaves these at their defaults. On a GPU the renderers must
    # keep up with the steps (reuse each rendered scene for several examples; the H100 run with 15
    # rendering workers waited on data 3.9 s of 505 s) and a wall-clock budget sizes the stages.
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto" (cuda when present)
    amp_dtype: str = "float32"  # "bfloat16": autocast matmuls on the device (weights stay float32)
    scene_reuse: int = 1  # examples drawn from each rendered scene (stage 1 crops, stage 2 questions)
    pretrain_budget_s: float | None = None  # stage 1 stops at pretrain_steps or this many seconds
    budget_s: float | None = None  # stage 2 likewise; the cosine schedule follows whichever is further
    # (a budget counts from the stage's start: worker start-up, evaluations and checkpoints included)


# ------------------------------------------------------------------------------ stage 1: tower


class TowerHeads(torch.nn.Module):
    """Linear heads on mean-pooled visual features (the features the projector will see)."""

    def __init__(self, hidden: int, grid: int = 0):
        super().__init__()
        self.digit = torch.nn.Linear(hidden, 10)
        self.color = torch.nn.Linear(hidden, len(COLOR_NAMES))
        self.shape = torch.nn.Linear(hidden, len(SHAPES))
        self.present = torch.nn.Linear(hidden, len(COLOR_NAMES) + len(SHAPES))
        self.count = torch.nn.Linear(hidden, MAX_OBJECTS)
        self.patch_color = torch.nn.Linear(hidden, len(COLOR_NAMES) + 1)  # last class: background
        self.patch_shape = torch.nn.Linear(hidden, len(SHAPES) + 1)
        if grid:  # only with patch_position_weight (added last: the other heads' initialisation is unchanged)
            self.patch_row = torch.nn.Linear(hidden, grid)
            self.patch_col = torch.nn.Linear(hidden, grid)


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Per-patch visual features (B, patches, hidden): exactly the tokens the projector receives."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return hidden


def tower_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return patch_features(model, pixel_values).mean(1)


def patch_labels(scene, grid: int, min_cover: float = 0.2) -> tuple[list[int], list[int]]:
    """Colour and shape of the object covering most of each patch of the (resized) global image,
    or background where no object covers `min_cover` of it. Row-major, grid x grid."""
    coverage = []
    for obj in scene.objects:
        mask = Image.new("L", scene.image.size, 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.box, 255)
        coverage.append(np.asarray(mask.resize((grid, grid), Image.BOX), dtype=np.float32).ravel() / 255.0)
    cover = np.stack(coverage)
    best = cover.argmax(0)
    colors, shapes = [], []
    for p, k in enumerate(best):
        if cover[k, p] < min_cover:
            colors.append(len(COLOR_NAMES))
            shapes.append(len(SHAPES))
        else:
            colors.append(COLOR_NAMES.index(scene.objects[k].color))
            shapes.append(SHAPES.index(scene.objects[k].shape))
    return colors, shapes


class ScaleCurriculum:
    """Stage 1 curriculum: crops start tight on the glyph and zoom out as the tower learns to read.

    A ViT from scratch does not find a 2-patch glyph in a 144-patch image by itself (measured:
    no learning in 175 steps at RoI crop sizes; learning within 100 steps on tight crops). The
    largest crop scale grows by one step whenever recent crop-digit accuracy passes `promote_at`,
    up to RoI-sized crops. Shared with the data worker through a multiprocessing value.
    """

    def __init__(self, start: float = 2.5, end: float = 14.0, step: float = 1.0, promote_at: float = 0.6, window: int = 20):
        import multiprocessing as mp

        self.value = mp.Value("d", start)
        self.end, self.step, self.promote_at, self.window = end, step, promote_at, window
        self.recent: list[float] = []

    def get(self) -> float:
        return self.value.value

    def update(self, accuracy: float) -> None:
        self.recent.append(accuracy)
        if len(self.recent) >= self.window:
            if np.mean(self.recent) >= self.promote_at and self.value.value < self.end:
                self.value.value = min(self.end, self.value.value + self.step)
            self.recent.clear()


def tower_batch(rng: np.random.Generator, spec: BatchSpec, n: int, max_scale: float, global_fraction: float | None = None,
                scene_reuse: int = 1) -> dict:
    """3/4 crops (digit/colour/shape of the crop's object), 1/4 globals (presence, count, and the
    colour and shape at each patch: real VLM towers come with local semantics, ours must learn them).

    Crop side = glyph height x s, s uniform in [2, max_scale], centre jittered by 10% of the side.
    `global_fraction` overrides the 1/4 share of global images (1.0: globals only). `scene_reuse`
    > 1 takes up to that many samples from each rendered scene (crops of different objects; a
    global image always starts a new scene, so no image repeats).
    """
    n_global = None if global_fraction is None else round(n * global_fraction)
    size = (spec.image_size, spec.image_size)
    crops, crop_labels, globals_, global_labels, dense = [], [], [], [], []
    grid = spec.image_size // spec.patch_size
    scene, uses, cropped = None, scene_reuse, []
    for i in range(n):
        is_global = (i % 4 == 3) if n_global is None else i < n_global
        if is_global or uses >= scene_reuse:
            scene = render_scene(rng, n_objects=int(rng.integers(1, MAX_OBJECTS + 1)))
            uses, cropped = 0, []
        uses += 1
        if not is_global:
            pool = [o for o in scene.objects if o not in cropped] or scene.objects
            obj = pool[int(rng.integers(len(pool)))]
            cropped.append(obj)
            g = obj.glyph_box
            side = (g[3] - g[1]) * rng.uniform(2.0, max_scale)
            cx = (g[0] + g[2]) / 2 + rng.uniform(-0.1, 0.1) * side
            cy = (g[1] + g[3]) / 2 + rng.uniform(-0.1, 0.1) * side
            box = box_around(cx, cy, side, scene.width, scene.height)
            crops.append(jpeg_round_trip(crop_local_image(scene.image, box, size), spec.jpeg_quality))
            crop_labels.append((int(obj.digit), COLOR_NAMES.index(obj.color), SHAPES.index(obj.shape)))
        else:
            globals_.append(jpeg_round_trip(make_global_image(scene.image, size)[0], spec.jpeg_quality))
            present = torch.zeros(len(COLOR_NAMES) + len(SHAPES))
            for o in scene.objects:
                present[COLOR_NAMES.index(o.color)] = 1
                present[len(COLOR_NAMES) + SHAPES.index(o.shape)] = 1
            global_labels.append((present, len(scene.objects) - 1))
            dense.append(patch_labels(scene, grid))
    empty = torch.zeros(0, 3, spec.image_size, spec.image_size)
    return {
        "crops": to_pixels(crops, spec.image_mean, spec.image_std) if crops else empty,
        "crop_labels": torch.tensor(crop_labels, dtype=torch.long).reshape(-1, 3),
        "globals": to_pixels(globals_, spec.image_mean, spec.image_std) if globals_ else empty,
        "present": torch.stack([p for p, _ in global_labels]) if global_labels else torch.zeros(0, len(COLOR_NAMES) + len(SHAPES)),
        "count": torch.tensor([c for _, c in global_labels], dtype=torch.long),
        "patch_color": torch.tensor([c for c, _ in dense], dtype=torch.long).reshape(len(dense), grid * grid),
        "patch_shape": torch.tensor([s for _, s in dense], dtype=torch.long).reshape(len(dense), grid * grid),
        "max_scale": max_scale,
    }


class TowerStream(torch.utils.data.IterableDataset):
    """Stage-1 batches rendered in a worker process."""

    def __init__(self, spec: BatchSpec, batch: int, seed: int, curriculum: ScaleCurriculum, global_fraction: float | None = None,
                 scene_reuse: int = 1):
        super().__init__()
        self.spec, self.batch, self.seed, self.curriculum = spec, batch, seed, curriculum
        self.global_fraction, self.scene_reuse = global_fraction, scene_reuse

    def __iter__(self):
        worker, workers = worker_shard()
        step = worker
        while True:
            scale = self.curriculum.get()
            yield tower_batch(np.random.default_rng([self.seed, 1, step]), self.spec, self.batch, scale, self.global_fraction,
                              self.scene_reuse)
            step += workers


def _loader(stream, workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, persistent_workers=False, prefetch_factor=2 if workers else None,
        pin_memory=device.type == "cuda",
    )


class TimedBatches:
    """Batches from a loader, with the seconds spent waiting for them (`wait_s`): tells a run held
    up by rendering from one held up by compute (each step syncs on a loss value, so the wait is
    the data's alone)."""

    def __init__(self, loader):
        self.batches, self.wait_s = iter(loader), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.monotonic()
        batch = next(self.batches)
        self.wait_s += time.monotonic() - t
        return batch


def resolve_device(name: str) -> torch.device:
    """'auto' is the first GPU when there is one; an unavailable device is refused here, not mid-run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast(device: torch.device, amp_dtype: str):
    """bf16 autocast on the device when asked (no float16: it would need gradient scaling); a no-op
    context for float32."""
    dtype = getattr(torch, amp_dtype)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def scheduled_batches(loader, sched: "CosineSchedule", device: torch.device):
    """(step, batch on the device) with the learning rates set for that step, until the schedule's
    steps or time budget run out: the loop head both stages share."""
    for step, batch in enumerate(loader):
        if sched.finished(step):
            return
        sched.set(step)
        yield step, to_device(batch, device)


def pretrain_tower(model, spec: BatchSpec, recipe: Recipe, log, scale_start: float = 2.5) -> int:
    """Stage 1; returns the number of steps run (fewer than pretrain_steps when the budget ends it)."""
    device = next(model.parameters()).device
    grid = recipe.spec.image_size // recipe.spec.patch_size
    heads = TowerHeads(recipe.spec.vision_hidden, grid if recipe.patch_position_weight else 0).to(device)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.pretrain_lr, weight_decay=recipe.weight_decay)
    sched = CosineSchedule(opt, recipe.warmup, recipe.pretrain_steps, recipe.pretrain_budget_s)
    model.train()
    curriculum = ScaleCurriculum(start=scale_start)
    stream = TowerStream(spec, recipe.pretrain_batch, recipe.seed, curriculum, recipe.tower_global_fraction, recipe.scene_reuse)
    loader = TimedBatches(_loader(stream, recipe.workers, device))
    bar = tqdm(total=recipe.pretrain_steps, desc="stage 1: vision tower", dynamic_ncols=True)
    # objects cover a few of the 144 patches: down-weight background or it is all the tower learns
    color_w = torch.ones(len(COLOR_NAMES) + 1, device=device)
    shape_w = torch.ones(len(SHAPES) + 1, device=device)
    color_w[-1] = shape_w[-1] = recipe.background_weight
    step, row = -1, None
    for step, b in scheduled_batches(loader, sched, device):
        loss = torch.zeros((), device=device)
        loss_digit = torch.zeros((), device=device)
        acc = float("nan")
        with autocast(device, recipe.amp_dtype):
            if len(b["crops"]):
                fc = tower_features(model, b["crops"]).float()  # float: the accuracy heads below run without autocast
                digit, color, shape = b["crop_labels"].T
                loss_digit = F.cross_entropy(heads.digit(fc), digit)
                loss = (loss
                        + 2.0 * loss_digit  # reading the glyph is the hard part; colour and shape come easily
                        + F.cross_entropy(heads.color(fc), color)
                        + F.cross_entropy(heads.shape(fc), shape))
            dense_loss = torch.zeros((), device=device)
            position_loss = torch.zeros((), device=device)
            color_acc = shape_acc = patch_acc = position_acc = float("nan")
            if len(b["globals"]):
                pg = patch_features(model, b["globals"]).float()
                fg = pg.mean(1)
                loss = (loss
                        + F.binary_cross_entropy_with_logits(heads.present(fg), b["present"])
                        + F.cross_entropy(heads.count(fg), b["count"]))
                dense_loss = (F.cross_entropy(heads.patch_color(pg).flatten(0, 1), b["patch_color"].flatten(), weight=color_w)
                              + F.cross_entropy(heads.patch_shape(pg).flatten(0, 1), b["patch_shape"].flatten(), weight=shape_w))
                if recipe.dense_weight:
                    loss = loss + recipe.dense_weight * dense_loss
                if recipe.patch_position_weight:
                    cells = torch.arange(pg.shape[1], device=device).repeat(len(pg))
                    row_logits, col_logits = heads.patch_row(pg).flatten(0, 1), heads.patch_col(pg).flatten(0, 1)
                    position_loss = F.cross_entropy(row_logits, cells // grid) + F.cross_entropy(col_logits, cells % grid)
                    loss = loss + recipe.patch_position_weight * position_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        # accuracies with the updated heads, as the shipped recipe measured them (the crop-digit
        # accuracy drives the scale curriculum, so this order is part of the recipe)
        with torch.no_grad(), autocast(device, recipe.amp_dtype):
            if len(b["crops"]):
                acc = (heads.digit(fc).argmax(-1) == digit).float().mean().item()
        if len(b["globals"]):
            on_object = b["patch_color"] < len(COLOR_NAMES)
            with torch.no_grad():
                color_ok = heads.patch_color(pg).argmax(-1) == b["patch_color"]
                shape_ok = heads.patch_shape(pg).argmax(-1) == b["patch_shape"]
            color_acc = color_ok[on_object].float().mean().item()
            shape_acc = shape_ok[on_object].float().mean().item()
            patch_acc = (color_ok & shape_ok)[on_object].float().mean().item()
            if recipe.patch_position_weight:
                with torch.no_grad():  # with the updated heads, like colour and shape above
                    position_ok = ((heads.patch_row(pg).argmax(-1).flatten() == cells // grid)
                                   & (heads.patch_col(pg).argmax(-1).flatten() == cells % grid))
                position_acc = position_ok.float().mean().item()
        if not math.isnan(acc):
            curriculum.update(acc)
        bar.set_postfix(loss=f"{loss.item():.3f}", digit_acc=f"{acc:.2f}", patch_acc=f"{patch_acc:.2f}",
                        shape_acc=f"{shape_acc:.2f}", scale=f"{b['max_scale']:.1f}")
        row = {"stage": 1, "step": step, "loss": loss.item(), "digit_loss": loss_digit.item(), "crop_digit_acc": acc,
               "dense_loss": dense_loss.item(), "object_patch_acc": patch_acc,
               "object_patch_color_acc": color_acc, "object_patch_shape_acc": shape_acc, "max_scale": b["max_scale"],
               **({"position_loss": position_loss.item(), "patch_position_acc": position_acc} if recipe.patch_position_weight else {}),
               "lr": opt.param_groups[0]["lr"], "data_wait_s": round(loader.wait_s, 1)}
        if step % 50 == 0 or step == recipe.pretrain_steps - 1:
            log(row)
            row = None
    bar.close()
    done = step + 1
    if done and row is not None:  # the budget ended it between logged steps: log the last one
        log(row)
    log({"stage_done": 1, "steps": done})
    return done


# ------------------------------------------------------------------------------ stage 2: VLM


class CosineSchedule:
    """Linear warm-up over `warmup` steps, then cosine from the base learning rates to 10 % of them.

    Progress is steps over `total` or, with a wall-clock `budget_s`, elapsed over budget, whichever
    is further; `finished` says when either runs out. Without a budget this is exactly a
    LambdaLR on the step count (the CPU recipe's schedule)."""

    def __init__(self, opt, warmup: int, total: int, budget_s: float | None = None):
        if budget_s is not None and budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        self.opt, self.warmup, self.total, self.budget_s = opt, warmup, total, budget_s
        self.base = [group["lr"] for group in opt.param_groups]
        self.started = time.monotonic()
        self.set(0)

    def elapsed_fraction(self) -> float:
        return 0.0 if self.budget_s is None else (time.monotonic() - self.started) / self.budget_s

    def finished(self, step: int) -> bool:
        return step >= self.total or self.elapsed_fraction() >= 1.0

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, max((step - self.warmup) / max(1, self.total - self.warmup), self.elapsed_fraction()))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def set(self, step: int) -> None:
        """Learning rates for training step `step` (0-based)."""
        factor = self.factor(step)
        for group, base in zip(self.opt.param_groups, self.base):
            group["lr"] = base * factor


def answer_loss(model, batch: dict, eos_weight: float, pixel_values: torch.Tensor | None = None):
    """Cross-entropy on the answer token (weight 1) and EOS (eos_weight); also the answer logits."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"] if pixel_values is None else pixel_values,
    )
    rows = torch.arange(len(batch["answer_pos"]))
    pos = batch["answer_pos"]
    answer_logits = out.logits[rows, pos - 1]
    eos_logits = out.logits[rows, pos]
    answer_ids = batch["input_ids"][rows, pos]
    eos_ids = batch["input_ids"][rows, pos + 1]
    per_example = F.cross_entropy(answer_logits.float(), answer_ids, reduction="none")
    loss = per_example.mean() + eos_weight * F.cross_entropy(eos_logits.float(), eos_ids)
    return loss, per_example, answer_logits.argmax(-1) == answer_ids


def shuffled_pixels(batch: dict) -> torch.Tensor:
    """The batch's images rolled by one example: right questions, wrong images."""
    n = batch["n_images"]
    pv = batch["pixel_values"].reshape(-1, n, *batch["pixel_values"].shape[1:])
    return pv.roll(1, dims=0).reshape(batch["pixel_values"].shape)


def eval_batch(rng: np.random.Generator, spec: BatchSpec, kind: str, stream: BatchStream, recipe: Recipe,
               device: torch.device) -> dict:
    """One fixed evaluation batch of `kind` examples (2-5 objects each, no hard negatives), on the device."""
    examples = [make_example(rng, spec, int(rng.integers(2, MAX_OBJECTS + 1)), kind, stream.tokenizer)
                for _ in range(recipe.batch)]
    for ex in examples:
        ex["negative"] = False
    return to_device(collate(examples, spec, stream.tokenizer.pad_token_id, stream.tokenizer.eos_token_id), device)


@torch.no_grad()
def evaluate(model, stream: BatchStream, recipe: Recipe) -> dict:
    """Accuracy by (pass, kind) and the shuffled-image loss gap on fixed held-out batches."""
    model.eval()
    device = next(model.parameters()).device
    stats: dict[str, list] = {}
    spec = replace(stream.spec, small_scene_fraction=0.0, position_fraction=0.0)  # benchmark-like items only
    for kind in ("global", "local"):
        for i in range(recipe.eval_batches):
            batch = eval_batch(np.random.default_rng([recipe.eval_seed, i, kind == "local"]), spec, kind, stream, recipe, device)
            with autocast(device, recipe.amp_dtype):
                _, per_ex, correct = answer_loss(model, batch, recipe.eos_weight)
                _, per_ex_shuf, _ = answer_loss(model, batch, recipe.eos_weight, shuffled_pixels(batch))
            for name, mask in (("fine", batch["fine"]), ("coarse", ~batch["fine"])):
                key = f"{kind}_{name}"
                stats.setdefault(f"{key}_acc", []).extend(correct[mask].float().tolist())
                stats.setdefault(f"{key}_gap", []).extend((per_ex_shuf - per_ex)[mask].tolist())
    if stream.spec.position_fraction:  # the training-only position questions, on their own
        where = replace(spec, position_fraction=1.0)
        batch = eval_batch(np.random.default_rng([recipe.eval_seed, 0, 2]), where, "global", stream, recipe, device)
        with autocast(device, recipe.amp_dtype):
            _, _, correct = answer_loss(model, batch, recipe.eos_weight)
        stats["global_position_acc"] = correct.float().tolist()
    model.train()
    return {k: float(np.mean(v)) for k, v in stats.items() if v}


def tower_state(path: Path) -> dict:
    """A vision tower's weights: a stage-1 checkpoint (.pt), or the tower of a saved model directory."""
    if Path(path).is_dir():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path).model.vision_tower.state_dict()
    return torch.load(path, weights_only=True)


def training_words(recipe: Recipe) -> list[str]:
    """The tokenizer's words: the benchmark's, plus the position words when the recipe asks them
    (appended, so the ids of the benchmark's tokens do not move)."""
    return VOCABULARY + (POSITION_VOCABULARY if recipe.position_fraction else [])


def check_token_ids(model_dir: Path, tokenizer) -> None:
    """Warm starts: every word of the saved model's tokenizer must keep its id in this recipe's
    (grown rows are only meaningful when the old vocabulary is a prefix of the new one)."""
    from transformers import AutoTokenizer

    new = tokenizer.get_vocab()
    moved = {w: i for w, i in AutoTokenizer.from_pretrained(model_dir).get_vocab().items() if new.get(w) != i}
    if moved:
        raise ValueError(f"{model_dir}'s tokenizer does not match this recipe's: {sorted(moved)[:5]} would change id")


def grow_vocabulary(model, size: int) -> None:
    """Warm starts: give a saved model rows for words its tokenizer did not have (new rows start
    at the mean of the old ones); old rows are untouched. A smaller vocabulary is refused."""
    have = model.get_input_embeddings().weight.shape[0]
    if size < have:
        raise ValueError(f"the saved model has {have} token ids, this recipe's tokenizer only {size}")
    if size > have:
        model.resize_token_embeddings(size, mean_resizing=True)


def save_checkpoint(model, tokenizer, recipe: Recipe, out_dir: Path, step: int) -> None:
    """save_pretrained with eager attention in the config (the served model reads attention maps)."""
    model.set_attn_implementation("eager")
    save_tiny_llava(out_dir, model, tokenizer, build_image_processor(recipe.spec))
    (Path(out_dir) / "training_recipe.json").write_text(json.dumps({**asdict(recipe), "saved_at_step": step}, indent=2))
    model.set_attn_implementation("sdpa")


def train(recipe: Recipe, out_dir: Path, log_path: Path | None = None, init_tower: Path | None = None,
          pretrain_only: bool = False, init_model: Path | None = None, continue_tower: bool = False) -> Path:
    device = resolve_device(recipe.device)
    if recipe.scene_reuse < 1:
        raise ValueError(f"scene_reuse must be >= 1, got {recipe.scene_reuse}")
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(training_words(recipe))
    model = build_tiny_llava(tokenizer, recipe.spec, seed=recipe.seed)
    model.set_attn_implementation("sdpa")  # fast training; the served model is loaded with eager
    grid = recipe.spec.image_size // recipe.spec.patch_size
    spec = BatchSpec(
        image_size=recipe.spec.image_size,
        tokens_per_image=grid * grid,
        patch_size=recipe.spec.patch_size,
        prompt_template=recipe.prompt_template,
        refine_template=recipe.refine_template,
        fine_fraction=recipe.fine_fraction,
        negative_fraction=recipe.negative_fraction,
        small_scene_fraction=recipe.small_scene_fraction,
        position_fraction=recipe.position_fraction,
    )
    log_file = open(log_path, "a") if log_path else None
    started = time.time()

    def log(row: dict) -> None:
        row = {"elapsed_s": round(time.time() - started, 1), **row}
        if log_file:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

    log({"recipe": asdict(recipe), "device": str(device)})
    if init_model:  # warm start: continue stage 2 from a saved model (same tokenizer and sizes)
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init_model, attn_implementation="sdpa")
        log({"init_model": str(init_model)})
        check_token_ids(init_model, tokenizer)
        grow_vocabulary(model, len(tokenizer))
        if init_tower:  # a retrained tower under the saved decoder: freeze it first, as from scratch
            model.model.vision_tower.load_state_dict(tower_state(init_tower))
            log({"init_tower": str(init_tower)})
    elif init_tower:
        model.model.vision_tower.load_state_dict(tower_state(init_tower))
        log({"init_tower": str(init_tower)})
    model.to(device)
    if init_tower and not init_model and continue_tower and recipe.pretrain_steps:
        # more stage 1 on a tower that already reads: full-size crops
        pretrain_tower(model, spec, recipe, log, scale_start=ScaleCurriculum().end)
        torch.save(model.model.vision_tower.state_dict(), Path(out_dir) / "vision_tower_stage1.pt")
    elif not init_tower and not init_model and recipe.pretrain_steps:
        pretrain_tower(model, spec, recipe, log)
        torch.save(model.model.vision_tower.state_dict(), Path(out_dir) / "vision_tower_stage1.pt")
    if pretrain_only:
        return Path(out_dir)

    stream = BatchStream(spec, tokenizer, recipe.batch, recipe.seed, recipe.curriculum, recipe.local_fraction,
                         start=recipe.curriculum_offset, scene_reuse=recipe.scene_reuse)
    loader = TimedBatches(_loader(stream, recipe.workers, device))
    tower = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    opt = torch.optim.AdamW(
        [{"params": rest, "lr": recipe.lr}, {"params": tower, "lr": recipe.lr * recipe.tower_lr_scale}],
        weight_decay=recipe.weight_decay,
    )
    sched = CosineSchedule(opt, recipe.warmup, recipe.steps, recipe.budget_s)
    model.train()
    bar = tqdm(total=recipe.steps, desc="stage 2: VLM", dynamic_ncols=True)
    ema = None

    def evaluate_and_log(step: int) -> dict:
        metrics = evaluate(model, stream, recipe)
        log({"stage": 2, "step": step, "loss_ema": ema, "lr": opt.param_groups[0]["lr"],
             "data_wait_s": round(loader.wait_s, 1), **metrics})
        return metrics

    step = -1
    for step, batch in scheduled_batches(loader, sched, device):
        frozen = step < recipe.freeze_tower_steps and (init_model is None or init_tower is not None)
        for p in tower:
            p.requires_grad_(not frozen)
        with autocast(device, recipe.amp_dtype):
            loss, _, correct = answer_loss(model, batch, recipe.eos_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", objs=stream.max_objects(step + recipe.curriculum_offset))
        if step % recipe.eval_every == 0 or step == recipe.steps - 1:
            metrics = evaluate_and_log(step)
            bar.write(f"step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items())))
            save_checkpoint(model, tokenizer, recipe, out_dir, step)  # a usable model if training is stopped early
    bar.close()
    done = step + 1
    if done and (done - 1) % recipe.eval_every and done - 1 != recipe.steps - 1:  # stopped by the budget between evaluations
        evaluate_and_log(done - 1)
    save_checkpoint(model, tokenizer, recipe, out_dir, done)
    log({"stage_done": 2, "steps": done})
    log({"done": True, "minutes": round((time.time() - started) / 60, 1)})
    if log_file:
        log_file.close()
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    defaults = Recipe()
    p = argparse.ArgumentParser(
        prog="python -m collab.training.train_tiny",
        description="Train the embedded tiny LLaVA from scratch on synthetic fine-detail VQA (seeded; CPU by default, "
                    "--device cuda --amp-dtype bfloat16 --workers N --scene-reuse K on a GPU).",
    )
    p.add_argument("--out", default="models/collab-tiny-llava", help="output directory (default: %(default)s)")
    p.add_argument("--log", help="JSONL file for training metrics (default: OUT/training_log.jsonl)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--pretrain-lr", type=float, default=defaults.pretrain_lr, help="stage 1 learning rate")
    p.add_argument("--image-size", type=int, default=defaults.spec.image_size,
                   help="vision tower input side in px (patch %d px); the shipped model uses %%(default)s" % defaults.spec.patch_size)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch threads for the training process")
    p.add_argument("--workers", type=int, default=defaults.workers, help="data-rendering worker processes")
    p.add_argument("--init-tower", help="start stage 2 from this stage-1 tower checkpoint, or the tower of this saved "
                   "model directory (skips stage 1)")
    p.add_argument("--pretrain-only", action="store_true", help="run stage 1 only and save the tower checkpoint")
    p.add_argument("--init-model", help="continue stage 2 from a saved model directory (skips stage 1); "
                   "with --init-tower, that tower replaces the saved one")
    p.add_argument("--continue-tower", action="store_true", help="with --init-tower: run --pretrain-steps more of stage 1 on it first")
    p.add_argument("--dense-weight", type=float, default=defaults.dense_weight, help="stage 1: weight of the per-patch colour/shape loss")
    p.add_argument("--patch-position-weight", type=float, default=defaults.patch_position_weight,
                   help="stage 1: weight of a per-patch loss on each global-image token's own row and column "
                        "(so that a token's content says where it is) (default: %(default)s)")
    p.add_argument("--tower-global-fraction", type=float, default=None,
                   help="stage 1: share of global images per batch (default 1/4; 1.0 = globals only: local semantics)")
    p.add_argument("--small-scene-fraction", type=float, default=defaults.small_scene_fraction,
                   help="stage 2: fraction of global-only examples drawn from small originals (digit legible)")
    p.add_argument("--curriculum-offset", type=int, default=0, help="start the objects-per-scene curriculum at this step")
    p.add_argument("--local-fraction", type=float, default=defaults.local_fraction,
                   help="stage 2: share of global + local batches (the rest are global-only) (default: %(default)s)")
    p.add_argument("--fine-fraction", type=float, default=defaults.fine_fraction,
                   help="stage 2: share of fine (digit) questions (default: %(default)s)")
    p.add_argument("--position-fraction", type=float, default=defaults.position_fraction,
                   help="stage 2: share of global-only examples that ask the training-only \"where is the red circle?\" "
                        "(answer: one of nine compass cells; rewards looking at the named object) (default: %(default)s)")
    p.add_argument("--pretrain-batch", type=int, default=defaults.pretrain_batch, help="stage 1 batch size")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--amp-dtype", default=defaults.amp_dtype, choices=["float32", "bfloat16"],
                   help="autocast dtype on the device; weights and the saved model stay float32 (default: %(default)s)")
    p.add_argument("--scene-reuse", type=int, default=defaults.scene_reuse,
                   help="examples drawn from each rendered scene; > 1 feeds a GPU faster (default: %(default)s)")
    p.add_argument("--pretrain-budget-s", type=float, default=None,
                   help="stage 1 wall-clock budget: stop at --pretrain-steps or after this many seconds")
    p.add_argument("--budget-s", type=float, default=None, help="stage 2 wall-clock budget, likewise with --steps")
    args = p.parse_args(argv)
    recipe = Recipe(
        seed=args.seed, pretrain_steps=args.pretrain_steps, steps=args.steps, batch=args.batch, lr=args.lr,
        eval_every=args.eval_every, threads=args.threads, workers=args.workers, curriculum_offset=args.curriculum_offset,
        dense_weight=args.dense_weight, small_scene_fraction=args.small_scene_fraction,
        patch_position_weight=args.patch_position_weight,
        tower_global_fraction=args.tower_global_fraction, pretrain_lr=args.pretrain_lr,
        pretrain_batch=args.pretrain_batch, device=args.device, amp_dtype=args.amp_dtype, scene_reuse=args.scene_reuse,
        pretrain_budget_s=args.pretrain_budget_s, budget_s=args.budget_s,
        local_fraction=args.local_fraction, fine_fraction=args.fine_fraction, position_fraction=args.position_fraction,
    )
    if recipe.tower_global_fraction is not None and not 0.0 <= recipe.tower_global_fraction <= 1.0:
        p.error("--tower-global-fraction must be in [0, 1]")
    if recipe.scene_reuse < 1:
        p.error("--scene-reuse must be >= 1")
    if recipe.patch_position_weight < 0:
        p.error("--patch-position-weight must be >= 0")
    if recipe.patch_position_weight and (args.init_model or (args.init_tower and not args.continue_tower)):
        p.error("--patch-position-weight is a stage-1 loss: stage 1 does not run with --init-model, or with "
                "--init-tower unless --continue-tower")
    for name in ("small_scene_fraction", "local_fraction", "fine_fraction", "position_fraction"):
        if not 0.0 <= getattr(recipe, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    for name in ("pretrain_budget_s", "budget_s"):
        if getattr(recipe, name) is not None and getattr(recipe, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    try:
        resolve_device(recipe.device)
    except (ValueError, RuntimeError) as e:
        p.error(f"--device: {e}")
    if args.image_size % recipe.spec.patch_size:
        p.error(f"--image-size must be a multiple of the patch size {recipe.spec.patch_size}")
    tokens = (args.image_size // recipe.spec.patch_size) ** 2
    recipe.spec = replace(recipe.spec, image_size=args.image_size,
                          max_positions=max(recipe.spec.max_positions, 2 * tokens + 64))  # refine: 2 images + text
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train(recipe, out, Path(args.log) if args.log else out / "training_log.jsonl",
          Path(args.init_tower) if args.init_tower else None, args.pretrain_only,
          Path(args.init_model) if args.init_model else None, args.continue_tower)
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
