"""One typed configuration for the method, read from YAML.

Every knob of the two-stage protocol lives here so that the in-process pipeline, the Serve
deployments and the evaluation read the same values. A bad file fails with a message that names
the offending field (pydantic's own error paths).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ScoreKind = Literal["min_entropy", "shannon", "margin"]
PolicyName = Literal["never", "always", "random", "entropy", "adaptive"]
POLICIES: tuple[str, ...] = get_args(PolicyName)  # every CLI's choices, the API's form type, the gate
QueryRows = Literal["last_input", "answer", "all", "question"]
RowReduction = Literal["mean", "sharpest"]
HeadReduction = Literal["mean", "geometric"]

LLAVA15_PROMPT = "USER: <image>\n{question} Answer the question using a single word or phrase. ASSISTANT:"
LLAVA15_REFINE_PROMPT = (
    "USER: <image>\n<image>\n{question} Answer the question using a single word or phrase. ASSISTANT:"
)
GENERIC_PROMPT = "Write a general description of the image."


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in YAML must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which VLM to load and where to run it."""

    path: str = Field("models/collab-tiny-llava", description="Hub id or local directory for from_pretrained.")
    family: Literal["llava", "qwen_vl"] = Field(
        "llava", description="llava (LLaVA-1.5 and the embedded model) or qwen_vl (Qwen2.5-VL)"
    )
    encoder_size: int | None = Field(
        None,
        ge=28,
        description="qwen_vl: side of the square global and local images (a multiple of 28; default "
        "448); llava: set by the vision tower",
    )
    max_visual_tokens: int | None = Field(
        None,
        ge=4,
        description="qwen_vl: the global image's visual-token budget (after the 2x2 merge). Its size then keeps "
        "the original's aspect ratio, both sides multiples of patch x merge (the processor's smart_resize), and "
        "/v1/models tells the edge how to make it. None: square at encoder_size, like the local image",
    )
    device: str = Field("cpu", description="torch device string: cpu, cuda, cuda:1, mps.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    attn_implementation: Literal["eager", "sdpa"] = Field(
        "eager",
        description="Decoder kernels. eager returns attention maps; sdpa is faster on GPUs and the attention "
        "read then switches to eager for its own pass (decodes of that replica wait while it runs).",
    )
    prompt_template: str = Field(LLAVA15_PROMPT, description="First pass; one <image> placeholder, {question}.")
    refine_template: str = Field(
        LLAVA15_REFINE_PROMPT, description="Refined pass; two <image> placeholders (global, local), {question}."
    )
    image_placeholder: str = "<image>"
    max_new_tokens: int = Field(10, ge=1, le=512)
    max_question_tokens: int = Field(
        256,
        ge=1,
        le=8192,
        description="Longest question in the model's own tokens (a character limit does not bound the prompt: "
        "rare characters can become several tokens each, and the attention read holds maps of every layer).",
    )
    num_threads: int | None = Field(None, ge=1, description="torch.set_num_threads for CPU replicas.")
    local_files_only: bool = Field(True, description="Never reach a model hub at run time.")

    @model_validator(mode="after")
    def _placeholders(self) -> ModelConfig:
        if self.prompt_template.count(self.image_placeholder) != 1:
            raise ValueError(f"prompt_template must contain exactly one {self.image_placeholder}")
        if self.refine_template.count(self.image_placeholder) != 2:
            raise ValueError(f"refine_template must contain exactly two {self.image_placeholder} (global, local)")
        for name in ("prompt_template", "refine_template"):
            if "{question}" not in getattr(self, name):
                raise ValueError(f"{name} must contain {{question}}")
        if self.max_visual_tokens is not None and self.family != "qwen_vl":
            raise ValueError("max_visual_tokens is for family qwen_vl (LLaVA's tower takes one fixed square size)")
        return self


