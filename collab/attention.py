"""Where did the decoder look? Attention to the visual tokens, and ViCrop's relative attention.

From one forward pass with attention outputs, take one decoder layer, the chosen query rows,
the visual-token columns, average over heads and rows, and lay the result out on the encoder's
patch grid. Dividing by the same map for a generic prompt ("Write a general description of the
image.") cancels the positions a model attends to whatever it is asked (ViCrop's rel-att).

Averaging rows and heads suits a model that looks from one row (ViCrop's last input token). A
model whose look forms at the words that name the object looks from a different row in each
head (the colour word's in one, the shape word's in another), and the other rows dilute it:
`reduce_rows` keeps each head's sharpest row and `reduce_heads` can ask that a place draw every
head's look (a geometric mean), so "the yellow circle" scores the object that is both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

QUERY_ROW_MODES = ("last_input", "answer", "all", "question")
ROW_REDUCTIONS = ("mean", "sharpest")
HEAD_REDUCTIONS = ("mean", "geometric")


def query_rows(prompt_len: int, n_answer_tokens: int, mode: str, question_start: int | None = None) -> list[int]:
    """Sequence positions whose attention we read, for a pass over prompt + answer tokens.

    - last_input: position P-1, the token that predicts the first answer token (ViCrop).
    - answer: positions P .. P+n-2, the generated tokens that predict the rest of the answer
      (falls back to last_input for one-token answers, which have no such row).
    - all: P-1 .. P+n-2, every row that predicted an answer token.
    - question: every prompt row after the image (`question_start`, the first position after the
      last visual token) through P-1: the question's own words, where a model whose look forms at
      the words that name the object reads it (the embedded model: docs/embedded_model.md).
    """
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1")
    if mode not in QUERY_ROW_MODES:
        raise ValueError(f"unknown query rows {mode!r}; expected one of {QUERY_ROW_MODES}")
    last_input = [prompt_len - 1]
    if mode == "question":
        if question_start is None or not 0 <= question_start < prompt_len:
            raise ValueError(f"question rows need the first position after the image in [0, {prompt_len})")
        return list(range(question_start, prompt_len))
    answer = list(range(prompt_len, prompt_len + max(0, n_answer_tokens - 1)))
    if mode == "last_input":
        return last_input
    if mode == "answer":
        return answer or last_input
    return last_input + answer


def resolve_layer(layer: int, num_layers: int) -> int:
    """Python-style index into the decoder layers, validated."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"attention layer {layer} out of range for a {num_layers}-layer decoder")
    return layer % num_layers


