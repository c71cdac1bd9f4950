"""Run every item once through all the paths the evaluation compares, and keep the outcomes.

Every policy's result is a pure function of these per-item outcomes (first-pass answer and
scores, refined answer from our RoI, refined answer from the ground-truth crop), because the
protocol is deterministic given the gate's decision. So one run per item serves every policy,
every threshold of the sweep and every random rate — the same numbers the pipeline would give
query by query (a test checks that equivalence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from collab import stages
from collab.backends.base import VLMBackend
from collab.config import CollabConfig
from collab.data.vqa import vqa_accuracy
from collab.geometry import Box
from collab.imaging import decode_image, full_resolution_bytes, global_payload, load_image, local_payload
from collab.policies import PolicySpec, should_refine
from collab.progress import progress
from collab.roi import box_around
from collab.uncertainty import answer_uncertainties

AGGREGATIONS = {"1": 1, "2": 2, "all": None}  # the aggregation-length ablation; the gate's own L is added


def length_key(aggregation_length: int | None) -> str:
    """Key of ItemOutcome.uncertainties for an aggregation length (None = all answer tokens)."""
    return "all" if aggregation_length is None else str(aggregation_length)


@dataclass
class EvalItem:
    """A question with its ground truth and a way to get the original image."""

    question_id: str
    question: str
    answers: list[str]
    load: Callable[[], Image.Image]
    kind: str | None = None
    target_box: list[int] | None = None
    # finer than kind: synthetic "number"/"color"/"shape"/"count", VQAv2 answer_type ("yes/no", ...)
    qtype: str | None = None
    # every annotated object in the image (synthetic data): tells a RoI on the wrong object from
    # one on background
    object_boxes: list[list[int]] | None = None
    # which of the target's attributes other objects share, collab.data.synthetic.lookalike_kind
    # (synthetic data; None: unknown)
    lookalike_kind: str | None = None

    @property
    def lookalike(self) -> bool | None:
        """Another object shares the target's colour or shape (None: unknown)."""
        return None if self.lookalike_kind is None else self.lookalike_kind != "none"


@dataclass
class ItemOutcome:
    """What happened to one item on every path; JSON-serialisable except `attention`."""

    question_id: str
    question: str
    kind: str | None
    answers: list[str]
    original_size: tuple[int, int]
    target_box: list[int] | None
    global_bytes: int
    full_bytes: int
    first_answer: str
    first_acc: float
    # uncertainties[L][kind], L in {"1", "2", "all"}; higher = more unsure
    uncertainties: dict[str, dict[str, float]]
    roi_box: list[int]
    roi_ratio: float
    local_bytes: int
    refined_answer: str
    refined_acc: float
    gt_local_bytes: int | None = None
    gt_refined_answer: str | None = None
    gt_refined_acc: float | None = None
    layer_hits: dict[int, bool] = field(default_factory=dict)
    qtype: str | None = None
    object_hit: bool | None = None  # the RoI holds the centre of SOME annotated object (None: no annotations)
    n_objects: int | None = None  # annotated objects in the image (None: no annotations)
    lookalike: bool | None = None  # another object shares the target's colour or shape (None: unknown)
    lookalike_kind: str | None = None  # which attribute it shares: colour / shape / both / none
    attention: np.ndarray | None = None  # relative map at the configured layer (kept for plots)

    def uncertainty(self, kind: str, length: str = "all") -> float:
        return self.uncertainties[length][kind]


def gt_crop_box(target: list[int], width: int, height: int, base_side: int) -> Box:
    """The oracle crop: the RoI search's smallest box that holds the target, centred on it."""
    side = max(base_side, 1.25 * max(target[2] - target[0], target[3] - target[1]))
    return box_around((target[0] + target[2]) / 2, (target[1] + target[3]) / 2, side, width, height)


def hit(box: Box | list[int], target: list[int]) -> bool:
    """RoI hit: the ground-truth box's centre lies inside the chosen box."""
    b = box if isinstance(box, Box) else Box.from_seq(box)
    return b.contains_point((target[0] + target[2]) / 2, (target[1] + target[3]) / 2)