class AttentionConfig(_Strict):
    """Where attention is read: ViCrop's defaults for LLaVA-1.5 (layer 14, last input token)."""

    layer: int = Field(14, description="Decoder layer index; negative counts from the end.")
    query_rows: QueryRows = Field(
        "last_input",
        description="last_input: the token that predicts the first answer token (ViCrop); "
        "answer: the generated tokens as queries; all: both; question: every text row after the image "
        "(the question's words; the generic prompt's map is read the same way).",
    )
    heads: list[int] | None = Field(
        None,
        description="Decoder heads whose maps are averaged (None: every head). Some heads localise and others "
        "attend to the same place whatever is asked; which do is the model's, chosen on a calibration split. "
        "With last_input rows a head subset is read in a pass of its own (the prefill's capture keeps only "
        "the mean over heads).",
    )
    rows: RowReduction = Field(
        "mean",
        description="How the query rows combine: mean (ViCrop), or each head's sharpest row (its lowest-entropy "
        "map: the word that names the object, found without parsing the question). Anything but mean for rows "
        "and heads reads every head's rows in a pass of its own.",
    )
    head_reduce: HeadReduction = Field(
        "mean",
        description="How the heads combine: mean, or the geometric mean of each head's normalised map (a place "
        "must draw every head's look: the colour word's head and the shape word's agree on the object that is both).",
    )
    layer_heads: list[tuple[int, int]] | None = Field(
        None,
        description="(layer, head) pairs read together, in place of `layer` and `heads` for the RoI search: a "
        "model may put one look in one layer and another in the next (a run of the recipe put its shape word's "
        "look at layer 0 and its colour word's at layer 1). Chosen on a calibration split by "
        "`python -m collab.eval.heads`; always a per-head read.",
    )
    generic_prompt: str = GENERIC_PROMPT
    relative: bool = Field(True, description="Divide by the generic-prompt map (ViCrop's rel-att).")
    epsilon: float = Field(1e-6, gt=0, description="Added to the generic map before dividing.")

    @property
    def per_head(self) -> bool:
        """Whether the map needs every head's rows apart (not one mean over heads and rows)."""
        return self.rows != "mean" or self.head_reduce != "mean" or self.layer_heads is not None

    @field_validator("heads")
    @classmethod
    def _heads_are_indices(cls, heads: list[int] | None) -> list[int] | None:
        if heads is not None and (not heads or len(set(heads)) != len(heads) or min(heads) < 0):
            raise ValueError(f"heads must be distinct non-negative indices (or null for every head), got {heads}")
        return heads

    @field_validator("layer_heads")
    @classmethod
    def _pairs_are_distinct(cls, pairs: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if pairs is not None and (not pairs or len(set(pairs)) != len(pairs) or min(h for _, h in pairs) < 0):
            raise ValueError(f"layer_heads must be distinct (layer, head) pairs, heads non-negative, got {pairs}")
        return pairs


class AdaptiveConfig(_Strict):
    """The `adaptive` policy (collab.adaptive): the entropy gate with its threshold raised when the
    server's p95 passes its SLO, and no crop asked of an edge that cannot afford it."""

    curve: str = Field(
        "configs/calibration/default.json",
        description="calibration curve (thresholds -> refine rate) from `collab-vlm eval --synthetic SEED:N "
        "--write-curve PATH` on a calibration split; relative paths resolve against the working directory, "
        "then the repo root",
    )
    slo_p95_ms: float = Field(2000.0, gt=0, description="p95 server time per query the controller holds")
    window_s: float = Field(5.0, gt=0, description="one controller step per window of completions")
    decrease: float = Field(0.5, gt=0, lt=1, description="refine-rate cap x this per window over the SLO")
    increase: float = Field(0.05, gt=0, le=1, description="cap + this per window under headroom x SLO")
    headroom: float = Field(0.8, gt=0, lt=1, description="hold the cap while p95 is in [headroom x SLO, SLO]")
    min_rate: float = Field(0.0, ge=0, le=1, description="the cap never goes below this refine rate")


class GateConfig(_Strict):
    """When to ask the edge for a crop. `entropy` is the paper's policy; the rest are baselines."""

    policy: PolicyName = "entropy"
    score: ScoreKind = "min_entropy"
    threshold: float = Field(
        0.5, description="Refine when uncertainty >= threshold (bits for entropies, 1 - margin for margin)."
    )
    aggregation_length: int | None = Field(
        None, ge=1, description="Average over the first L answer tokens; None = all."
    )
    random_rate: float = Field(0.5, ge=0.0, le=1.0, description="Refine probability of the `random` policy.")
    seed: int = 0
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)


