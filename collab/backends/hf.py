"""What the transformers-based backends share: loading with from_pretrained, EOS ids, the question
checks, the capture wrapper's kernel setting, the lock that the attention read's kernel switch
takes, and `TransformersBackend`, the family-independent half of a backend (batched decodes into
Generations, captured and eager attention maps)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from collab.attention import query_rows as select_query_rows
from collab.attention import resolve_layer, to_grid, visual_attention, visual_attention_rows
from collab.backends import capture
from collab.backends.base import (
    UNICODE_WHITESPACE,
    AttentionRequest,
    BackendInfo,
    DecodeRequest,
    Generation,
    InvalidQuestion,
    VLMBackend,
)
from collab.config import ModelConfig
from collab.uncertainty import answer_length, token_scores

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SharedExclusiveLock:
    """Many holders in shared mode, or one in exclusive mode; waiting exclusive holders go first.

    Decoding passes share the model; the attention read's kernel switch needs it alone (so a read
    waits for the decodes in flight, and decodes arriving meanwhile wait for the read). Not
    re-entrant: a holder must not ask again.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says where it looked."""


def resolve_model_path(path: str, search_roots: Sequence[Path] = ()) -> str:
    """A local directory (absolute, cwd-relative, or relative to one of `search_roots`) or a hub id."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        return str(candidate.resolve())
    if not candidate.is_absolute():
        for root in search_roots:
            if (root / candidate).is_dir():
                return str((root / candidate).resolve())
    return path


def load_pretrained(model_cls, config: ModelConfig, search_roots: Sequence[Path], what: str):
    """(model on its device, tokenizer, image processor, name) with from_pretrained from a local
    directory or a hub id; `local_files_only` (default on) means nothing is downloaded at run time."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    path = resolve_model_path(config.path, search_roots)
    kwargs = {"local_files_only": config.local_files_only}
    try:
        model = model_cls.from_pretrained(
            path, dtype=_DTYPES[config.dtype], attn_implementation=config.attn_implementation, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        where = f"directory {path}" if Path(path).is_dir() else f"hub id or path {path!r} (no such directory)"
        raise ModelLoadError(f"cannot load {what} from {where}: {exc}") from exc
    model.to(config.device)
    return model, tokenizer, image_processor, Path(path).name or path


def eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def control_tokens(tokenizer) -> list[str]:
    """Texts the tokenizer turns into control tokens (BOS/EOS/PAD/UNK and added special tokens), longest first."""
    return sorted({t for t in tokenizer.all_special_tokens if t and len(t) > 1}, key=len, reverse=True)


def refuse_question(
    question: str, tokenizer, config: ModelConfig, image_tokens: Sequence[str], controls: Sequence[str]
) -> None:
    """InvalidQuestion for what would change the prompt's structure: empty, image tokens, control
    tokens, more than `max_question_tokens` of the model's own tokens."""
    if not question.strip(UNICODE_WHITESPACE):
        raise InvalidQuestion("empty", "the question is empty")
    for token in image_tokens:
        if token in question:
            raise InvalidQuestion("placeholder", f"the question must not contain the image token {token!r}")
    for token in controls:
        if token in question:
            raise InvalidQuestion("special_token", f"the question must not contain the control token {token!r}")
    n = len(tokenizer(question, add_special_tokens=False)["input_ids"])
    if n > config.max_question_tokens:
        raise InvalidQuestion(
            "too_long", f"the question is {n} tokens; at most {config.max_question_tokens} are accepted"
        )


def set_capturing_attention(model, config: ModelConfig, implementation: str) -> None:
    """Decode with `implementation` ("eager" or "sdpa"): the decoder through the wrapper that can
    read the prompt's last-row attention in a prefill (collab.backends.capture), the tower as it is."""
    config.attn_implementation = implementation
    model.set_attn_implementation(
        {"text_config": capture.capturing_name(implementation), "vision_config": implementation}
    )


