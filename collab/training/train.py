"""Train the embedded default model (a tiny LLaVA) from scratch: stage 1 (tower), stage 2 (VLM).

    python -m collab.training --recipe configs/training/embedded.yaml --out runs/embedded

Seeded; the checkpoint is saved with save_pretrained and loads through LlavaBackend.from_pretrained.
"""

from __future__ import annotations

import json
import platform
import time
from importlib.metadata import version
from pathlib import Path

import torch

from collab.data.synthetic import VOCABULARY
from collab.models.tiny import build_image_processor, build_tiny_llava, build_tokenizer, save_tiny_llava
from collab.training.data import BatchSpec
from collab.training.loop import resolve_device
from collab.training.recipe import Recipe

STAGES = ("tower", "vlm")
TOWER_CHECKPOINT = "vision_tower_stage1.pt"
TOWER_KEYS = "model.vision_tower."
# Besides the recipe, what decides the weights: the libraries that draw the fresh weights (transformers'
# initialisers), render and encode the images (pillow, numpy) and do the arithmetic (torch, and the
# CPU kernels it picks). configs/training/constraints.txt pins the versions the documented runs used.
WEIGHT_LIBRARIES = ("torch", "transformers", "tokenizers", "pillow", "numpy")


def software() -> dict:
    """The versions and CPU kernels a run trained with, for its log: two runs of one recipe give the
    same weights only where these agree (scripts/compare_runs.py reports them)."""
    return {
        "python": platform.python_version(),
        **{name: version(name) for name in WEIGHT_LIBRARIES},
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
    }


def batch_spec(recipe: Recipe) -> BatchSpec:
    m, v = recipe.model, recipe.vlm
    return BatchSpec(
        image_size=m.image_size,
        tokens_per_image=m.tokens_per_image,
        patch_size=m.patch_size,
        prompt_template=recipe.prompt_template,
        refine_template=recipe.refine_template,
        fine_fraction=v.fine_fraction,
        negative_fraction=v.negative_fraction,
        legible_fraction=v.legible_fraction,
        legible_fine_fraction=v.legible_fine_fraction,
        caption_fraction=v.caption_fraction,
        caption_shape_first=v.caption_shape_first,
        caption_object_starts=v.caption_object_starts,
    )


def save_checkpoint(model, tokenizer, recipe: Recipe, out_dir: Path, step: int, part: int = 0) -> None:
    """save_pretrained with eager attention in the config (the served model reads attention maps)."""
    model.set_attn_implementation("eager")
    save_tiny_llava(out_dir, model, tokenizer, build_image_processor(recipe.model.spec()))
    (Path(out_dir) / "training_recipe.json").write_text(
        json.dumps({**recipe.model_dump(mode="json"), "saved_at_step": step, "stage2_part": part}, indent=2)
    )
    model.set_attn_implementation("sdpa")


def tower_state(path: Path) -> dict:
    """A vision tower's weights: a stage-1 checkpoint (.pt), or the tower of a saved model directory."""
    if Path(path).is_dir():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path).model.vision_tower.state_dict()
    return torch.load(path, map_location="cpu", weights_only=True)


class JsonlLog:
    """Training metrics, one JSON object a line, each with the seconds since the run started."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a") if path else None
        self.started = time.time()

    def __call__(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps({"elapsed_s": round(time.time() - self.started, 1), **row}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def load_saved_weights(model, model_dir: Path, tokenizer) -> None:
    """Warm start: a saved model's weights into `model` (same sizes and tokenizer, or an error that
    says what differs)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    saved_vocab = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    if saved_vocab != tokenizer.get_vocab():
        raise ValueError(f"{model_dir}: its tokenizer differs from this recipe's")
    saved = LlavaForConditionalGeneration.from_pretrained(model_dir).state_dict()
    mine = model.state_dict()
    wrong = [k for k in mine if k not in saved or saved[k].shape != mine[k].shape]
    if wrong:
        raise ValueError(f"{model_dir}: sizes differ from the recipe's model ({wrong[:3]} ...)")
    model.load_state_dict({k: saved[k] for k in mine})


def starting_point(
    recipe: Recipe, from_part: int | None = None, init_tower: Path | None = None, init_model: Path | None = None
) -> tuple[int, Path | None, Path | None]:
    """(first part, tower, model) a run starts from: the caller's, where it gives any, else the
    recipe's `start`."""
    if from_part is None and init_tower is None and init_model is None:
        start = recipe.start
        return start.part, Path(start.tower) if start.tower else None, Path(start.model) if start.model else None
    return from_part or 0, init_tower, init_model


