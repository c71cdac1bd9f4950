"""The whole two-stage protocol in one process, edge side included: the correctness oracle.

Edge: make the global image, encode it (real bytes). Server: decode those bytes, encode, first
pass, gate. If the gate fires: relative attention, RoI search, and the edge crops the ORIGINAL,
encodes the local image; the server decodes it, encodes, and answers from both. Each query yields
one `QueryRecord` with both stages' answers, scores, the box, the bytes and the time per stage.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from collab import stages
from collab.backends.base import VLMBackend
from collab.config import CollabConfig
from collab.imaging import decode_image, global_payload, load_image, local_payload
from collab.policies import PolicySpec


@dataclass
class QueryRecord:
    """Everything one query did, JSON-serialisable via `to_dict()`."""

    question_id: str
    question: str
    policy: str
    score_kind: str
    threshold: float
    answer: str  # final answer returned to the edge
    stage: int  # 1 = answered from the global image, 2 = refined
    first_answer: str
    refined_answer: str | None
    uncertainty: float  # the gate's score (higher = more unsure)
    uncertainties: dict[str, float]  # every score kind, aggregated
    refined: bool  # the gate's decision
    box: list[int] | None  # RoI in original pixels [x0, y0, x1, y1]
    roi_ratio: float | None
    original_size: tuple[int, int]
    global_bytes: int
    local_bytes: int
    first_token_ids: list[int]
    times_ms: dict[str, float] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.global_bytes + self.local_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        return out


class _Timer:
    """Wall-clock ms per named step; `sync` (the backend's) closes each step on accelerators."""

    def __init__(self, sync=lambda: None) -> None:
        self.ms: dict[str, float] = {}
        self.sync = sync

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
            self.sync()
        finally:
            self.ms[name] = (time.perf_counter() - start) * 1000.0


class ReferencePipeline:
    """Runs queries through edge and server in-process with one backend and one config."""

    def __init__(self, backend: VLMBackend, config: CollabConfig):
        stages.check_attention_fits(config.attention, backend.info)
        self.backend = backend
        self.config = config

    def policy(self, **overrides) -> PolicySpec:
        """The configured gate with per-query overrides (name=..., threshold=..., ...)."""
        return PolicySpec.from_gate(self.config.gate, **overrides)

    def run(
        self,
        image: Image.Image | str | Path | bytes,
        question: str,
        *,
        question_id: str | None = None,
        policy: PolicySpec | None = None,
    ) -> QueryRecord:
        spec = policy or self.policy()
        key = question_id if question_id is not None else question
        cfg, info, timer = self.config, self.backend.info, _Timer(self.backend.synchronize)
        original = load_image(image)

        with timer("edge_global"):
            im = cfg.imaging
            global_size = info.global_size(original.size)
            sent = global_payload(original, global_size, im.global_mode, im.format, im.jpeg_quality, im.pad_color)
        with timer("encode_global"):
            global_features = self.backend.encode_images([decode_image(sent.data)])[0]
        with timer("first_pass"):
            capture = stages.capture_layers(cfg.attention, [cfg.attention.layer])
            first = stages.first_pass(self.backend, global_features, question, spec, key, capture)

        gen = first.generation
        refined_answer, box, ratio, local_bytes = None, None, None, 0
        if first.refine:
            with timer("attention"):
                answer_ids = gen.token_ids[: gen.n_answer_tokens]
                att = stages.attention_map(
                    self.backend, global_features, question, answer_ids, cfg.attention, gen.attention
                )
            with timer("roi_search"):
                roi = stages.locate(
                    att, original.size, global_size, cfg.imaging.global_mode, cfg.roi, info.encoder_size
                )
            with timer("edge_local"):
                local = local_payload(original, roi.box, info.encoder_size, im.format, im.jpeg_quality)
            with timer("encode_local"):
                local_features = self.backend.encode_images([decode_image(local.data)])[0]
            with timer("refine"):
                refined = stages.refined_pass(self.backend, global_features, local_features, question)
            refined_answer, box, ratio, local_bytes = refined.answer, roi.box.as_list(), roi.ratio, local.nbytes

        return QueryRecord(
            question_id=str(key),
            question=question,
            policy=spec.name,
            score_kind=spec.score,
            threshold=spec.threshold,
            answer=refined_answer if refined_answer is not None else gen.answer,
            stage=2 if refined_answer is not None else 1,
            first_answer=gen.answer,
            refined_answer=refined_answer,
            uncertainty=first.uncertainty,
            uncertainties=first.uncertainties,
            refined=first.refine,
            box=box,
            roi_ratio=ratio,
            original_size=original.size,
            global_bytes=sent.nbytes,
            local_bytes=local_bytes,
            first_token_ids=gen.token_ids,
            times_ms=timer.ms,
        )
