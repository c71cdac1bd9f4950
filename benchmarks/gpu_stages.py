"""Our split stages vs a plain `model.generate`, on one accelerator, for a LLaVA-1.5-7B- or Qwen2.5-VL-7B-shaped model.

    python -m benchmarks.gpu_stages --shape llava-1.5-7b --device cuda --dtype float16 --out DIR
    python -m benchmarks.gpu_stages --shape qwen2.5-vl-7b --device cuda --dtype bfloat16 --out DIR
    python -m benchmarks.gpu_stages --shape tiny --device cpu --dtype float32 --repeats 2   # smoke
    python -m benchmarks.gpu_stages --shape tiny-qwen --device cpu --dtype float32 --repeats 2

Qwen2.5-VL-7B: its published config (a 32-block windowed ViT, 2 x 2 merge, a 28-layer 3584-wide
decoder with multimodal rotary positions); global images at 256 visual tokens with the photo's
aspect ratio (`model.max_visual_tokens`), local crops at 448 px (256 tokens).

No Ray and no download: the model is built from LLaVA-1.5-7B's configuration (CLIP ViT-L/14 at
336 px -> 576 visual tokens, a 32-layer 4096-wide Llama decoder, vocabulary 32,064) with RANDOM
weights, directly on the device. Random weights give meaningless answers but the same shapes, so
the same arithmetic and memory traffic as the real model; greedy decoding of a random model almost
never emits EOS, so every generation runs exactly --max-new-tokens steps and timings compare.

What runs, per synthetic query (the same for every --attn variant):
- ours: the reference pipeline with policy `always` (edge JPEG + server decode, encode global,
  first pass from merged embeddings, attention read: two forward passes with attention maps,
  RoI search, edge crop, encode local, refined pass from global + local tokens);
- baseline: `model.generate(input_ids, pixel_values)` on the same global image and prompt, what a
  plain transformers user runs for one answer at the global resolution.
Prints p50 latency per stage, decode tokens/s, peak device memory per path, and whether our
first-pass tokens equal the baseline's (the split path must be the model's own function); writes
the same to DIR/gpu_stages.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = ("llava-1.5-7b", "tiny", "qwen2.5-vl-7b", "tiny-qwen")
QWEN_SHAPES = {"qwen2.5-vl-7b": 17, "tiny-qwen": -1}  # attention layer (configs/qwen2.5-vl-7b.yaml's)


def build_config(shape: str, image_token_id: int, pad_token_id: int, bos: int, eos: int):
    """LlavaConfig of llava-hf/llava-1.5-7b-hf (its published config.json values), or a tiny one."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if shape == "llava-1.5-7b":
        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        )
        layer = 14  # ViCrop's attention layer for LLaVA-1.5
    elif shape == "tiny":
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
            projection_dim=32,
        )
        text = LlamaConfig(
            vocab_size=32064,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        )
        layer = 1
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    text.bos_token_id, text.eos_token_id, text.pad_token_id = bos, eos, pad_token_id
    text.tie_word_embeddings = False
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return config, layer


def build_tokenizer(vocab_size: int):
    """Our word-level tokenizer (prompt and benchmark words) padded with filler words to the
    model's vocabulary, so every id a random model emits decodes to something."""
    from collab.data.synthetic import VOCABULARY
    from collab.models.tiny import build_tokenizer as word_tokenizer

    base = word_tokenizer(VOCABULARY)
    filler = [f"w{i}" for i in range(vocab_size - len(base))]
    return word_tokenizer(list(VOCABULARY) + filler)


