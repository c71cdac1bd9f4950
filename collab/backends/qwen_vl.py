"""Qwen-VL backend on Hugging Face transformers: Qwen2.5-VL and Qwen3-VL, one class.

The split path is transformers' own: the vision tower and merger run once (`get_image_features`),
and generation takes those features back through `mm_encoder_outputs`, with the prompt's image
pads, `image_grid_thw` and `mm_token_type_ids`, so the multimodal rotary positions are the
model's own (`get_rope_index`), for one image or two of different grids.

Image sizes: the local image is square at `model.encoder_size` (a multiple of patch x merge: 28
for Qwen2.5-VL, 32 for Qwen3-VL). The global image is square too, or, with
`model.max_visual_tokens`, at that token budget with the original's aspect ratio (what the
processor's smart_resize makes). Each image's features are shaped (rows, cols, hidden), so its
grid travels with it. The two families differ in what the tower hands the decoder: Qwen3-VL adds
"deepstack" features (early tower layers, added to the first decoder layers' visual positions);
an image's features are then (1 + deepstack layers, rows, cols, hidden).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from collab.backends import capture
from collab.backends.base import (
    AttentionRequest,
    DecodeRequest,
    Generation,
)
from collab.backends.hf import (
    ModelLoadError,
    TransformersBackend,
    load_pretrained,
    refuse_question,
)
from collab.config import ModelConfig
from collab.imaging import GlobalBudget

VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@dataclass
class QwenPixels:
    """What the image processor makes of a list of images: flattened patches and each image's grid."""

    pixel_values: torch.Tensor  # (sum of patches, channels * temporal * patch * patch)
    grid_thw: torch.Tensor  # (images, 3): temporal, height and width in patches