class TransformersBackend(VLMBackend):
    """What a backend on a transformers VLM does the same whatever the family: the kernel lock and
    switch, the templates, and turning a batched `generate`'s output (and its capture) into
    Generations, reading maps. Subclasses set model, tokenizer, config, info, eos_ids, _kernels and
    define `_visual_positions`, `_last_input_grids` (one batched forward under a capture) and
    `_eager_pass` (one request's prompt + answer with output_attentions)."""

    def __init__(self, model, tokenizer, image_processor, config: ModelConfig):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token_id = int(model.config.image_token_id)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_ids = frozenset(eos_ids(model, tokenizer))
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_ids, default=0)
        # Fast kernels (sdpa) return no attention maps: the attention read then switches the model
        # to eager for its own pass. The switch is model-wide: decoding passes hold the model
        # shared, the switched pass holds it alone.
        self._kernels = SharedExclusiveLock()
        self._control_tokens = control_tokens(tokenizer)

    def _info(
        self, name: str, encoder_size: tuple[int, int], grid: tuple[int, int], tokens_per_image: int
    ) -> BackendInfo:
        text = self.model.config.text_config
        return BackendInfo(
            model_name=name,
            encoder_size=encoder_size,
            grid=grid,
            tokens_per_image=tokens_per_image,
            num_layers=int(text.num_hidden_layers),
            num_heads=int(text.num_attention_heads),
            hidden_size=int(text.hidden_size),
            device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""),
        )

    def set_attn_implementation(self, implementation: str) -> None:
        """Decode with `implementation` ("eager" or "sdpa"). The decoder runs it through a wrapper
        that can read the prompt's last-row attention during a decode's prefill
        (collab.backends.capture); the vision tower runs it as it is."""
        set_capturing_attention(self.model, self.config, implementation)

    @property
    def _switch_for_maps(self) -> bool:
        return self.config.attn_implementation != "eager"

    def _configured_kernels(self):
        return self._kernels.shared() if self._switch_for_maps else nullcontext()

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

    def _template(self, n_images: int) -> str:
        if n_images not in (1, 2):
            raise ValueError(f"expected 1 (global) or 2 (global, local) images, got {n_images}")
        return self.config.prompt_template if n_images == 1 else self.config.refine_template

    def _visual_positions(self, prompt_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Sequence positions of the first image's visual tokens, shifted by `offset` pads."""
        raise NotImplementedError

    def _grid_of(self, features: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of one image's visual tokens (fixed unless the features carry their grid)."""
        return self.info.grid

    def _prompt(self, template: str, question: str, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Prompt ids for these images' features (their token counts, where those vary)."""
        return self.prompt_ids(template, question, len(features))

    @torch.inference_mode()
    def attention_grids_batch(
        self,
        requests: Sequence[AttentionRequest],
        layers: Sequence[int],
        query_rows: str,
        heads: Sequence[int] | None = None,
    ) -> list[list[np.ndarray]]:
        """`last_input` rows over every head: one batched forward with the configured kernel, the row
        read by the capture wrapper (no attention matrices are materialised; it keeps the mean over
        heads). Other rows, or a head subset, need full maps: eager passes with output_attentions,
        one request at a time (at LLaVA-7B size those maps are ~0.8 GB a request)."""
        if not requests:
            return []
        if query_rows == "last_input" and heads is None:
            return self._last_input_grids(requests, layers)
        return [self._eager_grids(r, layers, query_rows, heads) for r in requests]

    def _last_input_grids(self, requests: Sequence[AttentionRequest], layers: Sequence[int]) -> list[list[np.ndarray]]:
        raise NotImplementedError

    def _eager_pass(self, prompt: torch.Tensor, answer: torch.Tensor, features: torch.Tensor):
        """The model's output for prompt + answer over one image, with every layer's attention."""
        raise NotImplementedError

    @torch.inference_mode()
    def _eager_grids(
        self, r: AttentionRequest, layers: Sequence[int], query_rows: str, heads: Sequence[int] | None = None
    ) -> list[np.ndarray]:
        attentions, rows, visual, grid = self._eager_attentions(r, query_rows)
        return [to_grid(visual_attention(attentions, layer, rows, visual, heads), grid) for layer in layers]

    def _eager_attentions(self, r: AttentionRequest, query_rows: str):
        """One eager pass over prompt + answer: (every layer's attention, query rows, visual
        positions, the image's token grid)."""
        prompt = self._prompt(self.config.prompt_template, r.question, [r.features])
        answer = torch.as_tensor(list(r.answer_ids), dtype=torch.long, device=self.device).reshape(1, -1)
        with self._eager_attention():
            out = self._eager_pass(prompt, answer, r.features)
        if not out.attentions or out.attentions[0] is None:
            raise RuntimeError(
                f"the model returned no attention maps (configured attention: {self.config.attn_implementation!r})"
            )
        visual = self._visual_positions(prompt)
        rows = select_query_rows(prompt.shape[1], answer.shape[1], query_rows, int(visual.max()) + 1)
        return out.attentions, rows, visual, self._grid_of(r.features)

    @torch.inference_mode()
    def attention_rows_batch(
        self,
        requests: Sequence[AttentionRequest],
        layers: Sequence[int],
        query_rows: str,
        heads: Sequence[int] | None = None,
    ) -> list[list[np.ndarray]]:
        """Eager passes with output_attentions, one request at a time, as for a head subset."""
        out = []
        for r in requests:
            attentions, rows, visual, grid = self._eager_attentions(r, query_rows)
            out.append(
                [
                    visual_attention_rows(attentions, layer, rows, visual, heads).numpy().reshape(-1, len(rows), *grid)
                    for layer in layers
                ]
            )
        return out

    def _capture_layers(self, layers: Sequence[int]) -> list[int]:
        return sorted({resolve_layer(layer, self.info.num_layers) for layer in layers})

    def _captured_grids(
        self,
        captured: capture.Capture,
        layers: Sequence[int],
        row: int,
        prompt_ids: torch.Tensor,
        offset: int,
        grid: tuple[int, int],
    ) -> dict[int, np.ndarray]:
        """Row `row`'s captured maps at `layers` (keys as given), as grids; a layer the decoder did
        not record (it bypassed the wrapper) is left out, for the caller to read in a pass."""
        visual = self._visual_positions(prompt_ids, offset)
        grids = {}
        for layer in layers:
            got = captured.maps.get(resolve_layer(layer, self.info.num_layers))
            if got is not None:
                grids[layer] = to_grid(got[row][visual.to(got.device)].cpu(), grid)
        return grids

    def _grids_in_order(
        self,
        captured: capture.Capture,
        layers: Sequence[int],
        row: int,
        prompt_ids: torch.Tensor,
        offset: int,
        grid: tuple[int, int],
    ) -> list[np.ndarray]:
        """One grid per entry of `layers`, in order; each must have been captured."""
        grids = self._captured_grids(captured, layers, row, prompt_ids, offset, grid)
        return [grids[layer] for layer in layers]

    def _require_captured(self, captured: capture.Capture, layers: Sequence[int]) -> None:
        missing = set(self._capture_layers(layers)) - set(captured.maps)
        if missing:
            raise RuntimeError(
                f"no attention captured at layers {sorted(missing)}: the decoder bypassed the capture wrapper"
            )

    def _generations(
        self,
        new_tokens: torch.Tensor,
        step_logits: Sequence[torch.Tensor],
        requests: Sequence[DecodeRequest],
        prompt_ids: Sequence[torch.Tensor],
        offsets: Sequence[int],
        captured: capture.Capture,
    ) -> list[Generation]:
        """A batched greedy decode's rows as Generations, each trimmed at its own first EOS (as an
        unbatched decode stops there), with the captured question maps it asked for."""
        out_logits = torch.stack(list(step_logits), dim=1).float().cpu()  # (batch, steps, vocab)
        results = []
        for i, (r, ids) in enumerate(zip(requests, prompt_ids)):
            sequence = new_tokens[i].tolist()
            n_answer = answer_length(sequence, self.eos_ids)
            kept = sequence[: n_answer + 1]
            logits = out_logits[i, : len(kept)]
            answer = self.tokenizer.decode(kept[:n_answer], skip_special_tokens=True).strip()
            grid = self._grid_of(r.features[0])
            maps = (
                self._captured_grids(captured, r.capture_layers, i, ids, offsets[i], grid) if r.capture_layers else {}
            )
            results.append(Generation(answer, kept, n_answer, logits, token_scores(logits), maps))
        return results