class RoIConfig(_Strict):
    """ViCrop's multi-scale sliding-window search."""

    ratios: list[float] = Field(default_factory=lambda: [1.0, 1.2, 1.4, 1.6, 1.8, 2.0], min_length=1)
    base_side: int | None = Field(
        None, ge=1, description="Base box side in original pixels; None = the encoder resolution."
    )

    @field_validator("ratios")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(r <= 0 for r in v):
            raise ValueError("ratios must be > 0")
        return v

    def side_for(self, encoder_size: tuple[int, int]) -> int:
        """The search's smallest box side in original pixels: base_side, else the encoder resolution."""
        return self.base_side or max(encoder_size)


class ImagingConfig(_Strict):
    """How the edge makes and encodes images."""

    global_mode: Literal["resize", "pad"] = Field(
        "resize", description="resize: stretch the original to the encoder square; pad: letterbox, keep aspect."
    )
    format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(90, ge=1, le=100)
    pad_color: tuple[int, int, int] = (0, 0, 0)


class CollabConfig(_Strict):
    """The whole method configuration."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    roi: RoIConfig = Field(default_factory=RoIConfig)
    imaging: ImagingConfig = Field(default_factory=ImagingConfig)


class _Loader(yaml.SafeLoader):
    """YAML as people write configs: `77:16` (a SEED:N split) stays a string. PyYAML follows YAML
    1.1, where it would be the base-60 integer 4636."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
    (
        "tag:yaml.org,2002:int",
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$",
        "-+0123456789",
    ),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def yaml_load(text: str):
    """yaml.safe_load without YAML 1.1's base-60 numbers (every config and `--set` value)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and field."""


def nested(flat: dict) -> dict:
    """{'attention.layer': 2, 'agents': 8} -> {'attention': {'layer': 2}, 'agents': 8}: dotted keys
    (from `--set` or from a CLI's own flags) as the nested overrides every loader merges."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key!r}: {part!r} was already set to a value, not a section")
        if isinstance(value, dict):  # a copy: later dotted keys descend into it, not into the caller's dict
            value = copy.deepcopy(value)
            value = deep_merge(node[leaf], value) if isinstance(node.get(leaf), dict) else value
        node[leaf] = value
    return out


def parse_sets(items: list[str], model_path: str | None = None) -> dict:
    """Command-line `--set` items, ['attention.layer=2', ...] -> {'attention': {'layer': 2}} (values
    parsed as YAML), plus a `--model` path, for the loaders' overrides. One parser for every config."""
    flat: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            flat[key] = yaml_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not YAML ({exc})") from None
    try:
        out = nested(flat)
    except ConfigError as exc:
        raise ConfigError(f"--set {exc}") from None
    if model_path:
        model = out.setdefault("model", {})
        if not isinstance(model, dict):
            raise ConfigError("--model conflicts with --set model=...")
        model["path"] = model_path
    return out


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict:
    """A YAML file whose top level is a mapping; ConfigError (naming the file) otherwise."""
    path = Path(path)
    try:
        raw = yaml_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def validation_message(exc: ValidationError, source: str, what: str = "configuration") -> str:
    """pydantic's errors as one line per bad field, each a dotted path."""
    lines = [f"{source}: invalid {what}"]
    for err in exc.errors():
        lines.append(f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}")
    return "\n".join(lines)


Model = TypeVar("Model", bound=BaseModel)


def load_typed(
    cls: type[Model], raw: dict, overrides: dict | None = None, source: str = "<config>", what: str = "configuration"
) -> Model:
    """The one way a config is built: a mapping (read_yaml_mapping's, or {} for the defaults), nested
    overrides merged over it, validated into `cls`; ConfigError naming each bad field otherwise."""
    if overrides:
        raw = deep_merge(raw, overrides)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, source, what)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> CollabConfig:
    """Read a YAML file into a CollabConfig. Relative model paths resolve against the repo root."""
    return load_typed(CollabConfig, read_yaml_mapping(path), overrides, str(path))


def parse_config(raw: dict, source: str = "<config>") -> CollabConfig:
    """Validate a dict; errors list each bad field as a dotted path."""
    return load_typed(CollabConfig, raw, None, source)


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
