"""What both training stages share: device, autocast, data loading, the learning-rate schedule."""

from __future__ import annotations

import math
import time

import torch


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


def worker_shard() -> tuple[int, int]:
    """(this DataLoader worker's index, number of workers); (0, 1) in the main process. Streams give
    batch k to worker k mod n and the DataLoader returns batches in task order, so stage 2's batch
    sequence is the same for any number of workers. (Stage 1's crop scale follows the trainer's
    accuracy `lookahead(workers) + 1` steps back, so its batches depend on the number of workers
    where the scale moves, never on timing.)"""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


PREFETCH = 2  # batches each worker renders ahead


def lookahead(workers: int) -> int:
    """How many batches past the one being trained on the loader may already be rendering: the
    DataLoader asks for batch j + workers x PREFETCH when the trainer takes batch j."""
    return workers * PREFETCH


def make_loader(stream, workers: int, device: torch.device):
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=PREFETCH if workers else None,
        pin_memory=device.type == "cuda",
    )


class TimedBatches:
    """Batches from a loader, with the seconds spent waiting for them (`wait_s`): tells a run held
    up by rendering from one held up by compute (each step syncs on a loss value)."""

    def __init__(self, loader):
        self.batches, self.wait_s = iter(loader), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.monotonic()
        batch = next(self.batches)
        self.wait_s += time.monotonic() - t
        return batch


class CosineSchedule:
    """Linear warm-up over `warmup` steps, then cosine from the base learning rates to 10 % of them.

    Progress is steps over `total` or, with a wall-clock `budget_s`, elapsed over budget, whichever
    is further; `finished` says when either runs out."""

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


def scheduled_batches(loader, sched: CosineSchedule, device: torch.device, stop_after: int | None = None):
    """(step, batch on the device) with the learning rates set for that step, until the schedule's
    steps or time budget run out (or `stop_after` steps, mid-schedule)."""
    for step, batch in enumerate(loader):
        if sched.finished(step) or (stop_after is not None and step >= stop_after):
            return
        sched.set(step)
        yield step, to_device(batch, device)