def initial_model(tokenizer, recipe: Recipe):
    """The untrained model: the tower drawn at `seed`, the projector and decoder at `decoder_seed`
    (as a model built at that seed draws them)."""
    model = build_tiny_llava(tokenizer, recipe.model.spec(), seed=recipe.seed)
    if recipe.decoder_seed is not None and recipe.decoder_seed != recipe.seed:
        with torch.random.fork_rng(devices=[]):  # the rest of the run draws as it would without it
            drawn = build_tiny_llava(tokenizer, recipe.model.spec(), seed=recipe.decoder_seed).state_dict()
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in drawn.items() if not k.startswith(TOWER_KEYS)}, strict=False
        )
        if unexpected or not missing or any(not k.startswith(TOWER_KEYS) for k in missing):
            raise RuntimeError(f"the tower's weights are not under {TOWER_KEYS!r} in this transformers version")
    return model


def check_from_part(parts: int, from_part: int, init_model: Path | None, init_tower: Path | None = None) -> None:
    """A recipe of `parts` parts can resume at `from_part` only from what its earlier parts left: the
    model, or the tower alone where those parts trained no decoder (`vlm.steps: 0`)."""
    if not 0 <= from_part < parts:
        raise ValueError(f"from_part (--from-part) must be in 0..{parts - 1}: the recipe has {parts} parts")
    if from_part and init_model is None and init_tower is None:
        raise ValueError(
            "from_part needs init_model (--init-model), the model the recipe's parts before it left, "
            "or init_tower (--init-tower) where those parts trained the tower only"
        )


def train(
    recipe: Recipe,
    out_dir: Path,
    log_path: Path | None = None,
    stages: tuple[str, ...] = STAGES,
    init_tower: Path | None = None,
    init_model: Path | None = None,
    from_part: int | None = None,
) -> Path:
    """Run the recipe's parts (its stages, then its continuations) into out_dir, keeping to `stages`.
    Without the tower stage, `init_tower` (a stage-1 checkpoint or a saved model) provides the
    tower; `init_model` (a saved model directory) warm-starts every weight. `from_part` N resumes
    the recipe at continuation N from `init_model`, the model its parts before N left, or from
    `init_tower` when they trained the tower only. Where none of the three is given (None), the
    recipe's `start` gives them; any one given replaces all of it (from_part=0: the whole recipe).
    A part whose `vlm.steps` is 0 trains no decoder."""
    from collab.training.tower import train_tower

    from_part, init_tower, init_model = starting_point(recipe, from_part, init_tower, init_model)
    unknown = set(stages) - set(STAGES)
    if unknown or not stages:
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {stages}")
    if "tower" not in stages and "vlm" in stages and init_tower is None and init_model is None:
        raise ValueError("the vlm stage without the tower stage needs init_tower or init_model")
    parts = recipe.parts()
    check_from_part(len(parts), from_part, init_model, init_tower)
    device = resolve_device(recipe.runtime.device)
    torch.manual_seed(recipe.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(VOCABULARY)
    model = initial_model(tokenizer, recipe)
    model.set_attn_implementation("sdpa")  # fast training; the served model is loaded with eager
    log = JsonlLog(log_path)
    log(
        {
            "recipe": recipe.model_dump(mode="json"),
            "device": str(device),
            "stages": list(stages),
            "software": software(),
        }
    )
    if from_part:
        log({"from_part": from_part})
    if init_model is not None:
        load_saved_weights(model, Path(init_model), tokenizer)
        log({"init_model": str(init_model)})
    if init_tower is not None:
        model.model.vision_tower.load_state_dict(tower_state(init_tower))
        log({"init_tower": str(init_tower)})
    model.to(device)
    decoder_trained = False
    for number, (part_recipe, with_tower) in enumerate(parts[from_part:], from_part):
        if number:
            torch.manual_seed(part_recipe.seed)
        if with_tower and "tower" in stages:
            torch.set_num_threads(part_recipe.runtime.threads)
            train_tower(model, batch_spec(part_recipe), part_recipe, log, number)
            tower = {k: v.cpu() for k, v in model.model.vision_tower.state_dict().items()}
            torch.save(tower, out_dir / TOWER_CHECKPOINT)
        if "vlm" in stages and part_recipe.vlm.steps:  # steps 0: a part that trains the tower only
            from collab.training.vlm import train_vlm

            torch.set_num_threads(part_recipe.runtime.vlm_threads or part_recipe.runtime.threads)
            train_vlm(model, tokenizer, batch_spec(part_recipe), part_recipe, out_dir, log, number)
            decoder_trained = True
    if not decoder_trained:
        save_checkpoint(model, tokenizer, recipe, out_dir, 0)
    log({"done": True, "minutes": round((time.time() - log.started) / 60, 1)})
    log.close()
    return out_dir
