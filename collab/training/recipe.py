"""The training recipe: one typed file (configs/training/*.yaml) that determines the trained weights.

Read with `load_recipe(path, overrides)`; overrides come from the command line's `--set KEY=VALUE`
(dotted keys, YAML values) through the same parser as the method config. Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from collab.config import ConfigError, deep_merge, load_typed, read_yaml_mapping
from collab.models.tiny import TinyLlavaSpec

PROMPT = "USER: <image>\n{question} ASSISTANT:"
REFINE_PROMPT = "USER: <image>\n<image>\n{question} ASSISTANT:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSizes(_Strict):
    """Sizes of the tiny LLaVA (collab.models.tiny.TinyLlavaSpec)."""

    image_size: int = Field(96, ge=8)
    patch_size: int = Field(8, ge=1)
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 256
    max_positions: int = 512

    @model_validator(mode="after")
    def _divisible(self) -> ModelSizes:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if (
            self.vision_hidden % self.vision_heads
            or self.text_hidden % self.text_heads
            or self.text_heads % self.text_kv_heads
        ):
            raise ValueError("hidden sizes must divide by their head counts, and text_heads by text_kv_heads")
        if self.max_positions < 2 * self.tokens_per_image + 32:
            raise ValueError(f"max_positions must hold two images and the text (>= {2 * self.tokens_per_image + 32})")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid**2

    def spec(self) -> TinyLlavaSpec:
        return TinyLlavaSpec(**self.model_dump())


class TowerStage(_Strict):
    """Stage 1: the vision tower learns from image-level and per-patch labels (no decoder)."""

    steps: int = Field(1500, ge=0)
    batch: int = Field(48, ge=2)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    budget_s: float | None = Field(None, gt=0, description="stop at `steps` or after this many seconds")
    global_fraction: float = Field(0.5, ge=0, le=1, description="share of global images per batch (rest: crops)")
    dense_weight: float = Field(1.0, ge=0, description="weight of the per-patch colour/shape loss on global images")
    background_weight: float = Field(0.05, ge=0, description="class weight of 'no object' patches in that loss")
    object_weight: float = Field(
        1.0, ge=0, description="weight of the colour/shape loss on each object's own tokens, pooled"
    )
    legible_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of global images drawn with digits legible at the encoder's resolution; on them each "
        "object's pooled tokens also learn its digit, so that only the named object's own tokens answer "
        "'what number is in the red circle?' there (a pooled bag of objects cannot bind digit to object)",
    )
    scale_start: float = Field(2.5, gt=0, description="crop side / glyph height at the start of the scale curriculum")
    scale_end: float = Field(16.0, gt=0, description="... and at its end (RoI-sized crops)")


class VLMStage(_Strict):
    """Stage 2: the whole LLaVA on plain answers (nothing supervises attention or boxes)."""

    steps: int = Field(6000, ge=0)
    batch: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    budget_s: float | None = Field(None, gt=0)
    stop_after: int | None = Field(
        None,
        ge=0,
        description="end the stage after this many steps while the schedule still runs to steps / budget_s "
        "(a stage cut short mid-schedule, as the shipped model's first stage-2 part was)",
    )
    tower_lr_scale: float = Field(0.0, ge=0, description="tower learning rate / lr; 0 keeps the stage-1 tower frozen")
    freeze_tower_steps: int = Field(
        0,
        ge=0,
        description="the tower stays frozen for these first steps (the decoder "
        "learns to read its tokens before they move)",
    )
    warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    eos_weight: float = Field(0.2, ge=0)
    local_fraction: float = Field(0.3, ge=0, le=1, description="share of global + local batches")
    fine_fraction: float = Field(0.5, ge=0, le=1, description="share of fine (digit) questions")
    legible_fraction: float = Field(
        0.3,
        ge=0,
        le=1,
        description="share of global-only scenes drawn with digits legible at the encoder's resolution "
        "(scale augmentation: 'look at the named object, then read' is rewarded by plain answers)",
    )
    legible_fine_fraction: float = Field(0.8, ge=0, le=1, description="share of fine questions on those scenes")
    negative_fraction: float = Field(0.15, ge=0, le=1, description="crops of another object (hard negatives)")
    caption_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of global-only examples that are dense descriptions ('what objects are there?' -> "
        "'red circle blue square ...', random order; digits too where legible): after each colour the answer "
        "is that object's shape, so every object is a supervised look at the object a word names",
    )
    caption_shape_first: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of descriptions that name every object shape first ('circle red square blue'), "
        "so that shape words learn to look too (with colour looks, the two attributes meet on the named object)",
    )
    caption_object_starts: bool = Field(
        True,
        description="supervise each object's first description word; false leaves it out of the loss (a pick "
        "among the objects not yet named, which teaches the word before it to read the other objects)",
    )
    curriculum: list[tuple[int | None, int]] = Field(
        default_factory=lambda: [(200, 2), (800, 3), (None, 5)],
        description="[until_step, max objects per scene]; the last entry's step is null",
    )
    global_objects: tuple[int, int] | None = Field(
        None,
        description="[min, max] objects in global-only scenes from the first step, instead of the curriculum "
        "(training only, up to 8): with many objects a bag of every object's tokens no longer tells which "
        "shape the red one has, so answering needs the look at the named object",
    )

    @model_validator(mode="after")
    def _curriculum(self) -> VLMStage:
        from collab.data.synthetic import MAX_OBJECTS, TRAIN_MAX_OBJECTS

        steps = [until for until, _ in self.curriculum]
        if not steps or steps[-1] is not None or any(u is None for u in steps[:-1]):
            raise ValueError("curriculum: every entry but the last needs an until_step; the last one's is null")
        if any(b <= a for a, b in zip(steps[:-2], steps[1:-1])):
            raise ValueError("curriculum: until_steps must increase")
        if any(not 1 <= n <= MAX_OBJECTS for _, n in self.curriculum):
            raise ValueError(f"curriculum: objects per scene must be in 1..{MAX_OBJECTS}")
        if self.global_objects is not None:
            lo, hi = self.global_objects
            if not 1 <= lo <= hi <= TRAIN_MAX_OBJECTS:
                raise ValueError(f"global_objects: need 1 <= min <= max <= {TRAIN_MAX_OBJECTS}, got {[lo, hi]}")
        return self


class Monitor(_Strict):
    """What is measured while training (fixed items from seeds no benchmark split uses)."""

    every: int = Field(500, ge=1)
    batches: int = Field(2, ge=1, description="fixed batches per kind for accuracy and the shuffled-image gap")
    attention_items: int = Field(48, ge=0, description="fine items for the RoI hit rates (0: skip)")
    seed: int = 777_000
    maps: int = Field(4, ge=0, description="attention maps plotted per evaluation")


class Runtime(_Strict):
    """Where and how fast; does not change what is learned except through the time budgets."""

    device: str = Field("cpu", description="cpu, cuda, cuda:N, or auto")
    amp_dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int = Field(1, ge=1, description="torch threads of stage 1 (and of stage 2 unless vlm_threads)")
    vlm_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads in stage 2 (None: threads); on 2 cores stage 1 runs best at 1 (the data worker "
        "renders on the other core), stage 2 (matmul-bound) 1.37x faster at 2 (docs/embedded_model.md)",
    )
    workers: int = Field(1, ge=0, description="data-rendering processes (0: render in the training process)")
    scene_reuse: int = Field(1, ge=1, description="examples drawn from each rendered scene")


class Start(_Strict):
    """Where a plain run of the recipe begins. Any of the CLI's --from-part, --init-tower and
    --init-model replaces all of it. A path in a file is relative to that file (the loader makes it
    absolute), one given with --set relative to the working directory."""

    part: int = Field(0, ge=0, description="the first part to run (0: the whole recipe), as --from-part")
    tower: str | None = Field(None, description="a saved model directory or stage-1 checkpoint: its tower")
    model: str | None = Field(None, description="a saved model directory: every weight to start from")


class Recipe(_Strict):
    seed: int = 0
    decoder_seed: int | None = Field(
        None,
        description="seed of the fresh projector's and decoder's initial weights (None: seed; the tower's: seed)",
    )
    start: Start = Field(default_factory=Start)
    model: ModelSizes = Field(default_factory=ModelSizes)
    prompt_template: str = PROMPT
    refine_template: str = REFINE_PROMPT
    tower: TowerStage = Field(default_factory=TowerStage)
    vlm: VLMStage = Field(default_factory=VLMStage)
    monitor: Monitor = Field(default_factory=Monitor)
    runtime: Runtime = Field(default_factory=Runtime)
    continuations: list[dict] = Field(
        default_factory=list,
        description="further parts, each from the weights the previous part left (fresh optimizer and schedule), "
        "written as overrides of this recipe, e.g. {seed: 1, vlm: {steps: 793, warmup: 50}}; a part that states "
        "`tower` trains the tower further (stage 1, on the tower the part before left) before its stage 2",
    )

    @model_validator(mode="after")
    def _continuations_are_recipes(self) -> Recipe:
        self.parts()  # each part must be a valid recipe of the same model
        return self

    def parts(self) -> list[RecipePart]:
        """Stages 1 and 2 of this recipe, then each continuation as a recipe of its own (no continuations)."""
        base = self.model_dump(mode="json", exclude={"continuations"})
        parts = [RecipePart(self if not self.continuations else Recipe.model_validate(base), tower=True)]
        for i, overrides in enumerate(self.continuations, 1):
            bad = {"model", "continuations", "start", "decoder_seed"} & set(overrides)
            if bad:
                raise ValueError(f"continuations[{i - 1}]: {sorted(bad)} cannot change in a continuation")
            parts.append(RecipePart(Recipe.model_validate(deep_merge(base, overrides)), tower="tower" in overrides))
        return parts


class RecipePart(NamedTuple):
    """One part of a recipe: its stage 2 (all of the part's `vlm` fields), after a stage 1 if `tower`."""

    recipe: Recipe
    tower: bool


def read_recipe_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe file as a dict; `base: OTHER.yaml` (relative to this file) is read first and this
    file's keys are merged over it, so a variant states only what differs."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base files form a cycle")
    raw = read_yaml_mapping(path, "recipe")
    start = raw.get("start")
    if isinstance(start, dict):  # paths relative to this file, as `base` is
        for key in ("tower", "model"):
            if isinstance(start.get(key), str):
                start[key] = str((path.parent / start[key]).resolve())
    base = raw.pop("base", None)
    if base is None:
        return raw
    return deep_merge(read_recipe_file(path.parent / str(base), (*seen, path.resolve())), raw)


def load_recipe(path: str | Path | None, overrides: dict | None = None) -> Recipe:
    """A recipe from YAML (None: the defaults) with `--set` overrides; errors name the field."""
    raw = read_recipe_file(Path(path)) if path is not None else {}
    return load_typed(Recipe, raw, overrides, str(path or "<defaults>"), "recipe")
