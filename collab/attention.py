"""Where did the decoder look? Attention to the visual tokens, and ViCrop's relative attention.

From one forward pass with attention outputs, take one decoder layer, the chosen query rows,
the visual-token columns, average over heads and rows, and lay the result out on the encoder's
patch grid. Dividing by the same map for a generic prompt ("Write a general description of the
image.") cancels the positions a model attends to whatever it is asked (ViCrop's rel-att).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

QUERY_ROW_MODES = ("last_input", "answer", "all", "question")


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
    index = resolve_layer(layer, len(attentions))
    att = attentions[index]
    if att.ndim != 4 or att.shape[0] != 1:
        raise ValueError(f"expected attention of shape (1, heads, q, k), got {tuple(att.shape)}")
    if heads is not None:
        check_heads(heads, att.shape[1])
        att = att[:, list(heads)]
    positions = torch.as_tensor(visual_positions, dtype=torch.long, device=att.device)
    picked = att[0][:, list(rows)][:, :, positions]  # (heads, rows, n_visual)
    return picked.float().mean(dim=(0, 1)).cpu()


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
