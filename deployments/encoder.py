"""VisionEncoder: image bytes -> visual tokens, dynamically batched across concurrent requests."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

import torch
from ray import serve

from collab.imaging import decode_image
from deployments import metrics
from deployments.args import AppArgs
from deployments.common import load_model


@serve.deployment  # options: serve_config.yaml `deployments:`
class VisionEncoder:
    def __init__(self, args: AppArgs):
        self.config, self.backend = load_model(args)
        self.encode.set_max_batch_size(args.encoder_batch.max_batch_size)
        self.encode.set_batch_wait_timeout_s(args.encoder_batch.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    def info(self) -> dict:
        return asdict(self.backend.info)

    def _encode(self, images: list[bytes]) -> list[torch.Tensor]:
        with metrics.timed("encode"):
            pixels = self.backend.preprocess([decode_image(b) for b in images])
            return [f.cpu() for f in self.backend.encode(pixels)]

    @serve.batch  # size and wait: AppArgs.encoder_batch, set in __init__
    async def encode(self, images: list[bytes]) -> list[torch.Tensor]:
        """Batched: one vision-tower pass for every request that arrived within the wait window."""
        self.batch_sizes.append(len(images))
        del self.batch_sizes[:-1000]
        return await asyncio.to_thread(self._encode, images)

    async def encode_unbatched(self, image: bytes) -> torch.Tensor:
        """One image per pass (the baseline of the batching benchmark)."""
        return (await asyncio.to_thread(self._encode, [image]))[0]

    def stats(self) -> dict:
        """Recent batch sizes (last 1,000 batches): how much dynamic batching is happening."""
        sizes = self.batch_sizes or [0]
        return {"batches": len(self.batch_sizes), "mean_batch_size": sum(sizes) / len(sizes)}
