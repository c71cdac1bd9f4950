"""LLaVA-family backend on Hugging Face transformers (`LlavaForConditionalGeneration`).

The split path reproduces what `model.generate(input_ids, pixel_values)` does internally: the
prompt carries the image token once per visual token (as LlavaProcessor expands it), the token
embeddings at those positions are replaced by the projected visual features, and the decoder
generates from `inputs_embeds`. Doing the merge ourselves lets the server keep the global
features and reuse them for the attention read and the refined pass without re-encoding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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

log = logging.getLogger(__name__)


def expand_prompt(
    template: str, question: str, n_images: int, placeholder: str, image_token: str, tokens_per_image: int
) -> str:
    """Fill the template, each image placeholder expanded to one image token per visual token
    (what LlavaProcessor does), so the text tokenises to exactly the positions the features fill."""
    if placeholder in question:
        raise ValueError("the question must not contain the image placeholder token")
    if template.count(placeholder) != n_images:
        raise ValueError(f"template has {template.count(placeholder)} image placeholders, expected {n_images}")
    return template.replace(placeholder, image_token * tokens_per_image).replace("{question}", question)


class LlavaBackend(TransformersBackend):
    """A loaded LLaVA model, tokenizer and image processor, split for the two-stage protocol."""

    def __init__(self, model, tokenizer, image_processor, config: ModelConfig, name: str = "llava"):
        super().__init__(model, tokenizer, image_processor, config)
        cfg = model.config
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.image_token is None or self.image_token == tokenizer.unk_token:
            raise ModelLoadError(f"tokenizer has no token for image_token_id={self.image_token_id}")
        vision = cfg.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        self.cls_tokens = 1 if cfg.vision_feature_select_strategy == "full" else 0
        size = (int(vision.image_size), int(vision.image_size))
        self.info = self._info(name, size, (side, side), side * side + self.cls_tokens)
        self.set_attn_implementation(config.attn_implementation)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, config: ModelConfig, search_roots: Sequence[Path] = ()) -> LlavaBackend:
        """Load with transformers' from_pretrained from a local directory or a hub id.

        `local_files_only` (default on) means nothing is downloaded at run time: a hub id works
        only if it is already in the local cache.
        """
        from transformers import LlavaForConditionalGeneration

        model, tokenizer, image_processor, name = load_pretrained(
            LlavaForConditionalGeneration, config, search_roots, "a LLaVA model"
        )
        return cls(model, tokenizer, image_processor, config, name=name)

    # ------------------------------------------------------------------ prompts
    def check_question(self, question: str) -> None:
        """Refuse what would change the prompt's structure rather than neutralise it: a client that
        sends "</s>" or "<image>" gets told, instead of an answer to a question it did not ask."""
        refuse_question(
            question,
            self.tokenizer,
            self.config,
            (self.config.image_placeholder, self.image_token),
            self._control_tokens,
        )

    def prompt_ids(self, template: str, question: str, n_images: int) -> torch.Tensor:
        """Token ids of the filled template, each image placeholder expanded to its visual tokens."""
        self.check_question(question)
        text = expand_prompt(
            template, question, n_images, self.config.image_placeholder, self.image_token, self.info.tokens_per_image
        )
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
        found = int((ids == self.image_token_id).sum())
        if found != n_images * self.info.tokens_per_image:
            raise ValueError(f"prompt has {found} image tokens, expected {n_images * self.info.tokens_per_image}")
        return ids.to(self.device)

    def merge_embeddings(
        self, input_ids: torch.Tensor, features: Sequence[torch.Tensor], prompt_len: int | None = None
    ) -> torch.Tensor:
        """Token embeddings with the visual features written over the prompt's image-token positions.

        Tokens after `prompt_len` (a generated answer fed back) keep their text embedding even if
        one is the image token, exactly as in `model.generate`'s later steps.
        """
        embeds = self.model.get_input_embeddings()(input_ids)
        visual = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).to(embeds.device, embeds.dtype)
        mask = input_ids == self.image_token_id
        if prompt_len is not None:
            mask[:, prompt_len:] = False
        mask = mask.unsqueeze(-1)
        if int(mask.sum()) != visual.shape[0]:
            raise ValueError(f"{int(mask.sum())} image tokens but {visual.shape[0]} visual features")
        return embeds.masked_scatter(mask, visual)

    # ------------------------------------------------------------------ stages
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            raise ValueError("no images to preprocess")
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        out = self.model.get_image_features(
            pixel_values=pixel_values.to(self.device, self.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.stack(list(features))

    def _left_padded(self, prompts: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        """(ids, embeds) per request -> left-padded batch: embeds, attention mask, position ids,
        and each row's pad count. Padded rows see the same positions and keys as alone."""
        width = max(ids.shape[1] for ids, _ in prompts)
        pad = self.model.get_input_embeddings()(torch.tensor([[self.pad_token_id]], device=self.device))
        rows, masks, offsets = [], [], []
        for ids, embeds in prompts:
            n = width - ids.shape[1]
            rows.append(torch.cat([pad.expand(1, n, -1).to(embeds.dtype), embeds], dim=1))
            masks.append(torch.tensor([[0] * n + [1] * ids.shape[1]], dtype=torch.long))
            offsets.append(n)
        mask = torch.cat(masks).to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return torch.cat(rows), mask, positions, offsets

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[DecodeRequest]) -> list[Generation]:
        if not requests:
            return []
        prompts = []
        for r in requests:
            ids = self.prompt_ids(self._template(len(r.features)), r.question, len(r.features))
            prompts.append((ids, self.merge_embeddings(ids, r.features)))
        embeds, mask, _, offsets = self._left_padded(prompts)
        layers = self._capture_layers([layer for r in requests for layer in r.capture_layers])
        with self._configured_kernels(), capture.capture(layers) as captured:
            out = self._generate(mask, embeds)
        # from inputs_embeds, generate returns the new tokens only
        return self._generations(out.sequences, out.logits, requests, [ids for ids, _ in prompts], offsets, captured)

    def _generate(self, mask: torch.Tensor, embeds: torch.Tensor):
        return self.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=self.config.max_new_tokens,
            do_sample=False,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_token_id,
        )

    def _visual_positions(self, prompt_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Sequence positions of the first image's patch tokens (CLS excluded), shifted by `offset` pads."""
        positions = (prompt_ids[0] == self.image_token_id).nonzero().flatten()[self.cls_tokens :]
        return positions[: self.info.tokens_per_image - self.cls_tokens] + offset

    def _last_input_grids(self, requests: Sequence[AttentionRequest], layers: Sequence[int]) -> list[list[np.ndarray]]:
        # answer ids come after the last input row: causally they cannot change it, so they are left out
        prompts = []
        for r in requests:
            ids = self.prompt_ids(self.config.prompt_template, r.question, 1)
            prompts.append((ids, self.merge_embeddings(ids, [r.features])))
        embeds, mask, positions, offsets = self._left_padded(prompts)
        with self._configured_kernels(), capture.capture(self._capture_layers(layers)) as captured:
            self.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1
            )
        self._require_captured(captured, layers)
        return [
            self._grids_in_order(captured, layers, i, ids, offset, self.info.grid)
            for i, ((ids, _), offset) in enumerate(zip(prompts, offsets))
        ]

    def _eager_pass(self, prompt: torch.Tensor, answer: torch.Tensor, features: torch.Tensor):
        ids = torch.cat([prompt, answer], dim=1)
        embeds = self.merge_embeddings(ids, [features], prompt_len=prompt.shape[1])
        return self.model(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            output_attentions=True,
            use_cache=False,
            logits_to_keep=1,
        )
