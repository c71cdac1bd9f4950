"""VLM backends behind one interface (`VLMBackend`); LLaVA on transformers first."""

from collab.backends.base import BackendInfo, Generation, VLMBackend
from collab.backends.hf import ModelLoadError
from collab.backends.llava import LlavaBackend


def load_backend(model_config, search_roots=()) -> VLMBackend:
    """The backend for `model_config.family`, loaded with from_pretrained."""
    if model_config.family == "llava":
        return LlavaBackend.from_pretrained(model_config, search_roots)
    if model_config.family == "qwen_vl":
        from collab.backends.qwen_vl import QwenVLBackend

        return QwenVLBackend.from_pretrained(model_config, search_roots)
    raise ValueError(f"unknown model family {model_config.family!r}")


__all__ = ["BackendInfo", "Generation", "LlavaBackend", "ModelLoadError", "VLMBackend", "load_backend"]
