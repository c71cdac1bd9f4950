"""What the transformers-based backends share: loading with from_pretrained, EOS ids, the question
checks, the capture wrapper's kernel setting, and the lock that the attention read's kernel switch takes."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from collab.backends import capture
from collab.backends.base import UNICODE_WHITESPACE, InvalidQuestion
from collab.config import ModelConfig

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