class QwenVLBackend(TransformersBackend):
    """A loaded Qwen2.5-VL or Qwen3-VL model, tokenizer and image processor, split for the two-stage protocol."""

    def __init__(self, model, tokenizer, image_processor, config: ModelConfig, name: str = "qwen2.5-vl"):
        super().__init__(model, tokenizer, image_processor, config)
        vision = model.config.vision_config
        self.patch, self.merge = int(vision.patch_size), int(vision.spatial_merge_size)
        side = config.encoder_size or 448
        unit = self.patch * self.merge
        if side % unit:
            raise ModelLoadError(
                f"model.encoder_size {side} must be a multiple of {unit} (patch x merge) for this model"
            )
        rows = side // unit
        self.unit = unit
        budget = GlobalBudget(unit, config.max_visual_tokens) if config.max_visual_tokens else None
        info = self._info(name, (side, side), (rows, rows), rows * rows)
        self.info = dataclasses.replace(info, global_budget=budget)
        self.max_tokens = max(rows * rows, config.max_visual_tokens or 0)
        self.vision_end_id = tokenizer.convert_tokens_to_ids(VISION_END)
        self.set_attn_implementation(config.attn_implementation)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, config: ModelConfig, search_roots: Sequence[Path] = ()) -> QwenVLBackend:
        """Load with transformers' from_pretrained from a local directory or a hub id (cached only,
        unless `local_files_only` is off)."""
        from transformers import AutoModelForImageTextToText

        model, tokenizer, image_processor, name = load_pretrained(
            AutoModelForImageTextToText, config, search_roots, "a Qwen-VL model"
        )
        if model.config.model_type not in FAMILIES:
            raise ModelLoadError(f"{config.path}: model type {model.config.model_type!r}; this backend runs {FAMILIES}")
        return cls(model, tokenizer, image_processor, config, name=name)

    # ------------------------------------------------------------------ prompts
    def check_question(self, question: str) -> None:
        image_tokens = (self.config.image_placeholder, IMAGE_PAD, VISION_START, VISION_END)
        refuse_question(question, self.tokenizer, self.config, image_tokens, self._control_tokens)

    def prompt_ids(
        self, template: str, question: str, n_images: int, tokens: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The filled template, each image placeholder expanded as the Qwen processor does it:
        <|vision_start|>, one <|image_pad|> per merged visual token, <|vision_end|>. `tokens`:
        each image's visual tokens (default: the square encoder size's)."""
        self.check_question(question)
        placeholder = self.config.image_placeholder
        tokens = list(tokens) if tokens is not None else [self.info.tokens_per_image] * n_images
        if template.count(placeholder) != n_images or len(tokens) != n_images:
            raise ValueError(f"template has {template.count(placeholder)} image placeholders, expected {n_images}")
        head, *parts = template.replace("{question}", question).split(placeholder)
        text = head + "".join(VISION_START + IMAGE_PAD * n + VISION_END + part for n, part in zip(tokens, parts))
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        found = int((ids == self.image_token_id).sum())
        if found != sum(tokens):
            raise ValueError(f"prompt has {found} image tokens, expected {sum(tokens)}")
        return ids.to(self.device)

    def _prompt(self, template: str, question: str, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.prompt_ids(template, question, len(features), [math.prod(self._grid_of(f)) for f in features])

    def _grid_of(self, features: torch.Tensor) -> tuple[int, int]:
        if features.ndim not in (3, 4):
            raise ValueError(f"Qwen-VL features are (rows, cols, hidden) per image, got shape {tuple(features.shape)}")
        return (int(features.shape[-3]), int(features.shape[-2]))

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        merged = features if features.ndim == 3 else features[0]  # Qwen3-VL: without the deepstack layers
        return merged.reshape(-1, merged.shape[-1])

    def _size_for(self, image: Image.Image) -> tuple[int, int]:
        """The size an image is encoded at: kept when it is one this server asks the edge for
        (a budget-sized global, the square local), else what the edge should have sent."""
        if self.info.global_budget is None:
            return self.info.encoder_size
        w, h = image.size
        if w % self.unit == 0 and h % self.unit == 0 and 4 <= (w // self.unit) * (h // self.unit) <= self.max_tokens:
            return image.size
        return self.info.global_budget.size_for(image.size)

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: Sequence[Image.Image]) -> QwenPixels:
        if not images:
            raise ValueError("no images to preprocess")
        sized = []
        for im in images:
            size = self._size_for(im)
            sized.append(im if im.size == size else im.resize(size, Image.BICUBIC))
        # the processor's own smart_resize must leave these sizes as they are
        bounds = {"shortest_edge": 4 * self.unit**2, "longest_edge": self.max_tokens * self.unit**2}
        out = self.image_processor(images=sized, return_tensors="pt", size=bounds)
        grid = out["image_grid_thw"]
        want = [[1, im.height // self.patch, im.width // self.patch] for im in sized]
        if grid.tolist() != want:
            raise ValueError(f"image processor made grids {grid.tolist()}, expected {want}")
        return QwenPixels(out["pixel_values"].to(self.device, self.dtype), grid.to(self.device))

    @torch.inference_mode()
    def encode(self, pixel_values: QwenPixels) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(pixel_values.pixel_values, pixel_values.grid_thw, return_dict=True)
        grids = [(int(h) // self.merge, int(w) // self.merge) for _, h, w in pixel_values.grid_thw.tolist()]
        deepstack = getattr(out, "deepstack_features", None) or []
        features = []
        for i, (rows, cols) in enumerate(grids):
            layers = [out.pooler_output[i], *(layer[i] for layer in deepstack)]  # each (tokens, hidden)
            stacked = torch.stack([t.reshape(rows, cols, -1) for t in layers])
            features.append(stacked if deepstack else stacked[0])
        return features

    def _batch(self, prompts: Sequence[torch.Tensor], features: Sequence[torch.Tensor]) -> dict:
        """Left-padded ids, mask, and the multimodal inputs transformers takes instead of pixels."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        width = max(ids.shape[1] for ids in prompts)
        offsets = [width - ids.shape[1] for ids in prompts]
        input_ids = torch.cat(
            [
                torch.cat([torch.full((1, n), self.pad_token_id, device=self.device), ids], 1)
                for ids, n in zip(prompts, offsets)
            ]
        )
        mask = torch.cat([torch.tensor([[0] * n + [1] * ids.shape[1]]) for ids, n in zip(prompts, offsets)]).to(
            self.device
        )
        grids = [self._grid_of(f) for f in features]
        flat = [f.to(self.device, self.dtype).flatten(-3, -2) for f in features]  # (..., tokens, hidden)
        if flat[0].ndim == 3:  # Qwen3-VL: (1 + deepstack layers, tokens, hidden) per image
            outputs = BaseModelOutputWithDeepstackFeatures(
                pooler_output=[f[0] for f in flat],
                deepstack_features=[[f[k] for f in flat] for k in range(1, flat[0].shape[0])],
            )
        else:
            outputs = BaseModelOutputWithPooling(pooler_output=flat)
        thw = [(1, rows * self.merge, cols * self.merge) for rows, cols in grids]
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "image_grid_thw": torch.tensor(thw, device=self.device),
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
            "mm_encoder_outputs": {"image": outputs},
            "offsets": offsets,
        }

    def _visual_positions(self, prompt_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Positions of the first image's visual tokens (pads before its <|vision_end|>), shifted by `offset`."""
        ids = prompt_ids[0]
        end = int((ids == self.vision_end_id).nonzero()[0])
        return (ids[:end] == self.image_token_id).nonzero().flatten() + offset

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[DecodeRequest]) -> list[Generation]:
        if not requests:
            return []
        prompts = [self._prompt(self._template(len(r.features)), r.question, r.features) for r in requests]
        batch = self._batch(prompts, [f for r in requests for f in r.features])
        offsets, width = batch.pop("offsets"), batch["input_ids"].shape[1]
        layers = self._capture_layers([layer for r in requests for layer in r.capture_layers])
        with self._configured_kernels(), capture.capture(layers) as captured:
            out = self.model.generate(
                **batch,
                max_new_tokens=self.config.max_new_tokens,
                do_sample=False,
                num_beams=1,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=self.pad_token_id,
            )
        # from input_ids, generate returns the prompt too
        return self._generations(out.sequences[:, width:], out.logits, requests, prompts, offsets, captured)

    def _last_input_grids(self, requests: Sequence[AttentionRequest], layers: Sequence[int]) -> list[list[np.ndarray]]:
        prompts = [self._prompt(self.config.prompt_template, r.question, [r.features]) for r in requests]
        batch = self._batch(prompts, [r.features for r in requests])
        offsets = batch.pop("offsets")
        with self._configured_kernels(), capture.capture(self._capture_layers(layers)) as captured:
            self.model(**batch, use_cache=False, logits_to_keep=1)
        self._require_captured(captured, layers)
        return [
            self._grids_in_order(captured, layers, i, ids, offset, self._grid_of(r.features))
            for i, (ids, offset, r) in enumerate(zip(prompts, offsets, requests))
        ]

    def _eager_pass(self, prompt: torch.Tensor, answer: torch.Tensor, features: torch.Tensor):
        batch = self._batch([torch.cat([prompt, answer], dim=1)], [features])
        batch.pop("offsets")
        return self.model(**batch, output_attentions=True, use_cache=False, logits_to_keep=1)
