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
import torch.nn.functional as F
from PIL import Image

from collab.backends.llava import expand_prompt
from collab.data.synthetic import Question, Scene, questions_for_scene, render_scene
from collab.imaging import crop_local_image, make_global_image, round_trip
from collab.roi import box_around
from collab.training.loop import worker_shard


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
    # Scale augmentation: this share of global-only scenes is drawn with digits legible at the
    # encoder's resolution (collab.data.synthetic's legible_glyphs); on them, fine questions are
    # asked with probability legible_fine_fraction. Plain answers then reward looking at the object
    # the question names, and the look carries over to scenes whose digit cannot be read.
    legible_fraction: float = 0.0
    legible_fine_fraction: float = 0.8
    # Dense descriptions (LLaVA's first stage trains on captions): this share of global-only examples
    # asks CAPTION_QUESTION and is answered by every object's colour and shape in a random order
    # (and its digit where legible). After "red" the next word is the red object's shape (after
    # "circle", the circle's colour): every object gives a supervised look at the object a word
    # names, where one question gives one.
    caption_fraction: float = 0.0
    caption_shape_first: float = 0.0
    # Each object's first word in a description is a pick among the objects not yet named: no look
    # at the word before predicts it, and learning it teaches that word's row to read the OTHER
    # objects. False leaves it out of the loss, so descriptions supervise only words the image decides.
    caption_object_starts: bool = True


CAPTION_QUESTION = "what objects are there?"  # training only; its words are the benchmark's own


def caption_words(rng: np.random.Generator, scene: Scene, spec: BatchSpec) -> tuple[list[str], list[float]]:
    """Every object as "colour shape" (or, for a spec.caption_shape_first share of descriptions,
    every object as "shape colour"), then its digit when the scene's digits are legible, objects in
    a random order: no position words, so the word that follows an object's first one can only come
    from the image, at the object that word names. One order per description, so the first word
    says which word comes next (an order drawn per object made every second word ambiguous).
    Returns the words and each word's loss weight (0 for object starts unless
    spec.caption_object_starts)."""
    shape_first = spec.caption_shape_first > 0 and rng.random() < spec.caption_shape_first
    start_weight = 1.0 if spec.caption_object_starts else 0.0
    words: list[str] = []
    weights: list[float] = []
    for i in rng.permutation(len(scene.objects)):
        o = scene.objects[int(i)]
        pair = [o.shape, o.color] if shape_first else [o.color, o.shape]
        described = pair + ([o.digit] if scene.legible_glyphs else [])
        words += described
        weights += [start_weight] + [1.0] * (len(described) - 1)
    return words, weights


