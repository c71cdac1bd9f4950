"""RefinedDecoder: answer again from global + local visual tokens."""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from collab import stages
from deployments import metrics
from deployments.args import AppArgs
from deployments.common import load_model


@serve.deployment  # options: serve_config.yaml `deployments:`
class RefinedDecoder:
    def __init__(self, args: AppArgs):
        self.config, self.backend = load_model(args)

    def _run(self, global_features: torch.Tensor, local_features: torch.Tensor, question: str) -> stages.StageAnswer:
        timings: dict[str, float] = {}
        with metrics.timed("refine", timings):
            gen = stages.refined_pass(self.backend, global_features, local_features, question)
        return stages.StageAnswer(gen.answer, gen.token_ids, timings)

    async def run(
        self, global_features: torch.Tensor, local_features: torch.Tensor, question: str
    ) -> stages.StageAnswer:
        return await asyncio.to_thread(self._run, global_features, local_features, question)
