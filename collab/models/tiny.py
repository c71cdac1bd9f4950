"""Tiny LLaVA-architecture models built from configs: no download, saved with save_pretrained.

Used two ways: random-weight models for tests (equivalence of the split path with
`model.generate`), and the architecture of the embedded default model that the project trains
and ships. Whatever is built here loads back through the same `from_pretrained` code path as
LLaVA-1.5 (`collab.backends.llava.LlavaBackend.from_pretrained`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "image": "<image>"}
# Words of the LLaVA-style prompt templates and the generic prompt (lower-cased by the tokenizer).
PROMPT_WORDS = (
    "user : assistant answer the question using a single word or phrase . "
    "write a general description of the image"
).split()


@dataclass
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA; the defaults are small enough for CPU tests."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 64
    max_positions: int = 512
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    image_mean: Sequence[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: Sequence[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


# The integer sizes of TinyLlavaSpec that the command line exposes.
SIZE_FIELDS = ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads", "text_hidden",
               "text_layers", "text_heads", "text_kv_heads", "text_intermediate")


def build_tokenizer(words: Sequence[str]):
    """A word-level tokenizer (lower-cased, punctuation split off) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk", "image")]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for word in list(PROMPT_WORDS) + [w.lower() for w in words]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos']} $A", special_tokens=[(SPECIAL_TOKENS["bos"], vocab[SPECIAL_TOKENS["bos"]])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=[SPECIAL_TOKENS["image"]],
    )
    return wrapped


def build_tiny_llava(tokenizer, spec: TinyLlavaSpec | None = None, seed: int = 0):
    """A randomly initialised LlavaForConditionalGeneration sized by `spec`, eager attention."""
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = spec or TinyLlavaSpec()
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy=spec.vision_feature_select_strategy,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()


def build_image_processor(spec: TinyLlavaSpec):
    """CLIP-style preprocessing at the tiny encoder's resolution (identity resize for exact sizes)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
        do_convert_rgb=True,
    )


def save_tiny_llava(out_dir: str | Path, model, tokenizer, image_processor) -> Path:
    """Write weights, config, tokenizer, preprocessor and a LlavaProcessor config, so that
    from_pretrained(out_dir) loads each, LlavaProcessor included (with the settings that expand
    <image> to this model's visual-token count: plain transformers users get the same prompt)."""
    from transformers import LlavaProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    cfg = model.config
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.vision_config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token
        image_token=tokenizer.convert_ids_to_tokens(cfg.image_token_id),
    ).save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json too, for AutoImageProcessor on its own
    return out


def make_random_tiny_llava(out_dir: str | Path, words: Sequence[str] = (), spec: TinyLlavaSpec | None = None, seed: int = 0) -> Path:
    """Build and save a random tiny model (tests, smoke runs)."""
    spec = spec or TinyLlavaSpec()
    words = list(words) or default_words()
    tokenizer = build_tokenizer(words)
    model = build_tiny_llava(tokenizer, spec, seed)
    return save_tiny_llava(out_dir, model, tokenizer, build_image_processor(spec))


def default_words() -> list[str]:
    """A small vocabulary for random test models."""
    colors = "red green blue yellow purple orange".split()
    shapes = "circle square triangle diamond".split()
    return colors + shapes + [str(d) for d in range(10)] + "what number is in color shape how many ?".split()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build and save a RANDOM-weight tiny LLaVA (for tests and smoke runs).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    d = TinyLlavaSpec()
    for name in SIZE_FIELDS:
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                            help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.image_size % args.patch_size:
        parser.error("--image-size must be a multiple of --patch-size")
    if args.vision_hidden % args.vision_heads or args.text_hidden % args.text_heads or args.text_heads % args.text_kv_heads:
        parser.error("hidden sizes must divide by their head counts, and --text-heads by --text-kv-heads")
    spec = TinyLlavaSpec(**{k: getattr(args, k) for k in SIZE_FIELDS})
    path = make_random_tiny_llava(args.out, spec=spec, seed=args.seed)
    print(f"saved random tiny LLaVA to {path}")


if __name__ == "__main__":
    main()