def to_pixels(images: list[Image.Image], mean: float, std: float) -> torch.Tensor:
    """CLIP-style normalisation (rescale 1/255, then (x - mean) / std), as the saved processor does."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy((arr - mean) / std).permute(0, 3, 1, 2).contiguous()


def pick_question(
    rng: np.random.Generator, scene: Scene, fine_fraction: float, asked: set[str] | None = None
) -> Question:
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


def draw_scene(rng: np.random.Generator, spec: BatchSpec, n_objects: int, kind: str) -> Scene:
    """The scene an example is asked about (legible digits for some global-only examples)."""
    legible = kind == "global" and spec.legible_fraction > 0 and rng.random() < spec.legible_fraction
    return render_scene(rng, n_objects=n_objects, legible_glyphs=legible)


def global_view(scene: Scene, spec: BatchSpec) -> Image.Image:
    """The global image the edge would send for this scene, after the JPEG round trip."""
    size = (spec.image_size, spec.image_size)
    return round_trip(make_global_image(scene.image, size)[0], "jpeg", spec.jpeg_quality)


def make_example(rng: np.random.Generator, spec: BatchSpec, n_objects: int, kind: str, tokenizer) -> dict:
    """One (input_ids, answer id, images) example of the given batch kind."""
    scene = draw_scene(rng, spec, n_objects, kind)
    return example_from_scene(rng, spec, scene, global_view(scene, spec), kind, tokenizer)


def example_from_scene(
    rng: np.random.Generator,
    spec: BatchSpec,
    scene: Scene,
    global_image: Image.Image,
    kind: str,
    tokenizer,
    asked: set[str] | None = None,
) -> dict:
    """One example about a rendered scene; `asked` holds questions already used on it (avoided
    while others remain, so that reusing a scene does not repeat an example)."""
    weights = None
    if kind == "global" and spec.caption_fraction > 0 and rng.random() < spec.caption_fraction:
        words, weights = caption_words(rng, scene, spec)
        question = Question(CAPTION_QUESTION, " ".join(words), "caption", "caption", None)
    else:
        fine_fraction = spec.legible_fine_fraction if scene.legible_glyphs else spec.fine_fraction
        question = pick_question(rng, scene, fine_fraction, asked)
    if asked is not None:
        asked.add(question.question)
    size = (spec.image_size, spec.image_size)
    images = [global_image]
    negative = False
    if kind == "local":
        negative = question.kind == "fine" and rng.random() < spec.negative_fraction
        box = crop_box(rng, scene, question.target_box, spec, negative)
        images.append(round_trip(crop_local_image(scene.image, box, size), "jpeg", spec.jpeg_quality))
    template = spec.prompt_template if kind == "global" else spec.refine_template
    text = expand_prompt(
        template, question.question, len(images), spec.placeholder, spec.image_token, spec.tokens_per_image
    )
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer.convert_tokens_to_ids(question.answer.split())
    return {
        "ids": ids,
        "answer": answer_ids[0],
        "answer_ids": answer_ids,
        "answer_weights": weights or [1.0] * len(answer_ids),
        "images": images,
        "kind": question.kind,
        "negative": negative,
        "qtype": question.qtype,
    }


def collate(examples: list[dict], spec: BatchSpec, pad_id: int, eos_id: int) -> dict:
    """Right-padded ids with the answer tokens and EOS appended; labels only on those."""
    answers = [ex.get("answer_ids", [ex["answer"]]) for ex in examples]
    seqs = [ex["ids"] + a + [eos_id] for ex, a in zip(examples, answers)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    answer_pos = torch.zeros(len(seqs), dtype=torch.long)
    answer_len = torch.zeros(len(seqs), dtype=torch.long)
    answer_weight = torch.zeros(len(seqs), max(len(a) for a in answers))
    for i, (s, a) in enumerate(zip(seqs, answers)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        answer_pos[i], answer_len[i] = len(s) - 1 - len(a), len(a)
        answer_weight[i, : len(a)] = torch.tensor(examples[i].get("answer_weights", [1.0] * len(a)))
    images = [im for ex in examples for im in ex["images"]]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_pos": answer_pos,  # position of the (first) answer token; logits at answer_pos - 1 predict it
        "answer_len": answer_len,  # answer tokens from answer_pos on (1 but for captions); EOS follows them
        "answer_weight": answer_weight,  # (B, longest answer): each answer token's loss weight, 0 past the answer
        "pixel_values": to_pixels(images, spec.image_mean, spec.image_std),
        "n_images": len(examples[0]["images"]),
        "fine": torch.tensor([ex["kind"] == "fine" for ex in examples]),
        "negative": torch.tensor([ex["negative"] for ex in examples]),
    }


def answer_loss(model, batch: dict, eos_weight: float, pixel_values: torch.Tensor | None = None):
    """Cross-entropy on the answer tokens (each at its `answer_weight`, averaged within each answer)
    and EOS (eos_weight); per-example answer loss; whether every weighted answer token of each
    example was predicted."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"] if pixel_values is None else pixel_values,
    )
    rows = torch.arange(len(batch["answer_pos"]))
    pos = batch["answer_pos"]
    lengths = batch.get("answer_len", torch.ones_like(pos))
    offsets = torch.arange(int(lengths.max()), device=pos.device)
    in_answer = offsets[None, :] < lengths[:, None]  # (B, longest answer)
    weight = batch.get("answer_weight")
    weight = in_answer.float() if weight is None else weight.to(in_answer.device)[:, : in_answer.shape[1]]
    at = (pos[:, None] + offsets[None, :]).clamp(max=batch["input_ids"].shape[1] - 1)
    answer_ids = batch["input_ids"].gather(1, at)
    answer_logits = out.logits[rows[:, None], at - 1].float()  # (B, longest answer, vocab)
    token_loss = F.cross_entropy(answer_logits.transpose(1, 2), answer_ids, reduction="none")
    per_example = (token_loss * weight).sum(1) / weight.sum(1).clamp(min=1e-6)
    hit = (answer_logits.argmax(-1) == answer_ids) | (weight == 0)
    end = pos + lengths
    eos_logits = out.logits[rows, end - 1]
    eos_ids = batch["input_ids"][rows, end]
    loss = per_example.mean() + eos_weight * F.cross_entropy(eos_logits.float(), eos_ids)
    return loss, per_example, hit.all(1)


class BatchStream(torch.utils.data.IterableDataset):
    """Endless batches; the curriculum (objects per scene) follows the batch counter, except for
    global-only batches when `global_objects` fixes their range.

    `scene_reuse` > 1 asks up to that many questions about each rendered scene (rendering is most
    of a batch's cost; a GPU trainer would otherwise wait on it)."""

    def __init__(
        self,
        spec: BatchSpec,
        tokenizer,
        batch_size: int,
        seed: int,
        curriculum,
        local_fraction: float,
        start: int = 0,
        scene_reuse: int = 1,
        global_objects: tuple[int, int] | None = None,
    ):
        super().__init__()
        if scene_reuse < 1:
            raise ValueError(f"scene_reuse must be >= 1, got {scene_reuse}")
        self.spec, self.tokenizer, self.batch_size = spec, tokenizer, batch_size
        self.seed, self.curriculum, self.local_fraction, self.start = seed, curriculum, local_fraction, start
        self.scene_reuse = scene_reuse
        self.global_objects = tuple(global_objects) if global_objects else None

    def max_objects(self, step: int) -> int:
        for until, n in self.curriculum:
            if until is None or step < until:
                return n
        return self.curriculum[-1][1]

    def batch(self, step: int) -> dict:
        # four entries, the last non-zero: never the stream of a benchmark item ([seed, index, 0 or 1])
        rng = np.random.default_rng([self.seed, step, 2, 2])
        kind = "local" if rng.random() < self.local_fraction else "global"
        top = self.max_objects(step)
        examples: list[dict] = []
        lo = 1 if top <= 2 else 2  # past the first curriculum step, scenes have 2+ objects like the benchmark's
        if kind == "global" and self.global_objects:
            lo, top = self.global_objects
        while len(examples) < self.batch_size:
            scene = draw_scene(rng, self.spec, int(rng.integers(lo, top + 1)), kind)
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
