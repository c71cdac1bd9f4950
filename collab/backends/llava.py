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
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from collab.attention import query_rows as select_query_rows
from collab.attention import resolve_layer, to_grid, visual_attention
from collab.backends import capture
from collab.backends.base import (
    AttentionRequest,
    BackendInfo,
    DecodeRequest,
    Generation,
    VLMBackend,
)
from collab.backends.hf import (
    ModelLoadError,
    SharedExclusiveLock,
    control_tokens,
    eos_ids,
    load_pretrained,
    refuse_question,
    set_capturing_attention,
)
from collab.config import ModelConfig
from collab.uncertainty import answer_length, token_scores

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


class LlavaBackend(VLMBackend):
    """A loaded LLaVA model, tokenizer and image processor, split for the two-stage protocol."""

    def __init__(self, model, tokenizer, image_processor, config: ModelConfig, name: str = "llava"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.image_token is None or self.image_token == tokenizer.unk_token:
            raise ModelLoadError(f"tokenizer has no token for image_token_id={self.image_token_id}")
        vision = cfg.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        self.cls_tokens = 1 if cfg.vision_feature_select_strategy == "full" else 0
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_ids = frozenset(eos_ids(model, tokenizer))
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_ids, default=0)
        # Fast kernels (sdpa) return no attention maps: the attention read then switches the model
        # to eager for its own pass. The switch is model-wide: decoding passes hold the model
        # shared, the switched pass holds it alone.
        self._kernels = SharedExclusiveLock()
        self.set_attn_implementation(config.attn_implementation)
        # Texts the tokenizer turns into control tokens (BOS/EOS/PAD/UNK and added special tokens).
        self._control_tokens = control_tokens(tokenizer)
        self.info = BackendInfo(
            model_name=name,
            encoder_size=(int(vision.image_size), int(vision.image_size)),
            grid=(side, side),
            tokens_per_image=side * side + self.cls_tokens,
            num_layers=int(cfg.text_config.num_hidden_layers),
            hidden_size=int(cfg.text_config.hidden_size),
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
        )

    def set_attn_implementation(self, implementation: str) -> None:
        """Decode with `implementation` ("eager" or "sdpa"). The decoder runs it through a wrapper
        that can read the prompt's last-row attention during a decode's prefill
        (collab.backends.capture); the vision tower runs it as it is."""
        set_capturing_attention(self.model, self.config, implementation)

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

    @property
    def _switch_for_maps(self) -> bool:
        return self.config.attn_implementation != "eager"

    @contextmanager
    def _eager_attention(self):
        """Eager attention (which returns maps) in the decoder for the duration of one pass.

        Only the decoder switches (the vision tower keeps its kernels), and the decoder's previous
        setting is restored whatever happens. Not re-entrant: never decode inside this block.
        """
        if not self._switch_for_maps:
            yield
            return
        text = self.model.config.text_config
        with self._kernels.exclusive():
            previous = text._attn_implementation
            try:
                self.model.set_attn_implementation({"text_config": "eager"})
                yield
            finally:
                self.model.set_attn_implementation({"text_config": previous})

    def _configured_kernels(self):
        return self._kernels.shared() if self._switch_for_maps else nullcontext()

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
            if len(r.features) not in (1, 2):
                raise ValueError(f"expected 1 (global) or 2 (global, local) images, got {len(r.features)}")
            template = self.config.prompt_template if len(r.features) == 1 else self.config.refine_template
            ids = self.prompt_ids(template, r.question, len(r.features))
            prompts.append((ids, self.merge_embeddings(ids, r.features)))
        embeds, mask, _, offsets = self._left_padded(prompts)
        n_layers = self.info.num_layers
        layers = sorted({resolve_layer(layer, n_layers) for r in requests for layer in r.capture_layers})
        with self._configured_kernels(), capture.capture(layers) as captured:
            out = self._generate(mask, embeds)
        out_logits = torch.stack(out.logits, dim=1).float().cpu()  # (batch, steps, vocab)
        results = []
        for i, (r, (ids, _)) in enumerate(zip(requests, prompts)):
            sequence = out.sequences[i].tolist()
            n_answer = answer_length(sequence, self.eos_ids)
            kept = sequence[: n_answer + 1]  # through the first EOS, as an unbatched decode stops there
            logits = out_logits[i, : len(kept)]
            answer = self.tokenizer.decode(kept[:n_answer], skip_special_tokens=True).strip()
            maps = {}
            if r.capture_layers:
                visual = self._visual_positions(ids, offsets[i])
                for layer in r.capture_layers:
                    got = captured.maps.get(resolve_layer(layer, n_layers))
                    if got is not None:  # absent if the decoder bypassed the wrapper: a caller then reads it in a pass
                        maps[layer] = to_grid(got[i][visual.to(got.device)].cpu(), self.info.grid)
            results.append(Generation(answer, kept, n_answer, logits, token_scores(logits), maps))
        return results

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

    @torch.inference_mode()
    def attention_grids_batch(
        self, requests: Sequence[AttentionRequest], layers: Sequence[int], query_rows: str
    ) -> list[list[np.ndarray]]:
        """`last_input` rows: one batched forward with the configured kernel, the row read by the
        capture wrapper (no attention matrices are materialised). `answer`/`all` rows need every
        answer row's full map: eager passes with output_attentions, one request at a time (at
        LLaVA-7B size those maps are ~0.8 GB a request)."""
        if not requests:
            return []
        if query_rows == "last_input":
            return self._last_input_grids(requests, layers)
        return [self._eager_grids(r, layers, query_rows) for r in requests]

    def _last_input_grids(self, requests: Sequence[AttentionRequest], layers: Sequence[int]) -> list[list[np.ndarray]]:
        # answer ids come after the last input row: causally they cannot change it, so they are left out
        prompts = []
        for r in requests:
            ids = self.prompt_ids(self.config.prompt_template, r.question, 1)
            prompts.append((ids, self.merge_embeddings(ids, [r.features])))
        embeds, mask, positions, offsets = self._left_padded(prompts)
        resolved = [resolve_layer(layer, self.info.num_layers) for layer in layers]
        with self._configured_kernels(), capture.capture(resolved) as captured:
            self.model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1
            )
        missing = set(resolved) - set(captured.maps)
        if missing:
            raise RuntimeError(
                f"no attention captured at layers {sorted(missing)}: the decoder bypassed the capture wrapper"
            )
        grids = []
        for i, ((ids, _), offset) in enumerate(zip(prompts, offsets)):
            visual = self._visual_positions(ids, offset)
            grids.append(
                [
                    to_grid(captured.maps[layer][i][visual.to(captured.maps[layer].device)].cpu(), self.info.grid)
                    for layer in resolved
                ]
            )
        return grids

    @torch.inference_mode()
    def _eager_grids(self, r: AttentionRequest, layers: Sequence[int], query_rows: str) -> list[np.ndarray]:
        prompt = self.prompt_ids(self.config.prompt_template, r.question, 1)
        answer = torch.as_tensor(list(r.answer_ids), dtype=torch.long, device=self.device).reshape(1, -1)
        ids = torch.cat([prompt, answer], dim=1)
        embeds = self.merge_embeddings(ids, [r.features], prompt_len=prompt.shape[1])
        with self._eager_attention():
            out = self.model(
                inputs_embeds=embeds,
                attention_mask=torch.ones_like(ids),
                output_attentions=True,
                use_cache=False,
                logits_to_keep=1,
            )
        if not out.attentions or out.attentions[0] is None:
            raise RuntimeError(
                f"the model returned no attention maps (configured attention: {self.config.attn_implementation!r})"
            )
        rows = select_query_rows(prompt.shape[1], answer.shape[1], query_rows)
        visual = self._visual_positions(prompt)
        return [to_grid(visual_attention(out.attentions, layer, rows, visual), self.info.grid) for layer in layers]
