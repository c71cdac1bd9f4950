"""The server's steps of the protocol, as plain functions over a backend.

The in-process reference pipeline and the Serve deployments call these same functions, which is
what makes the pipeline a correctness oracle for the distributed DAG. Each step takes a batch of
requests (one model pass for all of them); the single-request forms are batches of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from collab.attention import check_heads, combine_maps, relative_attention, resolve_layer
from collab.backends.base import AttentionRequest, BackendInfo, DecodeRequest, Generation, VLMBackend
from collab.config import AttentionConfig, ConfigError, RoIConfig
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


@dataclass
class FirstPassRequest:
    """One query's first pass: its global tokens, question, gate and key (the random policy's)."""

    features: torch.Tensor
    question: str
    spec: PolicySpec
    key: str


@dataclass
class MapRequest:
    """One attention read: the query's global tokens, question, first-pass answer ids, and the
    question maps its first pass captured, by layer (empty: none)."""

    features: torch.Tensor
    question: str
    answer_ids: Sequence[int]
    captured: dict[int, np.ndarray] = field(default_factory=dict)


def check_attention_fits(cfg: AttentionConfig, info: BackendInfo) -> None:
    """The attention layer and heads exist in the loaded model: a wrong one is a configuration
    error at start-up, not a failure of every query that asks for a crop."""
    try:
        resolve_layer(cfg.layer, info.num_layers)
        if cfg.heads is not None and info.num_heads is not None:
            check_heads(cfg.heads, info.num_heads)
        for layer, head in cfg.layer_heads or ():
            resolve_layer(layer, info.num_layers)
            if info.num_heads is not None:
                check_heads([head], info.num_heads)
    except ValueError as exc:
        raise ConfigError(f"attention: {exc} ({info.model_name})") from exc


def prefill_captures(cfg: AttentionConfig) -> bool:
    """Whether a first pass's prefill can provide the question map: ViCrop's `last_input` row is
    the prefill's last row. The `answer` and `all` rows need the answer, and `question` rows every
    text row's map, hence a pass of their own; so do a head subset and a per-head reduction (the
    capture keeps the mean over heads)."""
    return cfg.query_rows == "last_input" and cfg.heads is None and not cfg.per_head


def capture_layers(cfg: AttentionConfig, layers: Sequence[int]) -> list[int]:
    """Layers whose question map the first pass's prefill records (none where it cannot)."""
    return list(layers) if prefill_captures(cfg) else []


def first_passes(
    backend: VLMBackend, requests: Sequence[FirstPassRequest], capture: Sequence[int] = ()
) -> list[FirstPass]:
    """Decode several first passes in one batch and gate each on its aggregated uncertainty.
    `capture`: layers whose question maps each generation also carries (Generation.attention)."""
    generations = backend.generate_batch([DecodeRequest([r.features], r.question, capture) for r in requests])
    out = []
    for r, generation in zip(requests, generations):
        scores = answer_uncertainties(generation.scores, generation.n_answer_tokens, r.spec.aggregation_length)
        value = scores[r.spec.score]
        out.append(FirstPass(generation, scores, value, should_refine(r.spec, value, r.key)))
    return out


def first_pass(
    backend: VLMBackend,
    global_features: torch.Tensor,
    question: str,
    spec: PolicySpec,
    key: str,
    capture: Sequence[int] = (),
) -> FirstPass:
    """Decode from the global tokens and gate on the aggregated uncertainty."""
    return first_passes(backend, [FirstPassRequest(global_features, question, spec, key)], capture)[0]


def attention_maps_batch(
    backend: VLMBackend, requests: Sequence[MapRequest], cfg: AttentionConfig, layers: Sequence[int]
) -> list[list[np.ndarray]]:
    """(Relative) attention grids at several layers for several queries: one batched pass for the
    questions whose maps were not captured, one for the generic prompt (which depends only on the image)."""
    if cfg.per_head:
        return _per_head_maps_batch(backend, requests, cfg, layers)
    missing = [
        i
        for i, r in enumerate(requests)
        if not prefill_captures(cfg) or not all(layer in r.captured for layer in layers)
    ]
    computed = backend.attention_grids_batch(
        _question_requests([requests[i] for i in missing], cfg),
        layers,
        cfg.query_rows,
        cfg.heads,
    )
    question_maps = {i: maps for i, maps in zip(missing, computed)}
    question_maps = [question_maps.get(i) or [r.captured[layer] for layer in layers] for i, r in enumerate(requests)]
    if not cfg.relative:
        return question_maps
    generic = backend.attention_grids_batch(
        [AttentionRequest(r.features, cfg.generic_prompt) for r in requests], layers, _generic_rows(cfg), cfg.heads
    )
    return [[relative_attention(q, g, cfg.epsilon) for q, g in zip(qs, gs)] for qs, gs in zip(question_maps, generic)]


def _question_requests(requests: Sequence[MapRequest], cfg: AttentionConfig) -> list[AttentionRequest]:
    """The question's attention reads; the answer is appended only where its rows are read."""
    with_answer = cfg.query_rows in ("answer", "all")
    return [AttentionRequest(r.features, r.question, r.answer_ids if with_answer else []) for r in requests]


def _generic_rows(cfg: AttentionConfig) -> str:
    """The generic prompt's rows are read as the same kind of row as the question's."""
    return "question" if cfg.query_rows == "question" else "last_input"