def build_qwen_backend(shape: str, device: str, dtype: str, attn: str, max_new_tokens: int, seed: int):
    """A random Qwen2.5-VL of the shape, on the device, behind our QwenVLBackend (native-resolution global)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from collab.backends.hf import _DTYPES
    from collab.backends.qwen_vl import QwenVLBackend
    from collab.config import ModelConfig
    from collab.data.synthetic import VOCABULARY
    from collab.models.tiny_qwen import (
        QWEN2_5_VL_7B,
        QWEN_PROMPT,
        QWEN_REFINE_PROMPT,
        build_qwen_tokenizer,
        qwen_vl_config,
        set_generation_ids,
    )

    big = shape == "qwen2.5-vl-7b"
    vocab = 152064 if big else 0
    words = list(VOCABULARY)
    tokenizer = build_qwen_tokenizer(words + [f"w{i}" for i in range(max(0, vocab - len(words) - 16))])
    shape_cfg = QWEN2_5_VL_7B if big else {}
    config, cls = qwen_vl_config(tokenizer, text=shape_cfg.get("text"), vision=shape_cfg.get("vision"))
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=_DTYPES[dtype], attn_implementation=attn)
    set_generation_ids(model, tokenizer)
    processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2)
    model_cfg = ModelConfig(
        path=f"random-{shape}",
        family="qwen_vl",
        encoder_size=448 if big else 112,
        max_visual_tokens=256 if big else 24,
        device=device,
        dtype=dtype,
        attn_implementation=attn,
        max_new_tokens=max_new_tokens,
        prompt_template=QWEN_PROMPT,
        refine_template=QWEN_REFINE_PROMPT,
    )
    return QwenVLBackend(model.eval(), tokenizer, processor, model_cfg, name=f"random-{shape}"), QWEN_SHAPES[shape]


def build_backend(shape: str, device: str, dtype: str, attn: str, max_new_tokens: int, seed: int):
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaForConditionalGeneration

    from collab.backends.hf import _DTYPES
    from collab.backends.llava import LlavaBackend
    from collab.config import ModelConfig

    if shape in QWEN_SHAPES:
        return build_qwen_backend(shape, device, dtype, attn, max_new_tokens, seed)
    probe = build_config(shape, 0, 0, 0, 0)[0]
    tokenizer = build_tokenizer(probe.text_config.vocab_size)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config, layer = build_config(
        shape, image_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 7B fp32 init on the host would take minutes
        model = LlavaForConditionalGeneration._from_config(config, dtype=_DTYPES[dtype], attn_implementation=attn)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    side = config.vision_config.image_size
    processor = CLIPImageProcessor(  # LLaVA-1.5's: CLIP mean/std, resize + centre crop to the tower's side
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    model_cfg = ModelConfig(
        path=f"random-{shape}", device=device, dtype=dtype, attn_implementation=attn, max_new_tokens=max_new_tokens
    )
    return LlavaBackend(model, tokenizer, processor, model_cfg, name=f"random-{shape}"), layer


def p50(values):
    return statistics.median(values) if values else float("nan")


class Device:
    """Peak memory and the card's name on CUDA; no-ops elsewhere (synchronising is the backend's)."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self):
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def name(self):
        return torch.cuda.get_device_name(self.device) if self.cuda else "cpu"


