"""Tiny random Qwen2.5-VL and Qwen3-VL models built from configs (no download), saved with save_pretrained:
what the Qwen-VL backend's tests load through the same from_pretrained path as a real checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5-VL's chat format (system prompt, one user turn with the image first), for the tiny models
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_PROMPT = "<|im_start|>system\nyou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image>{question}<|im_end|>\n<|im_start|>assistant\n"
QWEN_REFINE_PROMPT = (
    "<|im_start|>system\nyou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image><image>{question}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def build_qwen_tokenizer(words: Sequence[str]):
    """Word-level tokenizer with Qwen's special tokens (and its chat template)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(("<unk>", *QWEN_SPECIALS))}
    for word in ["system", "user", "assistant", "you", "are", "a", "helpful", *[w.lower() for w in words]]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIALS[1:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


FAMILIES = ("qwen2_5_vl", "qwen3_vl")


# Qwen2.5-VL-7B-Instruct's published config.json (text and vision), for shape-true random models
QWEN2_5_VL_7B = {
    "text": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}


def qwen_vl_config(
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    vision_hidden: int = 32,
    kind: str = "qwen2_5_vl",
    text: dict | None = None,
    vision: dict | None = None,
):
    """(config, model class) of a Qwen2.5-VL (14 px patches) or Qwen3-VL (16 px, deepstack features):
    tiny by default, or any shape through `text`/`vision` overrides (e.g. QWEN2_5_VL_7B)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    if kind not in FAMILIES:
        raise ValueError(f"kind must be one of {FAMILIES}, got {kind!r}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = 16
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    if kind == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": max(1, hidden // head_dim // 2),
        "rope_parameters": rope,
        "max_position_embeddings": 4096,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": 2,
        "out_hidden_size": hidden,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    tokens = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if kind == "qwen2_5_vl":
        vision_config |= {"patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1]}
    else:
        text_config |= {"head_dim": head_dim}
        vision_config |= {"patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    text_config |= text or {}
    vision_config |= vision or {}
    if kind == "qwen2_5_vl":
        return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **tokens), (
            Qwen2_5_VLForConditionalGeneration
        )
    return Qwen3VLConfig(text_config=text_config, vision_config=vision_config, **tokens), Qwen3VLForConditionalGeneration


def build_tiny_qwen_vl(
    tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, vision_hidden: int = 32, kind: str = "qwen2_5_vl"
):
    """Random weights from a tiny config (`qwen_vl_config`)."""
    import torch

    config, cls = qwen_vl_config(tokenizer, hidden, layers, vision_hidden, kind)
    torch.manual_seed(seed)
    model = cls(config).eval()
    set_generation_ids(model, tokenizer)
    return model


def set_generation_ids(model, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")


def make_random_tiny_qwen_vl(
    out_dir: str | Path, words: Sequence[str] = (), seed: int = 0, max_side: int = 448, kind: str = "qwen2_5_vl"
) -> Path:
    """Build and save a random tiny Qwen2.5-VL or Qwen3-VL (model, tokenizer with chat template, image processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from collab.models.tiny import default_words

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer(list(words) or default_words())
    model = build_tiny_qwen_vl(tokenizer, seed, kind=kind)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    patch = int(model.config.vision_config.patch_size)
    Qwen2VLImageProcessorPil(
        min_pixels=(2 * patch) ** 2, max_pixels=max_side * max_side, patch_size=patch, merge_size=2, temporal_patch_size=2
    ).save_pretrained(out)
    return out