def on_some_object(box: Box | list[int], object_boxes: list[list[int]] | None) -> bool | None:
    """Whether the box holds the centre of any annotated object (None: no annotations)."""
    return None if object_boxes is None else any(hit(box, b) for b in object_boxes)


class Evaluator:
    """Runs items through the backend with one configuration."""

    def __init__(
        self, backend: VLMBackend, config: CollabConfig, layers: list[int] | None = None, keep_attention: int = 8
    ):
        stages.check_attention_fits(config.attention, backend.info)
        self.backend = backend
        self.config = config
        self.layers = layers if layers is not None else list(range(backend.info.num_layers))
        self.keep_attention = keep_attention
        info = backend.info
        self.base_side = config.roi.side_for(info.encoder_size)

    def _send(self, payload):
        """Bytes of an edge upload and the visual tokens the server gets from it."""
        return payload.nbytes, self.backend.encode_images([decode_image(payload.data)])[0]

    def run_item(self, item: EvalItem, index: int = 0) -> ItemOutcome:
        cfg, info, backend = self.config, self.backend.info, self.backend
        original = load_image(item.load())
        size, global_size = info.encoder_size, info.global_size(original.size)
        im = cfg.imaging
        global_bytes, global_features = self._send(
            global_payload(original, global_size, im.global_mode, im.format, im.jpeg_quality, im.pad_color)
        )
        full_bytes = full_resolution_bytes(original, cfg.imaging.format, cfg.imaging.jpeg_quality)

        read_layer = {cfg.attention.layer % info.num_layers} if cfg.attention.layer_heads is None else set()
        layers = sorted(set(self.layers) | read_layer)
        gen = backend.generate([global_features], item.question, stages.capture_layers(cfg.attention, layers))
        lengths = {**AGGREGATIONS, length_key(cfg.gate.aggregation_length): cfg.gate.aggregation_length}
        uncertainties = {
            name: answer_uncertainties(gen.scores, gen.n_answer_tokens, length) for name, length in lengths.items()
        }
        answer_ids = gen.token_ids[: gen.n_answer_tokens]
        maps = (
            stages.attention_maps(
                backend, global_features, item.question, answer_ids, cfg.attention, layers, gen.attention
            )
            if layers
            else []
        )
        by_layer = dict(zip(layers, maps))
        chosen = (
            by_layer[cfg.attention.layer % info.num_layers]
            if cfg.attention.layer_heads is None
            else stages.attention_map(backend, global_features, item.question, answer_ids, cfg.attention)
        )
        roi = stages.locate(chosen, original.size, global_size, cfg.imaging.global_mode, cfg.roi, size)
        local_bytes, local_features = self._send(local_payload(original, roi.box, size, im.format, im.jpeg_quality))
        refined = stages.refined_pass(backend, global_features, local_features, item.question)

        outcome = ItemOutcome(
            question_id=item.question_id,
            question=item.question,
            kind=item.kind,
            answers=item.answers,
            original_size=original.size,
            target_box=item.target_box,
            global_bytes=global_bytes,
            full_bytes=full_bytes,
            first_answer=gen.answer,
            first_acc=vqa_accuracy(gen.answer, item.answers),
            uncertainties=uncertainties,
            roi_box=roi.box.as_list(),
            roi_ratio=roi.ratio,
            local_bytes=local_bytes,
            refined_answer=refined.answer,
            refined_acc=vqa_accuracy(refined.answer, item.answers),
            attention=chosen if index < self.keep_attention else None,
            qtype=item.qtype,
            object_hit=on_some_object(roi.box, item.object_boxes),
            n_objects=None if item.object_boxes is None else len(item.object_boxes),
            lookalike=item.lookalike,
            lookalike_kind=item.lookalike_kind,
        )
        if item.target_box is not None:
            for layer in self.layers:
                layer_roi = stages.locate(
                    by_layer[layer], original.size, global_size, cfg.imaging.global_mode, cfg.roi, size
                )
                outcome.layer_hits[layer] = hit(layer_roi.box, item.target_box)
            gt_box = gt_crop_box(item.target_box, *original.size, self.base_side)
            gt_bytes, gt_features = self._send(local_payload(original, gt_box, size, im.format, im.jpeg_quality))
            gt_refined = stages.refined_pass(backend, global_features, gt_features, item.question)
            outcome.gt_local_bytes = gt_bytes
            outcome.gt_refined_answer = gt_refined.answer
            outcome.gt_refined_acc = vqa_accuracy(gt_refined.answer, item.answers)
        return outcome

    def run(self, items: Iterable[EvalItem], total: int | None = None, desc: str = "evaluating") -> list[ItemOutcome]:
        return [self.run_item(item, i) for i, item in enumerate(progress(items, total=total, desc=desc))]


