"""Stage 2: the whole LLaVA on plain answers (nothing supervises attention or boxes).

Global-only batches (fine questions there teach the model to be unsure; on scenes drawn with
legible digits they reward looking at the object the question names) and global + local batches
(crops of the original around the question's object at the RoI search's sizes, jittered, with
hard negatives), with a curriculum on objects per scene. The stage-1 tower stays frozen unless
the recipe gives it a learning rate, and then for its first `freeze_tower_steps`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from collab.progress import progress
from collab.training.data import BatchSpec, BatchStream, answer_loss
from collab.training.loop import CosineSchedule, TimedBatches, autocast, make_loader, scheduled_batches
from collab.training.monitor import answer_metrics, localisation_metrics, monitor_items
from collab.training.recipe import Recipe


def train_vlm(model, tokenizer, spec: BatchSpec, recipe: Recipe, out_dir: Path, log, part: int = 0) -> int:
    """Stage 2 (or its continuation number `part`) on `model`; saves a checkpoint at every
    evaluation and at the end. Returns steps run."""
    from collab.training.train import save_checkpoint

    stage, runtime = recipe.vlm, recipe.runtime
    device = next(model.parameters()).device
    stream = BatchStream(
        spec,
        tokenizer,
        stage.batch,
        recipe.seed,
        [list(c) for c in stage.curriculum],
        stage.local_fraction,
        scene_reuse=runtime.scene_reuse,
        global_objects=stage.global_objects,
    )
    loader = TimedBatches(make_loader(stream, runtime.workers, device))
    tower = list(model.model.vision_tower.parameters())
    tower_ids = {id(p) for p in tower}
    rest = [p for p in model.parameters() if id(p) not in tower_ids]
    groups = [{"params": rest, "lr": stage.lr}]
    if stage.tower_lr_scale > 0:
        groups.append({"params": tower, "lr": stage.lr * stage.tower_lr_scale})
    else:
        for p in tower:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=stage.weight_decay)
    sched = CosineSchedule(opt, stage.warmup, stage.steps, stage.budget_s)
    items = monitor_items(recipe)
    total = stage.steps if stage.stop_after is None else min(stage.steps, stage.stop_after)
    bar = progress(total=total, desc="stage 2: VLM" + (f", continuation {part}" if part else ""))
    tag = {"part": part} if part else {}
    maps_dir = out_dir / "monitor" / (f"part{part}" if part else "")
    ema = None

    def evaluate(step: int) -> None:  # step: steps done
        model.eval()
        t = time.monotonic()
        metrics = answer_metrics(model, tokenizer, spec, recipe)
        metrics |= localisation_metrics(model, tokenizer, recipe, items, maps_dir / f"maps_{step:06d}.png")
        model.train()
        log(
            {
                "stage": 2,
                **tag,
                "step": step,
                "loss_ema": ema,
                "lr": opt.param_groups[0]["lr"],
                "data_wait_s": round(loader.wait_s, 1),
                "eval_s": round(time.monotonic() - t, 1),
                **metrics,
            }
        )
        best = max((k for k in metrics if k.endswith("_hit")), key=metrics.get, default=None)
        bar.write(
            f"step {step}: "
            + " ".join(f"{k}={metrics[k]:.2f}" for k in sorted(metrics) if "_acc" in k or "_gap" in k)
            + (
                f" | best RoI {best}={metrics[best]:.2f} (2 obj {metrics[best + '2']:.2f}, some "
                f"{metrics[best[:-4] + '_some']:.2f})"
                if best
                else ""
            )
        )
        save_checkpoint(model, tokenizer, recipe, out_dir, step, part)

    model.train()
    step = -1
    for step, batch in scheduled_batches(loader, sched, device, stage.stop_after):
        if stage.tower_lr_scale > 0:
            for p in tower:  # no backward through a frozen tower: those steps are cheaper
                p.requires_grad_(step >= stage.freeze_tower_steps)
        with autocast(device, runtime.amp_dtype):
            loss, _, _ = answer_loss(model, batch, stage.eos_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", objs=stream.max_objects(step))
        if (step + 1) % recipe.monitor.every == 0:
            evaluate(step + 1)  # labelled with the number of steps done
    bar.close()
    done = step + 1
    if done and done % recipe.monitor.every:
        evaluate(done)  # where the step count or the budget ended the stage
    elif not done:
        save_checkpoint(model, tokenizer, recipe, out_dir, 0, part)
    log({"stage_done": 2, **tag, "steps": done})
    return done
