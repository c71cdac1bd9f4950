"""FirstPassDecoder: answer from the global tokens, gate on uncertainty, read attention if unsure."""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from collab import stages
from collab.policies import PolicySpec
from deployments import metrics
from deployments.args import AppArgs
from deployments.common import load_model


@serve.deployment  # options: serve_config.yaml `deployments:`
class FirstPassDecoder:
    def __init__(self, args: AppArgs):
        self.config, self.backend = load_model(args)

    def _run(self, features: torch.Tensor, question: str, policy: PolicySpec, key: str) -> stages.GatedAnswer:
        out = stages.GatedAnswer(answer="", token_ids=[])
        with metrics.timed("first_pass", out.timings_ms):
            first = stages.first_pass(self.backend, features, question, policy, key)
        gen = first.generation
        out.answer, out.token_ids = gen.answer, gen.token_ids
        out.uncertainty, out.uncertainties, out.refine = first.uncertainty, first.uncertainties, first.refine
        gate = metrics.gate()
        gate.decisions.inc(tags={"policy": policy.name, "decision": "refine" if first.refine else "answer"})
        if first.uncertainty is not None:
            gate.score.observe(first.uncertainty, tags={"policy": policy.name})
        if first.refine:  # attention only when the gate fires: it costs two more forward passes
            with metrics.timed("attention", out.timings_ms):
                answer_ids = gen.token_ids[: gen.n_answer_tokens]
                out.attention = stages.attention_map(
                    self.backend, features, question, answer_ids, self.config.attention
                )
        return out

    async def run(self, features: torch.Tensor, question: str, policy: PolicySpec, key: str) -> stages.GatedAnswer:
        return await asyncio.to_thread(self._run, features, question, policy, key)