# ------------------------------------------------------------------------------ policy outcomes


def decisions(outcomes: list[ItemOutcome], spec: PolicySpec) -> np.ndarray:
    """The gate's decision for every item under `spec` (same rule as collab.policies)."""
    length = length_key(spec.aggregation_length)
    if outcomes and length not in outcomes[0].uncertainties:
        raise ValueError(
            f"outcomes hold no scores aggregated over L={spec.aggregation_length}; "
            f"evaluate with gate.aggregation_length={spec.aggregation_length}"
        )
    return np.array(
        [should_refine(spec, o.uncertainty(spec.score, length), o.question_id) for o in outcomes], dtype=bool
    )


def policy_result(outcomes: list[ItemOutcome], refine: np.ndarray) -> dict:
    """Accuracy, refine rate and bytes for a given set of per-item decisions."""
    acc = np.where(refine, [o.refined_acc for o in outcomes], [o.first_acc for o in outcomes])
    extra = np.where(refine, [o.local_bytes for o in outcomes], 0)
    global_bytes = np.array([o.global_bytes for o in outcomes])
    out = {
        "accuracy": float(acc.mean()),
        "refine_rate": float(refine.mean()),
        "extra_bytes_mean": float(extra.mean()),
        "total_bytes_mean": float((global_bytes + extra).mean()),
        "n": len(outcomes),
    }
    kinds = sorted({o.kind for o in outcomes if o.kind})
    if kinds:
        out["accuracy_by_kind"] = {k: float(np.mean([a for a, o in zip(acc, outcomes) if o.kind == k])) for k in kinds}
    return out


def synthetic_items(seed: int, n: int) -> Iterator[EvalItem]:
    from collab.data.synthetic import generate_items, lookalike_kind

    for it in generate_items(seed, n):
        yield EvalItem(
            it.question_id,
            it.question,
            it.answers,
            (lambda im=it.image: im),
            it.kind,
            it.target_box,
            it.qtype,
            [o["box"] for o in it.objects],
            lookalike_kind(it.objects, it.target_box) if it.target_box else None,
        )


def object_boxes_of(extra: dict) -> list[list[int]] | None:
    """The boxes of a record's "objects" list (our synthetic layout), or None."""
    objects = extra.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, dict) and "box" in o for o in objects):
        return None
    return [list(o["box"]) for o in objects]


def lookalike_of(extra: dict, target_box) -> str | None:
    """lookalike_kind for a record whose "objects" carry colour and shape (our layout), else None."""
    from collab.data.synthetic import lookalike_kind

    objects = extra.get("objects")
    if not target_box or object_boxes_of(extra) is None or not all("color" in o and "shape" in o for o in objects):
        return None
    return lookalike_kind(objects, list(target_box))


def dataset_items(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    from collab.data.vqa import load_dataset

    return [
        EvalItem(
            ex.question_id,
            ex.question,
            ex.answers,
            ex.load_image,
            ex.kind,
            list(ex.target_box) if ex.target_box else None,
            ex.extra.get("qtype") or ex.extra.get("answer_type"),
            object_boxes_of(ex.extra),
            lookalike_of(ex.extra, ex.target_box),
        )
        for ex in load_dataset(path, limit=limit)
    ]
