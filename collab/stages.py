"""The server's steps of the protocol, as plain functions over a backend.

The in-process reference pipeline and the Serve deployments call these same functions, which is
what makes the pipeline a correctness oracle for the distributed DAG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from collab.attention import relative_attention
from collab.backends.base import Generation, VLMBackend
from collab.config import AttentionConfig, RoIConfig
from collab.geometry import CanvasGeometry, GlobalMode
from collab.policies import PolicySpec, should_refine
from collab.roi import RoIResult, search_roi
from collab.uncertainty import answer_uncertainties


@dataclass
class FirstPass:
    """First-pass answer, its uncertainty under every score kind, and the gate's decision."""

    generation: Generation
    uncertainties: dict[str, float]  # aggregated, higher = more unsure
    uncertainty: float  # the gate's score kind
    refine: bool


@dataclass
class StageAnswer:
    """A decoded answer as a serving stage hands it on across processes (no logits)."""

    answer: str
    token_ids: list[int]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class GatedAnswer(StageAnswer):
    """The first-pass stage's result: the answer, its scores, the gate's decision and, when the
    gate fires, the attention grid the RoI search reads."""

    uncertainty: float | None = None
    uncertainties: dict[str, float] = field(default_factory=dict)
    refine: bool = False
    attention: np.ndarray | None = None


@dataclass
class Located:
    """The RoI stage's result."""

    roi: RoIResult
    timings_ms: dict[str, float] = field(default_factory=dict)


def first_pass(
    backend: VLMBackend, global_features: torch.Tensor, question: str, spec: PolicySpec, key: str
) -> FirstPass:
    """Decode from the global tokens and gate on the aggregated uncertainty."""
    generation = backend.generate([global_features], question)
    scores = answer_uncertainties(generation.scores, generation.n_answer_tokens, spec.aggregation_length)
    value = scores[spec.score]
    return FirstPass(generation, scores, value, should_refine(spec, value, key))


def attention_map(
    backend: VLMBackend,
    global_features: torch.Tensor,
    question: str,
    answer_ids: list[int],
    cfg: AttentionConfig,
) -> np.ndarray:
    """The (relative) attention grid that the RoI search reads, at the configured layer."""
    return attention_maps(backend, global_features, question, answer_ids, cfg, [cfg.layer])[0]


def attention_maps(
    backend: VLMBackend,
    global_features: torch.Tensor,
    question: str,
    answer_ids: list[int],
    cfg: AttentionConfig,
    layers: list[int],
) -> list[np.ndarray]:
    """(Relative) attention grids at several layers from two forward passes (question, generic)."""
    rows_need_answer = cfg.query_rows != "last_input"
    question_maps = backend.attention_grids(
        global_features, question, answer_ids if rows_need_answer else [], layers, cfg.query_rows
    )
    if not cfg.relative:
        return question_maps
    generic_maps = backend.attention_grids(global_features, cfg.generic_prompt, [], layers, "last_input")
    return [relative_attention(q, g, cfg.epsilon) for q, g in zip(question_maps, generic_maps)]


def locate(
    attention: np.ndarray,
    original_size: tuple[int, int],
    encoder_size: tuple[int, int],
    global_mode: GlobalMode,
    cfg: RoIConfig,
) -> RoIResult:
    """RoI box in original pixels from an attention grid (CPU only, no model needed)."""
    geometry = CanvasGeometry.create(original_size, encoder_size, global_mode)
    return search_roi(attention, geometry, cfg.side_for(encoder_size), cfg.ratios)


def refined_pass(
    backend: VLMBackend, global_features: torch.Tensor, local_features: torch.Tensor, question: str
) -> Generation:
    """Answer again from global and local visual tokens together."""
    return backend.generate([global_features, local_features], question)
