"""What training measures as it goes: does the model use the image, and does it look where asked?

- accuracy by pass (global only, global + local) and kind (fine, coarse) on fixed batches of
  benchmark-like scenes (no legible digits, no hard negatives), and on fine questions about scenes
  with legible digits (global only: reading the named object where it can be read);
- the shuffled-image loss gap: loss with the batch's images rolled by one example minus loss with
  the right ones (near zero: the answers ignore the image);
- first-pass localisation on fixed fine items, through the server's own code path (backend ->
  attention maps -> RoI search): per decoder layer, plain and relative attention of the last
  input row and relative attention of the question's words' rows, the share of
  RoIs on the named object (overall, on 2-object scenes where chance is about 0.5, on 4-5 objects)
  and on some object (objectness without binding), by target size, and a plot of a few maps.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from collab import stages
from collab.attention import relative_attention
from collab.backends.llava import LlavaBackend
from collab.config import AttentionConfig, ModelConfig, RoIConfig
from collab.data.synthetic import MAX_OBJECTS, generate_item, has_lookalike
from collab.eval.runner import hit, on_some_object
from collab.imaging import make_global_image, round_trip
from collab.training.data import BatchSpec, answer_loss, collate, make_example
from collab.training.loop import autocast, to_device
from collab.training.recipe import Recipe

SMALL_TARGET = 0.25  # target side / image long side below which a target counts as small (generator: 0.23-0.27)


def shuffled_pixels(batch: dict) -> torch.Tensor:
    """The batch's images rolled by one example: right questions, wrong images."""
    n = batch["n_images"]
    pv = batch["pixel_values"].reshape(-1, n, *batch["pixel_values"].shape[1:])
    return pv.roll(1, dims=0).reshape(batch["pixel_values"].shape)


def eval_batch(
    rng: np.random.Generator, spec: BatchSpec, kind: str, size: int, tokenizer, device: torch.device
) -> dict:
    """One fixed evaluation batch of `kind` examples (2-5 objects each, no hard negatives)."""
    examples = [make_example(rng, spec, int(rng.integers(2, MAX_OBJECTS + 1)), kind, tokenizer) for _ in range(size)]
    for ex in examples:
        ex["negative"] = False
    return to_device(collate(examples, spec, tokenizer.pad_token_id, tokenizer.eos_token_id), device)


@torch.no_grad()
def answer_metrics(model, tokenizer, spec: BatchSpec, recipe: Recipe) -> dict:
    """Accuracy by (pass, kind) and the shuffled-image loss gap on fixed held-out batches."""
    device = next(model.parameters()).device
    spec = replace(spec, legible_fraction=0.0, negative_fraction=0.0, caption_fraction=0.0)  # benchmark-like items
    stats: dict[str, list] = {}
    for kind in ("global", "local"):
        for i in range(recipe.monitor.batches):
            rng = np.random.default_rng([recipe.monitor.seed, i, kind == "local"])
            batch = eval_batch(rng, spec, kind, recipe.vlm.batch, tokenizer, device)
            with autocast(device, recipe.runtime.amp_dtype):
                _, per_ex, correct = answer_loss(model, batch, recipe.vlm.eos_weight)
                _, per_ex_shuf, _ = answer_loss(model, batch, recipe.vlm.eos_weight, shuffled_pixels(batch))
            for name, mask in (("fine", batch["fine"]), ("coarse", ~batch["fine"])):
                stats.setdefault(f"{kind}_{name}_acc", []).extend(correct[mask].float().tolist())
                stats.setdefault(f"{kind}_{name}_gap", []).extend((per_ex_shuf - per_ex)[mask].tolist())
    # fine questions on scenes whose digits are legible at the encoder's resolution (training only):
    # answerable from the global image by looking at the named object and reading it
    legible = replace(spec, legible_fraction=1.0, legible_fine_fraction=1.0, caption_fraction=0.0)
    batch = eval_batch(
        np.random.default_rng([recipe.monitor.seed, 0, 2]), legible, "global", recipe.vlm.batch, tokenizer, device
    )
    with autocast(device, recipe.runtime.amp_dtype):
        _, _, correct = answer_loss(model, batch, recipe.vlm.eos_weight)
    stats["global_legible_fine_acc"] = correct[batch["fine"]].float().tolist()
    if recipe.vlm.caption_fraction > 0:
        stats["global_caption_look_acc"] = caption_look_hits(model, tokenizer, spec, recipe, device)
    if recipe.vlm.caption_shape_first > 0:  # shape-first descriptions: does the shape word's row look?
        stats["global_caption_shape_look_acc"] = caption_look_hits(model, tokenizer, spec, recipe, device, True)
    return {k: float(np.mean(v)) for k, v in stats.items() if v}