def head_rows_batch(
    backend: VLMBackend,
    requests: Sequence[MapRequest],
    cfg: AttentionConfig,
    layers: Sequence[int],
    heads: Sequence[int] | None,
) -> tuple[list[list[np.ndarray]], list[list[np.ndarray | None]]]:
    """Every listed head's rows at each layer, for the question and (relative reads) the generic
    prompt: per request, per layer, (heads, rows, grid rows, grid cols); generic None if not relative."""
    questions = backend.attention_rows_batch(_question_requests(requests, cfg), layers, cfg.query_rows, heads)
    generic = (
        backend.attention_rows_batch(
            [AttentionRequest(r.features, cfg.generic_prompt) for r in requests], layers, _generic_rows(cfg), heads
        )
        if cfg.relative
        else [[None] * len(layers) for _ in requests]
    )
    return questions, generic


def _combined(question: np.ndarray, generic: np.ndarray | None, cfg: AttentionConfig) -> np.ndarray:
    """One grid from (heads, rows, grid rows, grid cols) maps, reduced as cfg says."""
    flat = combine_maps(
        question.reshape(*question.shape[:2], -1),
        None if generic is None else generic.reshape(*generic.shape[:2], -1),
        cfg.rows,
        cfg.head_reduce,
        cfg.epsilon,
    )
    return flat.reshape(question.shape[2:])


def _per_head_maps_batch(
    backend: VLMBackend, requests: Sequence[MapRequest], cfg: AttentionConfig, layers: Sequence[int]
) -> list[list[np.ndarray]]:
    """Maps reduced per head (cfg.rows, cfg.head_reduce): every head's rows are read in a pass."""
    questions, generic = head_rows_batch(backend, requests, cfg, layers, cfg.heads)
    return [[_combined(q, g, cfg) for q, g in zip(qs, gs)] for qs, gs in zip(questions, generic)]


def _layer_heads_maps_batch(
    backend: VLMBackend, requests: Sequence[MapRequest], cfg: AttentionConfig
) -> list[np.ndarray]:
    """cfg.layer_heads' maps reduced together, as if the pairs were one layer's heads."""
    n_layers = backend.info.num_layers
    pairs = [(resolve_layer(layer, n_layers), head) for layer, head in cfg.layer_heads or []]
    layers = sorted({layer for layer, _ in pairs})

    def stacked(per_layer: list[np.ndarray]) -> np.ndarray:
        by_layer = dict(zip(layers, per_layer))
        return np.stack([by_layer[layer][head] for layer, head in pairs])

    questions, generic = head_rows_batch(backend, requests, cfg, layers, None)
    return [_combined(stacked(qs), None if gs[0] is None else stacked(gs), cfg) for qs, gs in zip(questions, generic)]


def read_maps_batch(backend: VLMBackend, requests: Sequence[MapRequest], cfg: AttentionConfig) -> list[np.ndarray]:
    """The grid the RoI search reads, per request: cfg.layer_heads' pairs together, else cfg.layer's."""
    if cfg.layer_heads is not None:
        return _layer_heads_maps_batch(backend, requests, cfg)
    return [maps[0] for maps in attention_maps_batch(backend, requests, cfg, [cfg.layer])]


def attention_maps(
    backend: VLMBackend,
    global_features: torch.Tensor,
    question: str,
    answer_ids: Sequence[int],
    cfg: AttentionConfig,
    layers: Sequence[int],
    captured: dict[int, np.ndarray] | None = None,
) -> list[np.ndarray]:
    """(Relative) attention grids at several layers: a pass for the question unless its first pass
    captured them, and one for the generic prompt."""
    request = MapRequest(global_features, question, answer_ids, dict(captured or {}))
    return attention_maps_batch(backend, [request], cfg, list(layers))[0]


def attention_map(
    backend: VLMBackend,
    global_features: torch.Tensor,
    question: str,
    answer_ids: Sequence[int],
    cfg: AttentionConfig,
    captured: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """The (relative) attention grid that the RoI search reads (read_maps_batch)."""
    return read_maps_batch(backend, [MapRequest(global_features, question, answer_ids, dict(captured or {}))], cfg)[0]


def locate(
    attention: np.ndarray,
    original_size: tuple[int, int],
    global_size: tuple[int, int],
    global_mode: GlobalMode,
    cfg: RoIConfig,
    local_size: tuple[int, int] | None = None,
) -> RoIResult:
    """RoI box in original pixels from an attention grid over the global image of `global_size`
    (CPU only, no model needed). The smallest box is `cfg.base_side`, else the local image's side
    (default: the global image's), so a ratio-1 crop reaches the encoder at native resolution."""
    geometry = CanvasGeometry.create(original_size, global_size, global_mode)
    return search_roi(attention, geometry, cfg.side_for(local_size or global_size), cfg.ratios)


def refined_passes(backend: VLMBackend, requests: Sequence[tuple[torch.Tensor, torch.Tensor, str]]) -> list[Generation]:
    """Answer several queries again, each from its (global, local) visual tokens and question, in one batch."""
    return backend.generate_batch([DecodeRequest([g, local], q) for g, local, q in requests])


def refined_pass(
    backend: VLMBackend, global_features: torch.Tensor, local_features: torch.Tensor, question: str
) -> Generation:
    """Answer again from global and local visual tokens together."""
    return refined_passes(backend, [(global_features, local_features, question)])[0]
