"""Stage 1: pre-train the vision tower on labels of the scenes it sees, before any decoder.

Real VLMs start from a pre-trained encoder; ours learns from plain labels: for crops, the digit,
colour and shape of the object the crop is about; for global images, which colours and shapes are
present, how many objects there are, and the colour and shape of the object under each patch and of
each object from its own tokens pooled, and on scenes drawn with legible digits each object's digit
(real towers come with local semantics; ours must learn them, and the first pass can only find "the
red circle" if the tokens over it say red and circle). No attention or box is supervised.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from collab.data.synthetic import COLORS, MAX_OBJECTS, SHAPES, object_mask, render_scene
from collab.imaging import crop_local_image, make_global_image, round_trip
from collab.progress import progress
from collab.roi import box_around
from collab.training.data import BatchSpec, to_pixels
from collab.training.loop import (
    CosineSchedule,
    TimedBatches,
    autocast,
    lookahead,
    make_loader,
    scheduled_batches,
    worker_shard,
)
from collab.training.recipe import Recipe

COLOR_NAMES = list(COLORS)
IGNORE = -100  # cross-entropy's ignore_index: no digit label where the digit is not legible


class TowerHeads(torch.nn.Module):
    """Linear heads on visual features (pooled for image labels, per patch for dense ones)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.digit = torch.nn.Linear(hidden, 10)
        self.color = torch.nn.Linear(hidden, len(COLOR_NAMES))
        self.shape = torch.nn.Linear(hidden, len(SHAPES))
        self.present = torch.nn.Linear(hidden, len(COLOR_NAMES) + len(SHAPES))
        self.count = torch.nn.Linear(hidden, MAX_OBJECTS)
        self.patch_color = torch.nn.Linear(hidden, len(COLOR_NAMES) + 1)  # last class: background
        self.patch_shape = torch.nn.Linear(hidden, len(SHAPES) + 1)
        self.object_color = torch.nn.Linear(hidden, len(COLOR_NAMES))  # on an object's own tokens, pooled
        self.object_shape = torch.nn.Linear(hidden, len(SHAPES))
        self.object_digit = torch.nn.Linear(hidden, 10)  # only where the digit is legible globally


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Per-patch visual features (B, patches, hidden): exactly the tokens the projector receives."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return hidden


def object_cells(box, width: int, height: int, grid: int) -> np.ndarray:
    """0/1 mask (grid * grid, row-major) of the patches of the stretched global image whose centres
    lie inside `box` (original pixels): the object's own tokens, as collab.eval.probe pools them."""
    centres = (np.arange(grid) + 0.5) / grid
    xs, ys = centres * width, centres * height
    inside_x = (xs >= box[0]) & (xs < box[2])
    inside_y = (ys >= box[1]) & (ys < box[3])
    mask = (inside_y[:, None] & inside_x[None, :]).astype(np.float32).ravel()
    if not mask.any():  # an object smaller than a cell: the cell under its centre
        c = min(int((box[0] + box[2]) / 2 / width * grid), grid - 1)
        r = min(int((box[1] + box[3]) / 2 / height * grid), grid - 1)
        mask[r * grid + c] = 1.0
    return mask