def baseline_generate(backend, global_image, question, max_new_tokens):
    """One plain transformers call, as the model cards run it: expanded prompt ids + pixels (and,
    for Qwen-VL, the image grid the processor reports)."""
    pixels = backend.preprocess([global_image])
    extra = {}
    if hasattr(pixels, "grid_thw"):  # Qwen-VL
        t, h, w = pixels.grid_thw[0].tolist()
        ids = backend.prompt_ids(backend.config.prompt_template, question, 1, [t * h * w // backend.merge**2])
        extra = {"image_grid_thw": pixels.grid_thw, "mm_token_type_ids": (ids == backend.image_token_id).int()}
        pixels = pixels.pixel_values
    else:
        ids = backend.prompt_ids(backend.config.prompt_template, question, 1)
    with torch.inference_mode():
        out = backend.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            **extra,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=backend.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def measure(backend, layer, items, warmup, max_new_tokens, dev: Device) -> dict:
    """Run both paths over `items` (the first `warmup` untimed); return the figures of one variant."""
    from collab.config import AttentionConfig, CollabConfig, GateConfig
    from collab.imaging import make_global_image, round_trip
    from collab.pipeline import ReferencePipeline

    config = CollabConfig(
        model=backend.config, attention=AttentionConfig(layer=layer), gate=GateConfig(policy="always")
    )
    pipeline = ReferencePipeline(backend, config)

    base_ms, base_tokens, base_ids = [], [], []
    dev.reset_peak()
    for i, item in enumerate(items):
        global_image, _ = make_global_image(item.image, backend.info.global_size(item.image.size), "resize")
        global_image = round_trip(global_image, "jpeg", config.imaging.jpeg_quality)  # as ours sees it
        backend.synchronize()
        start = time.perf_counter()
        ids = baseline_generate(backend, global_image, item.question, max_new_tokens)
        backend.synchronize()
        if i >= warmup:
            base_ms.append((time.perf_counter() - start) * 1000)
            base_tokens.append(len(ids))
        base_ids.append(ids)
    base_peak = dev.peak_gib()

    # First pass alone (gate never fires): no attention read, so no kernel switch in between.
    never_ms = []
    for i, item in enumerate(items):
        record = pipeline.run(
            item.image, item.question, question_id=item.question_id, policy=pipeline.policy(name="never")
        )
        if i >= warmup:
            never_ms.append(
                record.times_ms["edge_global"] + record.times_ms["encode_global"] + record.times_ms["first_pass"]
            )

    stage_ms: dict[str, list[float]] = {}
    total_ms, first_tokens, first_ms, same = [], [], [], 0
    dev.reset_peak()
    for i, item in enumerate(items):
        backend.synchronize()
        start = time.perf_counter()
        record = pipeline.run(item.image, item.question, question_id=item.question_id)
        backend.synchronize()
        same += record.first_token_ids == base_ids[i]
        if i >= warmup:
            total_ms.append((time.perf_counter() - start) * 1000)
            for name, ms in record.times_ms.items():
                stage_ms.setdefault(name, []).append(ms)
            first_tokens.append(len(record.first_token_ids))
            first_ms.append(record.times_ms["first_pass"])
    ours_peak = dev.peak_gib()

    return {
        "baseline_generate": {
            "p50_ms": p50(base_ms),
            "tokens_per_s": sum(base_tokens) / (sum(base_ms) / 1000),
            "peak_memory_gib": base_peak,
        },
        "ours": {
            "p50_ms_per_stage": {k: p50(v) for k, v in stage_ms.items()},
            "p50_ms_first_pass_path": p50(
                [
                    a + b + c
                    for a, b, c in zip(stage_ms["edge_global"], stage_ms["encode_global"], stage_ms["first_pass"])
                ]
            ),
            # the same work as the baseline's one call (encode + prefill + decode), edge excluded
            "p50_ms_encode_plus_first_pass": p50(
                [a + b for a, b in zip(stage_ms["encode_global"], stage_ms["first_pass"])]
            ),
            "p50_ms_first_pass_path_gate_never": p50(never_ms),
            "p50_ms_total_with_refine": p50(total_ms),
            "first_pass_tokens_per_s": sum(first_tokens) / (sum(first_ms) / 1000),  # prefill + decode, no encode
            "peak_memory_gib": ours_peak,
        },
        "first_pass_tokens_equal_baseline": f"{same}/{len(items)}",
    }


def encoder_batching(backend, items, batch: int, rounds: int) -> dict:
    """Vision-tower images/s one image per call vs `batch` per call: what VisionEncoder's
    @serve.batch buys on this card (the tower alone, no Serve: the GPU machine has no Ray)."""
    from benchmarks.tower import tower_rates
    from collab.imaging import make_global_image

    images = [make_global_image(it.image, backend.info.global_size(it.image.size), "resize")[0] for it in items]
    images = (images * (batch // len(images) + 1))[:batch]
    one, many = tower_rates(backend, images, batch, rounds)
    return {"batch": batch, "images_per_s_batch_1": one, f"images_per_s_batch_{batch}": many, "speedup": many / one}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Per-stage latency, tokens/s and peak memory of our split path vs plain model.generate "
        "(random weights, no download).",
    )
    parser.add_argument("--shape", choices=SHAPES, default="llava-1.5-7b", help="model configuration to build")
    parser.add_argument("--device", default="cuda", help="torch device (cuda, cuda:1, cpu)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument(
        "--attn",
        default="eager,sdpa",
        help="attention implementations to measure, comma-separated; the attention read needs eager maps, "
        "so with sdpa our backend switches to eager for that pass only",
    )
    parser.add_argument("--repeats", type=int, default=12, help="timed queries per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed queries first")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--encoder-batch",
        type=int,
        default=8,
        help="also measure the vision tower at this batch size vs one image per call (0: skip)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="directory for gpu_stages.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.encoder_batch < 0:
        parser.error("--repeats must be >= 1, --warmup and --encoder-batch >= 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (use --device cpu --shape tiny)")

    from collab.data.synthetic import generate_items

    dev = Device(args.device)
    items = list(generate_items(4242, args.warmup + args.repeats))
    report = {
        "shape": args.shape,
        "device": dev.name(),
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "variants": {},
    }
    import transformers

    report["transformers"] = transformers.__version__
    backend = None
    for attn in [a.strip() for a in args.attn.split(",") if a.strip()]:
        if backend is None:
            start = time.perf_counter()
            backend, layer = build_backend(args.shape, args.device, args.dtype, attn, args.max_new_tokens, args.seed)
            report["build_s"] = time.perf_counter() - start
            report["visual_tokens_per_image"] = backend.info.tokens_per_image
            report["parameters_b"] = sum(p.numel() for p in backend.model.parameters()) / 1e9
            report["weights_gib"] = sum(p.numel() * p.element_size() for p in backend.model.parameters()) / 2**30
        else:  # same weights, other kernels
            backend.set_attn_implementation(attn)
        print(f"[{attn}] measuring {args.warmup}+{args.repeats} queries ...", file=sys.stderr, flush=True)
        report["variants"][attn] = measure(backend, layer, items, args.warmup, args.max_new_tokens, dev)
    if args.encoder_batch:
        report["encoder_batching"] = encoder_batching(backend, items, args.encoder_batch, rounds=5)
        report["encoder_batching"]["attn"] = backend.config.attn_implementation

    print(json.dumps(report, indent=2))
    print(render(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_stages.json").write_text(json.dumps(report, indent=2))
    return 0


def render(report: dict) -> str:
    lines = [
        f"{report['shape']} ({report.get('parameters_b', 0):.2f} B params, {report['dtype']}) on {report['device']}, "
        f"{report['max_new_tokens']} new tokens, p50 of {report['repeats']} queries",
    ]
    for attn, v in report["variants"].items():
        b, o = v["baseline_generate"], v["ours"]
        stages = ", ".join(f"{k} {ms:.1f}" for k, ms in o["p50_ms_per_stage"].items())
        mem = lambda g: "n/a" if g is None else f"{g:.2f} GiB"  # noqa: E731
        lines += [
            f"[{attn}] baseline model.generate: p50 {b['p50_ms']:.1f} ms, {b['tokens_per_s']:.1f} tok/s, peak "
            f"{mem(b['peak_memory_gib'])}",
            f"[{attn}] ours first pass (edge+encode+decode): p50 {o['p50_ms_first_pass_path']:.1f} ms "
            f"({o['p50_ms_first_pass_path_gate_never']:.1f} ms when no query refines), "
            f"{o['first_pass_tokens_per_s']:.1f} tok/s; with refine: p50 {o['p50_ms_total_with_refine']:.1f} ms, "
            f"peak {mem(o['peak_memory_gib'])}",
            f"[{attn}] stages p50 ms: {stages}",
            f"[{attn}] first-pass tokens equal to baseline: {v['first_pass_tokens_equal_baseline']}",
        ]
    enc = report.get("encoder_batching")
    if enc:
        n = enc["batch"]
        lines.append(
            f"vision tower: {enc['images_per_s_batch_1']:.1f} images/s one per call, "
            f"{enc[f'images_per_s_batch_{n}']:.1f} at {n} per call = {enc['speedup']:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