def caption_look_hits(
    model, tokenizer, spec: BatchSpec, recipe: Recipe, device, shape_first: bool = False
) -> list[float]:
    """Descriptions of benchmark-like scenes (no legible digits), colour first (or shape first):
    whether each object's second word was predicted, i.e. whether the row of the word that names an
    object looks at that object."""
    spec = replace(spec, caption_fraction=1.0, caption_shape_first=1.0 if shape_first else 0.0)
    batch = eval_batch(
        np.random.default_rng([recipe.monitor.seed, 0, 3]), spec, "global", recipe.vlm.batch, tokenizer, device
    )
    with autocast(device, recipe.runtime.amp_dtype):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        ).logits
    hits = []
    for i in range(len(batch["answer_pos"])):
        start, n = int(batch["answer_pos"][i]), int(batch["answer_len"][i])
        for at in range(start + 1, start + n, 2):  # first word, second word, first word, ...
            hits.append(float(logits[i, at - 1].argmax() == batch["input_ids"][i, at]))
    return hits


def monitor_items(recipe: Recipe) -> list:
    """Fixed fine items, objects per scene cycling 2..5 (seed: the monitor's, never a benchmark's)."""
    return [
        generate_item(recipe.monitor.seed + 1, i, kind="fine", n_objects=2 + i % (MAX_OBJECTS - 1))
        for i in range(recipe.monitor.attention_items)
    ]


def in_memory_backend(model, tokenizer, recipe: Recipe) -> LlavaBackend:
    from collab.models.tiny import build_image_processor

    config = ModelConfig(
        path="<training>",
        attn_implementation="sdpa",
        prompt_template=recipe.prompt_template,
        refine_template=recipe.refine_template,
        max_new_tokens=2,
    )
    return LlavaBackend(model, tokenizer, build_image_processor(recipe.model.spec()), config, name="training")


@torch.no_grad()
def localisation_metrics(model, tokenizer, recipe: Recipe, items: list, plot_path: Path | None = None) -> dict:
    """RoI hit rates per layer: the last input row's attention, plain (`L{l}_plain_*`) and relative
    (`L{l}_rel_*`), and the question's words' rows, relative (`L{l}_qrows_*`)."""
    if not items:
        return {}
    backend = in_memory_backend(model, tokenizer, recipe)
    info = backend.info
    layers = list(range(info.num_layers))
    roi = RoIConfig()
    hits: dict[str, list[float]] = {}
    shown = []
    for item in items:
        image, _ = make_global_image(item.image, info.encoder_size)
        features = backend.encode_images([round_trip(image, "jpeg", 90)])[0]
        read = AttentionConfig(layer=0, relative=False)
        plain = stages.attention_maps(backend, features, item.question, [], read, layers)
        generic = stages.attention_maps(backend, features, read.generic_prompt, [], read, layers)
        rel = [relative_attention(q, g, read.epsilon) for q, g in zip(plain, generic)]
        # the question's own words as queries (where a look formed at the words that name the object)
        words = stages.attention_maps(
            backend, features, item.question, [], AttentionConfig(query_rows="question"), layers
        )
        n = len(item.objects)
        small = (item.target_box[2] - item.target_box[0]) < SMALL_TARGET * max(item.image.size)
        alike = has_lookalike(item.objects, item.target_box)  # a distractor shares colour or shape
        for layer, q, r, w in zip(layers, plain, rel, words):
            for mode, grid in (("plain", q), ("rel", r), ("qrows", w)):
                box = stages.locate(grid, item.image.size, info.encoder_size, "resize", roi).box
                named, some = hit(box, item.target_box), on_some_object(box, [o["box"] for o in item.objects])
                key = f"L{layer}_{mode}"
                hits.setdefault(f"{key}_hit", []).append(named)
                hits.setdefault(f"{key}_some", []).append(some)
                hits.setdefault(f"{key}_hit2" if n == 2 else f"{key}_hit45" if n >= 4 else f"{key}_hit3", []).append(
                    named
                )
                hits.setdefault(f"{key}_hit_small" if small else f"{key}_hit_large", []).append(named)
                hits.setdefault(f"{key}_hit_alike" if alike else f"{key}_hit_distinct", []).append(named)
        if len(shown) < recipe.monitor.maps:
            shown.append((image, item, plain, rel))
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    if plot_path is not None and shown:
        plot_maps(shown, layers, plot_path)
    return out


def plot_maps(shown: list, layers: list[int], path: Path) -> None:
    """Two rows per item: the global image with the named object's box, then at each layer the
    question's attention (plain) and the same divided by the generic prompt's (relative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2 * len(shown), 1 + len(layers), figsize=(2.0 * (1 + len(layers)), 2.1 * 2 * len(shown)), squeeze=False
    )
    for i, (image, item, plain, rel) in enumerate(shown):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        top[0].imshow(image)
        w, h = item.image.size
        b = item.target_box
        sx, sy = image.width / w, image.height / h
        top[0].add_patch(
            matplotlib.patches.Rectangle(
                (b[0] * sx, b[1] * sy), (b[2] - b[0]) * sx, (b[3] - b[1]) * sy, fill=False, color="white", lw=1.5
            )
        )
        top[0].set_title(item.question.replace("what number is in the ", ""), fontsize=7)
        for j, (layer, q, r) in enumerate(zip(layers, plain, rel)):
            top[j + 1].imshow(q, cmap="magma")
            top[j + 1].set_title(f"layer {layer}", fontsize=7)
            bottom[j + 1].imshow(r, cmap="magma")
            bottom[j + 1].set_title(f"layer {layer} relative", fontsize=7)
        for ax in (*top, *bottom):
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