def patch_labels(scene, grid: int, min_cover: float = 0.2) -> tuple[list[int], list[int]]:
    """Colour and shape of the object covering most of each patch of the (resized) global image,
    or background where no object covers `min_cover` of it. Row-major, grid x grid."""
    coverage = []
    for obj in scene.objects:
        mask = object_mask(obj, scene.image.size)
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
    """Crops start tight on the glyph and zoom out as the tower learns to read.

    A ViT from scratch does not find a 2-patch glyph in a 144-patch image by itself; the largest
    crop scale grows by `step` whenever recent crop-digit accuracy passes `promote_at`, up to
    RoI-sized crops. The trainer publishes the scale after each of its `steps` steps in shared
    memory, and batch k is drawn at the scale published after step k - `lag` (a worker that gets
    there first waits), so a part's batches depend on its steps, not on how fast they ran. With
    `lag` = the data loader's look-ahead + 1 (`loop.lookahead`) the scale a worker needs is always
    published by the time it is asked for the batch, so nobody waits; a smaller lag is still
    correct, only slower.
    """

    def __init__(
        self,
        start: float = 2.5,
        end: float = 16.0,
        step: float = 1.0,
        promote_at: float = 0.6,
        window: int = 20,
        steps: int = 1,
        lag: int = 1,
    ):
        if lag < 1 or steps < 1:
            raise ValueError(f"lag and steps must be >= 1, got {lag}, {steps}")
        self.start, self.value = start, start
        self.end, self.step, self.promote_at, self.window, self.lag = end, step, promote_at, window, lag
        self.recent: list[float] = []
        self.published = mp.Array("d", [math.nan] * steps, lock=False)

    @property
    def moves(self) -> bool:
        return self.end > self.start

    def update(self, accuracy: float) -> None:
        """The trainer's side: one step's crop-digit accuracy."""
        self.recent.append(accuracy)
        if len(self.recent) >= self.window:
            if np.mean(self.recent) >= self.promote_at and self.value < self.end:
                self.value = min(self.end, self.value + self.step)
            self.recent.clear()

    def publish(self, step: int) -> None:
        """The trainer's side: the scale in force once `step` is done."""
        if step < len(self.published):
            self.published[step] = self.value

    def close(self) -> None:
        """The trainer stopped (steps or budget done): release any worker still waiting."""
        for k in range(len(self.published)):
            if math.isnan(self.published[k]):
                self.published[k] = self.value

    def scale_for(self, batch: int) -> float:
        """The workers' side: the largest crop scale of batch number `batch`."""
        k = min(batch - self.lag, len(self.published) - 1)
        if not self.moves or k < 0:
            return self.start
        while math.isnan(value := self.published[k]):
            time.sleep(0.001)
        return value


def tower_batch(
    rng: np.random.Generator,
    spec: BatchSpec,
    n: int,
    max_scale: float,
    global_fraction: float,
    scene_reuse: int = 1,
    legible_fraction: float = 0.0,
) -> dict:
    """round(n * global_fraction) global images (presence, count, per-patch colour and shape; with
    probability legible_fraction drawn with legible digits, each object's digit), the rest crops
    (digit, colour, shape of the crop's object).

    Crop side = glyph height x s, s uniform in [2, max_scale], centre jittered by 10% of the side.
    `scene_reuse` > 1 takes up to that many crops from each rendered scene (of different objects).
    """
    n_global = round(n * global_fraction)
    size = (spec.image_size, spec.image_size)
    crops, crop_labels, globals_, global_labels, dense = [], [], [], [], []
    objects = []  # (global image index, cell mask, colour, shape, digit or -100) of every object in the global images
    grid = spec.image_size // spec.patch_size
    scene, uses, cropped = None, scene_reuse, []
    for i in range(n):
        is_global = i < n_global
        if is_global or uses >= scene_reuse:
            legible = is_global and legible_fraction > 0 and rng.random() < legible_fraction
            scene = render_scene(rng, n_objects=int(rng.integers(1, MAX_OBJECTS + 1)), legible_glyphs=legible)
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
            crops.append(round_trip(crop_local_image(scene.image, box, size), "jpeg", spec.jpeg_quality))
            crop_labels.append((int(obj.digit), COLOR_NAMES.index(obj.color), SHAPES.index(obj.shape)))
        else:
            globals_.append(round_trip(make_global_image(scene.image, size)[0], "jpeg", spec.jpeg_quality))
            present = torch.zeros(len(COLOR_NAMES) + len(SHAPES))
            for o in scene.objects:
                present[COLOR_NAMES.index(o.color)] = 1
                present[len(COLOR_NAMES) + SHAPES.index(o.shape)] = 1
            global_labels.append((present, len(scene.objects) - 1))
            dense.append(patch_labels(scene, grid))
            for o in scene.objects:
                objects.append(
                    (
                        len(globals_) - 1,
                        object_cells(o.box, scene.width, scene.height, grid),
                        COLOR_NAMES.index(o.color),
                        SHAPES.index(o.shape),
                        int(o.digit) if scene.legible_glyphs else IGNORE,
                    )
                )
    empty = torch.zeros(0, 3, spec.image_size, spec.image_size)
    return {
        "crops": to_pixels(crops, spec.image_mean, spec.image_std) if crops else empty,
        "crop_labels": torch.tensor(crop_labels, dtype=torch.long).reshape(-1, 3),
        "globals": to_pixels(globals_, spec.image_mean, spec.image_std) if globals_ else empty,
        "present": torch.stack([p for p, _ in global_labels])
        if global_labels
        else torch.zeros(0, len(COLOR_NAMES) + len(SHAPES)),
        "count": torch.tensor([c for _, c in global_labels], dtype=torch.long),
        "patch_color": torch.tensor([c for c, _ in dense], dtype=torch.long).reshape(len(dense), grid * grid),
        "patch_shape": torch.tensor([s for _, s in dense], dtype=torch.long).reshape(len(dense), grid * grid),
        "object_image": torch.tensor([o[0] for o in objects], dtype=torch.long),
        "object_cells": torch.from_numpy(np.stack([o[1] for o in objects])) if objects else torch.zeros(0, grid * grid),
        "object_color": torch.tensor([o[2] for o in objects], dtype=torch.long),
        "object_shape": torch.tensor([o[3] for o in objects], dtype=torch.long),
        "object_digit": torch.tensor([o[4] for o in objects], dtype=torch.long),
        "max_scale": max_scale,
    }


