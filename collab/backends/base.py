"""The one interface the method needs from a VLM, split at the vision/decoder boundary.

Splitting lets the server encode once and reuse the global visual tokens: for the first pass,
for the attention read when the gate fires, and again (beside the local tokens) for the refined
pass. Visual features are plain tensors, one per image, so they can travel between processes:
(tokens_per_image, hidden) for LLaVA; for Qwen-VL (rows, cols, hidden), so that an image's token
grid travels with it (its global image keeps the photo's aspect ratio), with a leading axis of
deepstack layers for Qwen3-VL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from collab.imaging import GlobalBudget, global_size
from collab.uncertainty import TokenScores

# Unicode's White_Space property: what JSON Schema's and pydantic's \s mean. Python's str.strip()
# also strips the separators U+001C-U+001F, which would make "\x1f" valid in the schema but empty here.
UNICODE_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


class InvalidQuestion(ValueError):
    """A question the server must refuse (the client's fault: a 422, never a 500). `reason`:
    "empty", "placeholder" (the image placeholder or image token: it would add or break visual
    tokens), "special_token" (a tokenizer control token such as </s>: it would end or restructure
    the prompt), "too_long" (more than the configured tokens)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses process boundaries inside Ray's task errors
        return type(self), (self.reason, str(self))


@dataclass(frozen=True)
class BackendInfo:
    """What callers need to know about the loaded model."""

    model_name: str
    encoder_size: tuple[int, int]  # (width, height) the vision tower takes
    grid: tuple[int, int]  # (rows, cols) of visual tokens per image
    tokens_per_image: int  # visual tokens in the prompt per image (may include a CLS token)
    num_layers: int  # decoder layers (for attention layer choice)
    hidden_size: int
    device: str
    dtype: str
    # Qwen-VL's native resolution: the global image at a token budget with the original's aspect
    # ratio (then `grid` and `tokens_per_image` are the local image's). None: at encoder_size.
    global_budget: GlobalBudget | None = None
    num_heads: int | None = None  # attention heads per decoder layer (for a head subset's check)

    def global_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the global image the edge sends for an original of this size."""
        return global_size(self.encoder_size, self.global_budget, original_size)

    def global_grid(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the global image's visual tokens for an original of this size."""
        if self.global_budget is None:
            return self.grid
        width, height = self.global_size(original_size)
        return (height // self.global_budget.unit, width // self.global_budget.unit)

    @classmethod
    def from_dict(cls, info: dict) -> BackendInfo:
        """Back from `dataclasses.asdict` (how it crosses process boundaries)."""
        budget = info.get("global_budget")
        fields = {**info, "encoder_size": tuple(info["encoder_size"]), "grid": tuple(info["grid"])}
        return cls(**{**fields, "global_budget": GlobalBudget(**budget) if budget else None})


@dataclass
class Generation:
    """One decoded answer with what the gate needs."""

    answer: str
    token_ids: list[int]  # generated ids, EOS included if emitted
    n_answer_tokens: int  # ids before the first EOS
    logits: torch.Tensor  # (steps, vocab) float32, raw (unprocessed) logits of each step, on CPU
    scores: TokenScores
    # Attention grids of the prompt's last token (the `last_input` row) by decoder layer, read from
    # the decode's own prefill for the layers the request asked to capture.
    attention: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class DecodeRequest:
    """One greedy decode of a batch: 1 image (first pass) or 2 (global, local: refined pass).

    capture_layers: decoder layers whose `last_input` attention to the (first) image is read
    during the prefill and returned in Generation.attention (no extra pass)."""

    features: Sequence[torch.Tensor]
    question: str
    capture_layers: Sequence[int] = ()


@dataclass
class AttentionRequest:
    """One attention read of a batch: the prompt for `question` over one image, the answer ids appended."""

    features: torch.Tensor
    question: str
    answer_ids: Sequence[int] = ()


class VLMBackend(ABC):
    """A vision-language model split into encode / decode / attention."""

    info: BackendInfo

    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Encoder-resolution RGB images -> pixel tensor (n, 3, H, W) on the model device."""

    @abstractmethod
    def encode(self, pixel_values) -> Sequence[torch.Tensor]:
        """Pixels -> one visual-token tensor per image, in the decoder's embedding space."""

    @abstractmethod
    def check_question(self, question: str) -> None:
        """Raise InvalidQuestion if the question cannot go into a prompt (called by every pass)."""

    @abstractmethod
    def generate_batch(self, requests: Sequence[DecodeRequest]) -> list[Generation]:
        """Greedy answers for several requests in one batched decode; each equals its own
        unbatched decode (tokens; logits and scores within float tolerance). Tested in float32 on
        CPU; in float16/bfloat16 on a GPU a padded batch runs other kernels than a batch of one
        (an explicit mask rules out the flash path), so a near-tie greedy token may differ."""

    def generate(
        self, features: Sequence[torch.Tensor], question: str, capture_layers: Sequence[int] = ()
    ) -> Generation:
        """Greedy answer from 1 image (first pass) or 2 images (global, local: refined pass).

        features: one tensor per image (as `encode` made it), in prompt order.
        """
        return self.generate_batch([DecodeRequest(features, question, capture_layers)])[0]

    @abstractmethod
    def attention_grids_batch(
        self,
        requests: Sequence[AttentionRequest],
        layers: Sequence[int],
        query_rows: str,
        heads: Sequence[int] | None = None,
    ) -> list[list[np.ndarray]]:
        """attention_grids for several requests in one forward pass (one list of grids per request),
        averaged over `heads` (None: every head)."""

    def attention_rows_batch(
        self,
        requests: Sequence[AttentionRequest],
        layers: Sequence[int],
        query_rows: str,
        heads: Sequence[int] | None = None,
    ) -> list[list[np.ndarray]]:
        """Per request, per layer, the maps of each head and query row, not averaged: float32
        (heads, rows, grid rows, grid cols), heads as listed (None: every head). For attention reads
        that reduce rows and heads otherwise than by the mean (collab.attention.combine_maps)."""
        raise NotImplementedError(f"{type(self).__name__} reads attention averaged over heads and rows only")

    def attention_grids(
        self,
        features: torch.Tensor,
        prompt_question: str,
        answer_ids: Sequence[int],
        layers: Sequence[int],
        query_rows: str,
    ) -> list[np.ndarray]:
        """Attention of decoder layers to the image's visual tokens, one (rows, cols) grid per layer.

        One forward pass serves every layer (a layer sweep costs no more than one layer).
        features: the global image's (as `encode` made them). answer_ids: the first-pass
        answer tokens appended after the prompt (empty for the generic prompt).
        """
        request = AttentionRequest(features, prompt_question, answer_ids)
        return self.attention_grids_batch([request], layers, query_rows)[0]

    def attention_grid(
        self, features: torch.Tensor, prompt_question: str, answer_ids: Sequence[int], layer: int, query_rows: str
    ) -> np.ndarray:
        return self.attention_grids(features, prompt_question, answer_ids, [layer], query_rows)[0]

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """One image's features as the (tokens, hidden) the decoder reads, in prompt order."""
        return features

    def encode_images(self, images: Sequence[Image.Image]) -> Sequence[torch.Tensor]:
        return self.encode(self.preprocess(images))

    def synchronize(self) -> None:
        """Wait for queued device work, so a wall-clock timer around a stage measures the stage.

        CUDA kernels run asynchronously: without this, an encode "finishes" when its kernels are
        queued and its time is billed to whichever later step first copies a result to the CPU.
        """
        device = torch.device(self.info.device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
