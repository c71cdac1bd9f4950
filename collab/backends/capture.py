"""Read the prompt's last-token attention during a decode's prefill, at no extra forward pass.

The question's attention map (ViCrop's `last_input` row) is what the first pass's prefill already
computes at every layer; fast kernels (sdpa) just do not return it. The decoder's attention is
routed through a registered transformers attention function that calls the configured kernel
unchanged and, while a `capture` is active in this thread and only for the layers it asks for,
also computes the last query row's softmax from the same (rotary-embedded) queries and keys:
one row, so a few hundred multiply-adds per head. Outside a capture it is the kernel itself.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "collab_capture_"


class Capture:
    """Per-layer (batch, keys) float32 maps of the last query row, head-averaged."""

    def __init__(self, layers: Sequence[int]):
        self.layers = frozenset(layers)
        self.maps: dict[int, torch.Tensor] = {}


_active: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("collab_attention_capture", default=None)


@contextmanager
def capture(layers: Sequence[int]):
    """Within the block, multi-token passes of this thread (a decode's prefill, or a forward over a
    prompt) record the listed layers' last-row attention in the yielded Capture."""
    cap = Capture(layers)
    token = _active.set(cap if cap.layers else None)
    try:
        yield cap
    finally:
        _active.reset(token)


def _eager(module):
    """The model's own eager attention (its modeling file's function), as transformers calls it."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to wrap")
    return fn


def _last_row(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """softmax(q_last k^T * scaling + mask) averaged over heads: (batch, keys), float32."""
    keys = repeat_kv(key, query.shape[1] // key.shape[1])
    scores = torch.matmul(query[:, :, -1:, :].float(), keys.float().transpose(2, 3)) * scaling  # (b, h, 1, s)
    if mask is not None:
        row = mask[:, :, -1:, : keys.shape[2]]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row.float()
    return torch.softmax(scores, dim=-1)[:, :, 0, :].mean(dim=1)


def _wrapping(base_name: str):
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        base = sdpa_attention_forward if base_name == "sdpa" else _eager(module)
        out = base(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        cap = _active.get()
        layer = getattr(module, "layer_idx", None)
        # every multi-token pass overwrites: the last one holds the prompt's last row (a chunked
        # prefill's last chunk); decode steps (one query token) never record
        if cap is not None and layer in cap.layers and query.shape[2] > 1:
            with torch.no_grad():
                cap.maps[layer] = _last_row(query, key, attention_mask, scaling or query.shape[-1] ** -0.5)
        return out

    return attention


for _base, _mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    ALL_ATTENTION_FUNCTIONS.register(PREFIX + _base, _wrapping(_base))
    ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX + _base, _mask)


def capturing_name(implementation: str) -> str:
    """The registered name that wraps `implementation` ("eager" or "sdpa")."""
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"no capturing wrapper for attention implementation {implementation!r}")
    return PREFIX + implementation