def visual_attention(
    attentions: Sequence[torch.Tensor],
    layer: int,
    rows: Sequence[int],
    visual_positions: torch.Tensor | Sequence[int],
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """Mean over heads (all, or the listed ones) and query rows of one layer's attention to the
    visual positions.

    attentions: per-layer tensors (batch=1, heads, queries, keys) as transformers returns them.
    Returns a float32 vector of len(visual_positions).
    """
    return visual_attention_rows(attentions, layer, rows, visual_positions, heads).mean(dim=(0, 1))


def visual_attention_rows(
    attentions: Sequence[torch.Tensor],
    layer: int,
    rows: Sequence[int],
    visual_positions: torch.Tensor | Sequence[int],
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """One layer's attention of each head and query row to the visual positions, not averaged:
    float32 (heads, rows, len(visual_positions)) on the CPU."""
    index = resolve_layer(layer, len(attentions))
    att = attentions[index]
    if att.ndim != 4 or att.shape[0] != 1:
        raise ValueError(f"expected attention of shape (1, heads, q, k), got {tuple(att.shape)}")
    if heads is not None:
        check_heads(heads, att.shape[1])
        att = att[:, list(heads)]
    positions = torch.as_tensor(visual_positions, dtype=torch.long, device=att.device)
    return att[0][:, list(rows)][:, :, positions].float().cpu()


def check_heads(heads: Sequence[int], num_heads: int) -> None:
    """A non-empty list of distinct head indices of a `num_heads`-head layer."""
    if not heads or len(set(heads)) != len(heads) or not all(0 <= h < num_heads for h in heads):
        raise ValueError(f"attention heads {list(heads)} must be distinct indices in [0, {num_heads})")


def to_grid(vector: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Row-major visual tokens -> (rows, cols) grid, as the vision tower emits patches."""
    arr = np.asarray(vector.numpy() if isinstance(vector, torch.Tensor) else vector, dtype=np.float64)
    if arr.size != grid[0] * grid[1]:
        raise ValueError(f"{arr.size} visual tokens do not fill a {grid[0]}x{grid[1]} grid")
    return arr.reshape(grid)


def relative_attention(question_map: np.ndarray, generic_map: np.ndarray, epsilon: float = 1e-6) -> np.ndarray:
    """question / (generic + epsilon): what the question adds over task-independent salience."""
    q = np.asarray(question_map, dtype=np.float64)
    g = np.asarray(generic_map, dtype=np.float64)
    if q.shape != g.shape:
        raise ValueError(f"maps differ in shape: {q.shape} vs {g.shape}")
    return q / (g + epsilon)


def _normalised(maps: np.ndarray) -> np.ndarray:
    """Each map (last axis) scaled to sum 1; an all-zero map becomes uniform."""
    total = maps.sum(axis=-1, keepdims=True)
    uniform = np.full_like(maps, 1.0 / maps.shape[-1])
    return np.divide(maps, total, out=uniform, where=total > 0)


def reduce_rows(maps: np.ndarray, how: str) -> np.ndarray:
    """(heads, rows, n) maps -> (heads, n): each head's mean over rows, or its sharpest row (the
    lowest entropy once normalised: the row that looks at one place, as the word naming the
    object does, where the other rows spread over the image)."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[1] == 0:
        raise ValueError(f"expected (heads, rows, n) maps with at least one row, got shape {maps.shape}")
    if how == "mean":
        return maps.mean(axis=1)
    if how == "sharpest":
        p = _normalised(maps)
        entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)  # (heads, rows)
        return p[np.arange(p.shape[0]), entropy.argmin(axis=1)]
    raise ValueError(f"unknown row reduction {how!r}; expected one of {ROW_REDUCTIONS}")


def reduce_heads(maps: np.ndarray, how: str, epsilon: float = 1e-12) -> np.ndarray:
    """(heads, n) -> (n,): the mean over heads, or the geometric mean of each head's normalised map
    (a place scores only where every head looks: a conjunction of what each head finds)."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 2 or maps.shape[0] == 0:
        raise ValueError(f"expected (heads, n) maps with at least one head, got shape {maps.shape}")
    if how == "mean":
        return maps.mean(axis=0)
    if how == "geometric":
        return np.exp(np.log(_normalised(maps) + epsilon).mean(axis=0))
    raise ValueError(f"unknown head reduction {how!r}; expected one of {HEAD_REDUCTIONS}")


def per_head_maps(question: np.ndarray, generic: np.ndarray | None, rows: str, epsilon: float = 1e-6) -> np.ndarray:
    """Each head's map, (heads, n), from per-head, per-row maps (heads, rows, n) of the question and,
    for relative attention, of the generic prompt (heads, rows', n; None: plain attention): each
    head's question rows divided by that head's mean generic map, then reduced over rows."""
    q = np.asarray(question, dtype=np.float64)
    if generic is not None:
        g = np.asarray(generic, dtype=np.float64)
        if g.ndim != 3 or g.shape[0] != q.shape[0] or g.shape[2] != q.shape[2]:
            raise ValueError(f"generic maps {g.shape} do not match question maps {q.shape} in heads and tokens")
        q = q / (g.mean(axis=1, keepdims=True) + epsilon)
    return reduce_rows(q, rows)


def combine_maps(
    question: np.ndarray,
    generic: np.ndarray | None,
    rows: str,
    heads: str,
    epsilon: float = 1e-6,
) -> np.ndarray:
    """One map from per-head, per-row maps: each head's (head_rows), then reduced over heads."""
    return reduce_heads(per_head_maps(question, generic, rows, epsilon), heads)