class TowerStream(torch.utils.data.IterableDataset):
    """Stage-1 batches, rendered in worker processes."""

    def __init__(
        self,
        spec: BatchSpec,
        batch: int,
        seed: int,
        curriculum: ScaleCurriculum,
        global_fraction: float,
        scene_reuse: int = 1,
        legible_fraction: float = 0.0,
    ):
        super().__init__()
        self.spec, self.batch, self.seed, self.curriculum = spec, batch, seed, curriculum
        self.global_fraction, self.scene_reuse, self.legible_fraction = global_fraction, scene_reuse, legible_fraction

    def __iter__(self):
        worker, workers = worker_shard()
        step = worker
        while True:
            yield tower_batch(
                np.random.default_rng([self.seed, 1, step]),
                self.spec,
                self.batch,
                self.curriculum.scale_for(step),
                self.global_fraction,
                self.scene_reuse,
                self.legible_fraction,
            )
            step += workers


def train_tower(model, spec: BatchSpec, recipe: Recipe, log, part: int = 0) -> int:
    """Stage 1 (of the recipe's part number `part`) on `model`'s vision tower, with fresh heads;
    returns the number of steps run."""
    stage, runtime = recipe.tower, recipe.runtime
    device = next(model.parameters()).device
    heads = TowerHeads(recipe.model.vision_hidden).to(device)
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    sched = CosineSchedule(opt, stage.warmup, stage.steps, stage.budget_s)
    model.train()
    curriculum = ScaleCurriculum(
        start=stage.scale_start, end=stage.scale_end, steps=stage.steps, lag=lookahead(runtime.workers) + 1
    )
    stream = TowerStream(
        spec, stage.batch, recipe.seed, curriculum, stage.global_fraction, runtime.scene_reuse, stage.legible_fraction
    )
    loader = TimedBatches(make_loader(stream, runtime.workers, device))
    bar = progress(total=stage.steps, desc="stage 1: vision tower" + (f", continuation {part}" if part else ""))
    tag = {"part": part} if part else {}
    # objects cover a minority of the patches: down-weight background or it is all the tower learns
    color_w = torch.ones(len(COLOR_NAMES) + 1, device=device)
    shape_w = torch.ones(len(SHAPES) + 1, device=device)
    color_w[-1] = shape_w[-1] = stage.background_weight
    step, row = -1, None
    try:  # a worker waiting on a scale must be released however the loop ends
        for step, b in scheduled_batches(loader, sched, device):
            loss = torch.zeros((), device=device)
            acc = color_acc = shape_acc = object_shape_acc = object_digit_acc = float("nan")
            with autocast(device, runtime.amp_dtype):
                if len(b["crops"]):
                    fc = patch_features(model, b["crops"]).float().mean(1)
                    digit, color, shape = b["crop_labels"].T
                    loss = (
                        loss
                        + 2.0 * F.cross_entropy(heads.digit(fc), digit)
                        + F.cross_entropy(heads.color(fc), color)
                        + F.cross_entropy(heads.shape(fc), shape)
                    )  # reading the glyph is the hard part: weight 2
                if len(b["globals"]):
                    pg = patch_features(model, b["globals"]).float()
                    fg = pg.mean(1)
                    loss = (
                        loss
                        + F.binary_cross_entropy_with_logits(heads.present(fg), b["present"])
                        + F.cross_entropy(heads.count(fg), b["count"])
                    )
                    dense = F.cross_entropy(
                        heads.patch_color(pg).flatten(0, 1), b["patch_color"].flatten(), weight=color_w
                    ) + F.cross_entropy(heads.patch_shape(pg).flatten(0, 1), b["patch_shape"].flatten(), weight=shape_w)
                    loss = loss + stage.dense_weight * dense
                    # each object's own tokens, pooled (what the decoder's attention to the object reads
                    # and what collab.eval.probe measures): colour and shape
                    cells = b["object_cells"]
                    pooled = (cells[:, :, None] * pg[b["object_image"]]).sum(1) / cells.sum(1, keepdim=True)
                    loss = loss + stage.object_weight * (
                        F.cross_entropy(heads.object_color(pooled), b["object_color"])
                        + F.cross_entropy(heads.object_shape(pooled), b["object_shape"])
                    )
                    legible = b["object_digit"] != IGNORE
                    if legible.any():  # digits legible in this global image: each object's own tokens read its digit
                        loss = loss + stage.object_weight * F.cross_entropy(
                            heads.object_digit(pooled[legible]), b["object_digit"][legible]
                        )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            bar.update(1)
            with torch.no_grad():
                if len(b["crops"]):
                    acc = (heads.digit(fc).argmax(-1) == digit).float().mean().item()
                    curriculum.update(acc)
                if len(b["globals"]):
                    on_object = b["patch_color"] < len(COLOR_NAMES)
                    color_acc = (heads.patch_color(pg).argmax(-1) == b["patch_color"])[on_object].float().mean().item()
                    shape_acc = (heads.patch_shape(pg).argmax(-1) == b["patch_shape"])[on_object].float().mean().item()
                    object_shape_acc = (
                        (heads.object_shape(pooled).argmax(-1) == b["object_shape"]).float().mean().item()
                    )
                    if legible.any():
                        object_digit_acc = (
                            (heads.object_digit(pooled[legible]).argmax(-1) == b["object_digit"][legible])
                            .float()
                            .mean()
                            .item()
                        )
            curriculum.publish(step)
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                digit=f"{acc:.2f}",
                color=f"{color_acc:.2f}",
                shape=f"{shape_acc:.2f}",
                obj_shape=f"{object_shape_acc:.2f}",
                obj_digit=f"{object_digit_acc:.2f}",
                scale=f"{b['max_scale']:.1f}",
            )
            row = {
                "stage": 1,
                **tag,
                "step": step,
                "loss": loss.item(),
                "crop_digit_acc": acc,
                "object_patch_color_acc": color_acc,
                "object_patch_shape_acc": shape_acc,
                "object_shape_acc": object_shape_acc,
                "legible_object_digit_acc": object_digit_acc,
                "max_scale": b["max_scale"],
                "lr": opt.param_groups[0]["lr"],
                "data_wait_s": round(loader.wait_s, 1),
            }
            if step % 50 == 0:
                log(row)
                row = None
    finally:
        curriculum.close()
        bar.close()
    if row is not None:  # the last step, unless it was just logged
        log(row)
    log({"stage_done": 1, **tag, "steps": step + 1})
    return step + 1
