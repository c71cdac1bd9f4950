"""FirstPassDecoder: answer from the global tokens, gate on uncertainty, read attention if unsure."""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from collab import stages
from collab.policies import PolicySpec
from deployments.args import AppArgs
from deployments import metrics
from deployments.common import load_model


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class FirstPassDecoder:
    def __init__(self, args: AppArgs):
        self.config, self.backend = load_model(args)

    def _run(self, features: torch.Tensor, question: str, policy: dict, key: str) -> dict:
        start = time.perf_counter()
        first = stages.first_pass(self.backend, features, question, PolicySpec(**policy), key)
        gen = first.generation
        out = {
            "answer": gen.answer,
            "uncertainty": first.uncertainty,
            "uncertainties": first.uncertainties,
            "refine": first.refine,
            "token_ids": gen.token_ids,
            "timings_ms": {"first_pass": (time.perf_counter() - start) * 1000},
        }
        gate = metrics.gate()
        gate.decisions.inc(tags={"policy": policy["name"], "decision": "refine" if first.refine else "answer"})
        if first.uncertainty is not None:
            gate.score.observe(first.uncertainty, tags={"policy": policy["name"]})
        metrics.stage_latency().observe(out["timings_ms"]["first_pass"], tags={"stage": "first_pass"})
        if first.refine:  # attention only when the gate fires: it costs two more forward passes
            start = time.perf_counter()
            answer_ids = gen.token_ids[: gen.n_answer_tokens]
            out["attention"] = stages.attention_map(self.backend, features, question, answer_ids, self.config.attention)
            out["timings_ms"]["attention"] = (time.perf_counter() - start) * 1000
            metrics.stage_latency().observe(out["timings_ms"]["attention"], tags={"stage": "attention"})
        return out

    async def run(self, features: torch.Tensor, question: str, policy: dict, key: str) -> dict:
        return await asyncio.to_thread(self._run, features, question, policy, key)
