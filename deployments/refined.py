"""RefinedDecoder: answer again from global + local visual tokens, concurrent requests decoded
together (`@serve.batch`: one batched decode per batch)."""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from collab import stages
from deployments import metrics
from deployments.args import AppArgs
from deployments.common import each_on_failure, load_model


@serve.deployment  # options: serve_config.yaml `deployments:`
class RefinedDecoder:
    def __init__(self, args: AppArgs):
        self.config, self.backend = load_model(args)
        self._batched.set_max_batch_size(args.decoder_batch.max_batch_size)
        self._batched.set_batch_wait_timeout_s(args.decoder_batch.batch_wait_timeout_s)

    def _run_batch(self, batch: list[tuple[torch.Tensor, torch.Tensor, str]]) -> list[stages.StageAnswer]:
        started = time.perf_counter()
        generations = stages.refined_passes(self.backend, batch)
        out = []
        for gen in generations:
            timings: dict[str, float] = {}
            metrics.record("refine", started, timings)
            out.append(stages.StageAnswer(gen.answer, gen.token_ids, timings))
        return out

    @serve.batch  # size and wait: AppArgs.decoder_batch, set in __init__
    async def _batched(self, global_features, local_features, questions) -> list[stages.StageAnswer | Exception]:
        batch = list(zip(global_features, local_features, questions))
        return await asyncio.to_thread(each_on_failure, self._run_batch, batch)

    async def run(
        self, global_features: torch.Tensor, local_features: torch.Tensor, question: str
    ) -> stages.StageAnswer:
        result = await self._batched(global_features, local_features, question)
        if isinstance(result, Exception):
            raise result
        return result
