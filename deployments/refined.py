"""RefinedDecoder: answer again from global + local visual tokens."""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from collab import stages
from deployments.args import AppArgs
from deployments import metrics
from deployments.common import load_model


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class RefinedDecoder:
    def __init__(self, args: AppArgs):
        self.config, self.backend = load_model(args)

    def _run(self, global_features: torch.Tensor, local_features: torch.Tensor, question: str) -> dict:
        start = time.perf_counter()
        gen = stages.refined_pass(self.backend, global_features, local_features, question)
        elapsed = (time.perf_counter() - start) * 1000
        metrics.stage_latency().observe(elapsed, tags={"stage": "refine"})
        return {"answer": gen.answer, "token_ids": gen.token_ids, "timings_ms": {"refine": elapsed}}

    async def run(self, global_features: torch.Tensor, local_features: torch.Tensor, question: str) -> dict:
        return await asyncio.to_thread(self._run, global_features, local_features, question)
