"""Training batches for the embedded model, rendered on the fly from the synthetic generator.

Two kinds of batch, mirroring the two passes the server runs:

- ``global``: [global image] + question -> answer. Fine questions are (nearly) unanswerable here;
  training on them anyway teaches the model to be *unsure* when the detail is missing, which is
  what the entropy gate reads.
- ``local``: [global, local] + question -> answer, the local image being a crop of the ORIGINAL
  around the question's object, at the RoI search's box sizes (encoder side x 1..2) with its
  centre jittered, or (hard negatives) around another object so that a wrong crop is not read.

Images go through the same JPEG round trip as at inference. Nothing here supervises attention or
boxes: the boxes only decide which crop the edge would send.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from collab.backends.llava import expand_prompt
from collab.data.synthetic import Question, Scene, position_questions, questions_for_scene, render_scene
from collab.imaging import crop_local_image, make_global_image, round_trip
from collab.roi import box_around


@dataclass(frozen=True)
class BatchSpec:
    """What the stream needs to build token sequences and images."""

    image_size: int
    tokens_per_image: int
    prompt_template: str
    refine_template: str
    patch_size: int = 8
    image_token: str = "<image>"
    placeholder: str = "<image>"
    jpeg_quality: int = 90
    fine_fraction: float = 0.5
    negative_fraction: float = 0.15
    jitter: float = 0.3  # crop centre offset, as a fraction of the crop side
    image_mean: float = 0.5
    image_std: float = 0.5
    # Scale augmentation: this fraction of global-only examples is drawn from a SMALL original
    # (side in small_scene_side px, <= 3 objects), whose downscale keeps the digit and the shape
    # legible. Real photos hold objects at every scale; here it means the first pass learns, from
    # answers alone, to look at the object the question names, and keeps looking there when the
    # detail is too small to read (which is what the attention read relies on).
    small_scene_fraction: float = 0.0
    small_scene_side: tuple[int, int] = (208, 256)
    # This fraction of global-only examples asks a training-only "where is the red circle?"
    # question instead (collab.data.synthetic.POSITION_TEMPLATE); 0 leaves the stream unchanged.
    position_fraction: float = 0.0


def to_pixels(images: list[Image.Image], mean: float, std: float) -> torch.Tensor:
    """CLIP-style normalisation (rescale 1/255, then (x - mean) / std), as the saved processor does."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy((arr - mean) / std).permute(0, 3, 1, 2).contiguous()


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    return round_trip(image, "jpeg", quality)


def pick_question(rng: np.random.Generator, scene: Scene, fine_fraction: float, asked: set[str] | None = None) -> Question:
    questions = questions_for_scene(scene)
    if asked:
        questions = [q for q in questions if q.question not in asked] or questions
    fine = [q for q in questions if q.kind == "fine"]
    coarse = [q for q in questions if q.kind != "fine"]
    pool = fine if (fine and (not coarse or rng.random() < fine_fraction)) else coarse
    return pool[int(rng.integers(len(pool)))]


def crop_box(rng: np.random.Generator, scene: Scene, target: list[int] | None, spec: BatchSpec, negative: bool):
    """A crop around the target object (or, for negatives and scene-wide questions, another one)."""
    others = [o.box for o in scene.objects if list(o.box) != list(target or [])]
    if target is None or (negative and others):
        candidates = others or [o.box for o in scene.objects]
        target = candidates[int(rng.integers(len(candidates)))]
    side = spec.image_size * rng.uniform(1.0, 2.0)
    cx = (target[0] + target[2]) / 2 + rng.uniform(-spec.jitter, spec.jitter) * side
    cy = (target[1] + target[3]) / 2 + rng.uniform(-spec.jitter, spec.jitter) * side
    return box_around(cx, cy, side, scene.width, scene.height)


def small_scene(rng: np.random.Generator, n_objects: int, sides: tuple[int, int]) -> Scene:
    """A square scene of side in `sides`; fewer objects if they do not fit."""
    side = int(rng.integers(sides[0], sides[1] + 1))
    for n in range(min(n_objects, 3), 0, -1):
        try:
            return render_scene(rng, n_objects=n, size=(side, side))
        except RuntimeError:  # could not place n objects: try fewer
            continue
    raise RuntimeError(f"no object fits a {side}x{side} scene")


def draw_scene(rng: np.random.Generator, spec: BatchSpec, n_objects: int, kind: str) -> Scene:
    """The scene an example is asked about (a small original for some global-only examples)."""
    if kind == "global" and spec.small_scene_fraction and rng.random() < spec.small_scene_fraction:
        return small_scene(rng, n_objects, spec.small_scene_side)
    return render_scene(rng, n_objects=n_objects)


