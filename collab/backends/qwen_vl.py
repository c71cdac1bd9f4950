"""Qwen-VL backend on Hugging Face transformers: Qwen2.5-VL and Qwen3-VL, one class.

The split path is transformers' own: the vision tower and merger run once (`get_image_features`),
and generation takes those features back through `mm_encoder_outputs`, with the prompt's image
pads, `image_grid_thw` and `mm_token_type_ids`, so the multimodal rotary positions are the
model's own (`get_rope_index`), for one image or two. Images are square at `model.encoder_size`
(a multiple of patch x merge: 28 for Qwen2.5-VL, 32 for Qwen3-VL), so every image has the same
token grid. The two differ in what the tower hands the decoder: Qwen3-VL adds "deepstack"
features (early tower layers, added to the first decoder layers' visual positions); an image's
features are then one tensor (1 + deepstack layers, tokens, hidden), so they travel and are
stored like Qwen2.5-VL's (tokens, hidden).
"""

from __future__ import annotations

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
        self.grid_thw = (1, side // self.patch, side // self.patch)
        self.info = self._info(name, (side, side), (rows, rows), rows * rows)
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

    def prompt_ids(self, template: str, question: str, n_images: int) -> torch.Tensor:
        """The filled template, each image placeholder expanded as the Qwen processor does it:
        <|vision_start|>, one <|image_pad|> per merged visual token, <|vision_end|>."""
        self.check_question(question)
        placeholder = self.config.image_placeholder
        if template.count(placeholder) != n_images:
            raise ValueError(f"template has {template.count(placeholder)} image placeholders, expected {n_images}")
        image = VISION_START + IMAGE_PAD * self.info.tokens_per_image + VISION_END
        text = template.replace(placeholder, image).replace("{question}", question)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        found = int((ids == self.image_token_id).sum())
        if found != n_images * self.info.tokens_per_image:
            raise ValueError(f"prompt has {found} image tokens, expected {n_images * self.info.tokens_per_image}")
        return ids.to(self.device)

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: Sequence[Image.Image]) -> QwenPixels:
        if not images:
            raise ValueError("no images to preprocess")
        size = self.info.encoder_size
        images = [im if im.size == size else im.resize(size, Image.BICUBIC) for im in images]
        out = self.image_processor(images=list(images), return_tensors="pt")
        grid = out["image_grid_thw"]
        if not all(tuple(g) == self.grid_thw for g in grid.tolist()):
            raise ValueError(f"image processor made grids {grid.tolist()}, expected {self.grid_thw} for every image")
        return QwenPixels(out["pixel_values"].to(self.device, self.dtype), grid.to(self.device))

    @torch.inference_mode()
    def encode(self, pixel_values: QwenPixels) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values.pixel_values, pixel_values.grid_thw, return_dict=True)
        merged = torch.stack(list(out.pooler_output))  # (images, tokens_per_image, hidden)
        deepstack = getattr(out, "deepstack_features", None)
        if not deepstack:
            return merged
        layers = [torch.stack(list(per_image)) for per_image in deepstack]  # each (images, tokens, hidden)
        return torch.stack([merged, *layers], dim=1)  # (images, 1 + deepstack layers, tokens, hidden)

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
        features = [f.to(self.device, self.dtype) for f in features]
        if features[0].ndim == 3:  # Qwen3-VL: (1 + deepstack layers, tokens, hidden) per image
            outputs = BaseModelOutputWithDeepstackFeatures(
                pooler_output=[f[0] for f in features],
                deepstack_features=[[f[k] for f in features] for k in range(1, features[0].shape[0])],
            )
        else:
            outputs = BaseModelOutputWithPooling(pooler_output=[f.reshape(-1, f.shape[-1]) for f in features])
        visual = features
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "image_grid_thw": torch.tensor([self.grid_thw] * len(visual), device=self.device),
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
            "mm_encoder_outputs": {"image": outputs},
            "offsets": offsets,
        }

    def _visual_positions(self, prompt_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Positions of the first image's visual tokens, shifted by `offset` pads."""
        positions = (prompt_ids[0] == self.image_token_id).nonzero().flatten()
        return positions[: self.info.tokens_per_image] + offset

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[DecodeRequest]) -> list[Generation]:
        if not requests:
            return []
        prompts = [self.prompt_ids(self._template(len(r.features)), r.question, len(r.features)) for r in requests]
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
        prompts = [self.prompt_ids(self.config.prompt_template, r.question, 1) for r in requests]
        batch = self._batch(prompts, [r.features for r in requests])
        offsets = batch.pop("offsets")
        with self._configured_kernels(), capture.capture(self._capture_layers(layers)) as captured:
            self.model(**batch, use_cache=False, logits_to_keep=1)
        self._require_captured(captured, layers)
        return [
            self._grids_in_order(captured, layers, i, ids, offset)
            for i, (ids, offset) in enumerate(zip(prompts, offsets))
        ]

    def _eager_pass(self, prompt: torch.Tensor, answer: torch.Tensor, features: torch.Tensor):
        batch = self._batch([torch.cat([prompt, answer], dim=1)], [features])
        batch.pop("offsets")
        return self.model(**batch, output_attentions=True, use_cache=False, logits_to_keep=1)
