"""FirstPassDecoder: answer from the global tokens, gate on uncertainty, read attention if unsure.

Concurrent requests are decoded together (`@serve.batch`: one batched decode per batch). The
question's attention map comes from that decode's prefill (`last_input` rows), so a request whose
gate fires costs one more pass, the generic prompt's, batched with the others that fired.
"""

from __future__ import annotations

import asyncio
import time

import torch
from ray import serve

from collab import stages
from collab.backends.base import InvalidQuestion
from collab.policies import PolicySpec
from deployments import metrics
from deployments.args import AppArgs
from deployments.common import each_on_failure, load_model


@serve.deployment  # options: serve_config.yaml `deployments:`
class FirstPassDecoder:
    def __init__(self, args: AppArgs):
        self.config, self.backend = load_model(args)
        self._batched.set_max_batch_size(args.decoder_batch.max_batch_size)
        self._batched.set_batch_wait_timeout_s(args.decoder_batch.batch_wait_timeout_s)

    def _run_batch(
        self, batch: list[tuple[torch.Tensor, str, PolicySpec, str]]
    ) -> list[stages.GatedAnswer | InvalidQuestion]:
        features, questions, policies, keys = (list(column) for column in zip(*batch))
        results: list[stages.GatedAnswer | InvalidQuestion] = []
        valid = []
        for i, question in enumerate(questions):  # one bad question must not fail its batch-mates
            try:
                self.backend.check_question(question)
            except InvalidQuestion as exc:
                results.append(exc)
                continue
            results.append(stages.GatedAnswer(answer="", token_ids=[]))
            valid.append(i)
        cfg = self.config.attention
        requests = [stages.FirstPassRequest(features[i], questions[i], policies[i], keys[i]) for i in valid]
        started = time.perf_counter()
        firsts = stages.first_passes(self.backend, requests, stages.capture_layers(cfg, [cfg.layer])) if valid else []
        for i, first in zip(valid, firsts):
            out, gen = results[i], first.generation
            metrics.record("first_pass", started, out.timings_ms)
            out.answer, out.token_ids = gen.answer, gen.token_ids
            out.uncertainty, out.uncertainties, out.refine = first.uncertainty, first.uncertainties, first.refine
        unsure = [(i, first.generation) for i, first in zip(valid, firsts) if first.refine]
        if unsure:  # attention only when the gate fires; the question's map came with the decode
            started = time.perf_counter()
            maps = stages.read_maps_batch(
                self.backend,
                [
                    stages.MapRequest(features[i], questions[i], g.token_ids[: g.n_answer_tokens], g.attention)
                    for i, g in unsure
                ],
                cfg,
            )
            for (i, _), grid in zip(unsure, maps):
                results[i].attention = grid
                metrics.record("attention", started, results[i].timings_ms)
        gate = metrics.gate()  # counted once the whole batch has succeeded (a failed one is rerun request by request)
        for i in valid:
            out = results[i]
            gate.decisions.inc(tags={"policy": policies[i].name, "decision": "refine" if out.refine else "answer"})
            if out.uncertainty is not None:
                gate.score.observe(out.uncertainty, tags={"policy": policies[i].name})
        return results

    @serve.batch  # size and wait: AppArgs.decoder_batch, set in __init__
    async def _batched(self, features, questions, policies, keys) -> list[stages.GatedAnswer | InvalidQuestion]:
        return await asyncio.to_thread(each_on_failure, self._run_batch, list(zip(features, questions, policies, keys)))

    async def run(self, features: torch.Tensor, question: str, policy: PolicySpec, key: str) -> stages.GatedAnswer:
        result = await self._batched(features, question, policy, key)
        if isinstance(result, Exception):
            raise result
        return result