def global_view(scene: Scene, spec: BatchSpec) -> Image.Image:
    """The global image the edge would send for this scene, after the JPEG round trip."""
    size = (spec.image_size, spec.image_size)
    return jpeg_round_trip(make_global_image(scene.image, size)[0], spec.jpeg_quality)


def make_example(rng: np.random.Generator, spec: BatchSpec, n_objects: int, kind: str, tokenizer) -> dict:
    """One (input_ids, answer id, images) example of the given batch kind."""
    scene = draw_scene(rng, spec, n_objects, kind)
    return example_from_scene(rng, spec, scene, global_view(scene, spec), kind, tokenizer)


def example_from_scene(rng: np.random.Generator, spec: BatchSpec, scene: Scene, global_image: Image.Image, kind: str,
                       tokenizer, asked: set[str] | None = None) -> dict:
    """One example about a rendered scene; `asked` holds questions already used on it (avoided
    while others remain, so that reusing a scene does not repeat an example)."""
    question = None
    if kind == "global" and spec.position_fraction and rng.random() < spec.position_fraction:
        options = [q for q in position_questions(scene) if not asked or q.question not in asked]
        question = options[int(rng.integers(len(options)))] if options else None
    if question is None:
        question = pick_question(rng, scene, spec.fine_fraction, asked)
    if asked is not None:
        asked.add(question.question)
    size = (spec.image_size, spec.image_size)
    images = [global_image]
    negative = False
    if kind == "local":
        negative = question.kind == "fine" and rng.random() < spec.negative_fraction
        box = crop_box(rng, scene, question.target_box, spec, negative)
        images.append(jpeg_round_trip(crop_local_image(scene.image, box, size), spec.jpeg_quality))
    template = spec.prompt_template if kind == "global" else spec.refine_template
    text = expand_prompt(template, question.question, len(images), spec.placeholder, spec.image_token, spec.tokens_per_image)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    answer = tokenizer.convert_tokens_to_ids(question.answer)
    return {"ids": ids, "answer": answer, "images": images, "kind": question.kind, "negative": negative,
            "qtype": question.qtype}


def collate(examples: list[dict], spec: BatchSpec, pad_id: int, eos_id: int) -> dict:
    """Right-padded ids with the answer and EOS appended; labels only on those two tokens."""
    seqs = [ex["ids"] + [ex["answer"], eos_id] for ex in examples]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    answer_pos = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        answer_pos[i] = len(s) - 2
    images = [im for ex in examples for im in ex["images"]]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_pos": answer_pos,  # position of the answer token; logits at answer_pos - 1 predict it
        "pixel_values": to_pixels(images, spec.image_mean, spec.image_std),
        "n_images": len(examples[0]["images"]),
        "fine": torch.tensor([ex["kind"] == "fine" for ex in examples]),
        "negative": torch.tensor([ex["negative"] for ex in examples]),
    }


def worker_shard() -> tuple[int, int]:
    """(this DataLoader worker's index, number of workers); (0, 1) in the main process.

    Streams give batch k to worker k mod n and the DataLoader returns batches in task order, so
    stage 2's batch sequence is the same for any number of workers. (Stage 1's crop scale follows
    a live curriculum that workers read when they render, so its batches also depend on timing.)"""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class BatchStream(torch.utils.data.IterableDataset):
    """Endless batches; the curriculum (objects per scene) follows the batch counter.

    `scene_reuse` > 1 asks up to that many questions about each rendered scene (rendering is most
    of a batch's cost; a GPU trainer would otherwise wait on it)."""

    def __init__(self, spec: BatchSpec, tokenizer, batch_size: int, seed: int, curriculum, local_fraction: float,
                 start: int = 0, scene_reuse: int = 1):
        super().__init__()
        if scene_reuse < 1:
            raise ValueError(f"scene_reuse must be >= 1, got {scene_reuse}")
        self.spec, self.tokenizer, self.batch_size = spec, tokenizer, batch_size
        self.seed, self.curriculum, self.local_fraction, self.start = seed, curriculum, local_fraction, start
        self.scene_reuse = scene_reuse

    def max_objects(self, step: int) -> int:
        for until, n in self.curriculum:
            if until is None or step < until:
                return n
        return self.curriculum[-1][1]

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        kind = "local" if rng.random() < self.local_fraction else "global"
        top = self.max_objects(step)
        examples: list[dict] = []
        while len(examples) < self.batch_size:
            scene = draw_scene(rng, self.spec, int(rng.integers(1, top + 1)), kind)
            image, asked = global_view(scene, self.spec), set()
            for _ in range(min(self.scene_reuse, self.batch_size - len(examples))):
                examples.append(example_from_scene(rng, self.spec, scene, image, kind, self.tokenizer, asked))
        return collate(examples, self.spec, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)

    def __iter__(self):
        worker, workers = worker_shard()
        step = self.start + worker
        while True:
            yield self.batch(step)
            step += workers
