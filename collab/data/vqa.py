"""Local VQA datasets behind one record type, and the official VQA accuracy.

Formats recognised by ``load_dataset`` (auto-detected from the path):

- ours (``collab.data.synthetic.write_dataset``): a directory with ``questions.jsonl`` and
  ``images/``; each line has question_id, image (file name under images/), question, answers,
  kind, target_box, and whatever else (kept in ``extra``).
- TextVQA: ``TextVQA_0.5.1_<split>.json`` ({"data": [{question_id, image_id, question, answers}]}),
  images ``<image_id>.jpg`` in ``train_images/`` (train and val) or ``test_images/`` next to it.
- VQAv2: ``v2_OpenEnded_mscoco_<split>_questions.json`` + ``v2_mscoco_<split>_annotations.json``,
  images ``COCO_<split>_<image_id:012d>.jpg`` in ``<split>/`` or ``images/<split>/`` next to them.

Images load lazily (``VQAExample.load_image``); ``load_dataset`` checks only that the first
example's image exists, so a wrong images directory fails at once with a message naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

TEXTVQA_GLOB = "TextVQA_*.json"
VQAV2_QUESTIONS_RE = re.compile(r"^v2_OpenEnded_mscoco_(?P<split>.+)_questions\.json$")
VQAV2_ANNOTATIONS_RE = re.compile(r"^v2_mscoco_(?P<split>.+)_annotations\.json$")
EXPECTED = (
    "expected one of: a directory with questions.jsonl and images/ (synthetic); "
    "TextVQA_0.5.1_<split>.json (TextVQA); "
    "v2_OpenEnded_mscoco_<split>_questions.json + v2_mscoco_<split>_annotations.json (VQAv2)"
)


@dataclass
class VQAExample:
    """One question about one image; the image is read only when asked for."""

    question_id: str
    image_path: Path
    question: str
    answers: list[str]
    kind: str | None = None
    target_box: tuple[int, int, int, int] | None = None
    extra: dict = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """RGB image with its EXIF orientation applied (phones store rotated pixels)."""
        if not self.image_path.is_file():
            raise FileNotFoundError(f"image of question {self.question_id} not found: {self.image_path}")
        with Image.open(self.image_path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")


# ----------------------------------------------------------------------------------------------
# Loading


def load_dataset(
    path: str | Path, *, images_dir: str | Path | None = None, split: str | None = None, limit: int | None = None
) -> list[VQAExample]:
    """Read a local VQA dataset (format auto-detected, see module doc); `limit` keeps the first N.

    `split` picks a file when a directory holds several (e.g. "val" for TextVQA_0.5.1_val.json,
    "val2014" for VQAv2); `images_dir` overrides where the images are looked for.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}; {EXPECTED}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    kind, target = _detect(path, split)
    images = Path(images_dir) if images_dir is not None else None
    if kind == "synthetic":
        examples = _load_synthetic(target, images, limit)
    elif kind == "textvqa":
        examples = _load_textvqa(target, images, limit)
    else:
        examples = _load_vqav2(target, images, limit)
    if examples and not examples[0].image_path.is_file():
        raise FileNotFoundError(
            f"{kind} dataset {path}: image of the first question not found at {examples[0].image_path}; "
            "pass images_dir= to say where the images are"
        )
    return examples


def _detect(path: Path, split: str | None) -> tuple[str, Path]:
    """(format, file to read) for a dataset path, or a ValueError that says what was expected."""
    if path.is_dir():
        if (path / "questions.jsonl").is_file():
            return "synthetic", path / "questions.jsonl"
        textvqa = _pick(sorted(path.glob(TEXTVQA_GLOB)), split, path, "TextVQA")
        if textvqa is not None:
            return "textvqa", textvqa
        vqav2 = [p for p in sorted(path.iterdir()) if VQAV2_QUESTIONS_RE.match(p.name)]
        picked = _pick(vqav2, split, path, "VQAv2")
        if picked is not None:
            return "vqav2", picked
        which = f" for split {split!r}" if split is not None else ""
        raise ValueError(f"no known VQA dataset{which} in directory {path}; {EXPECTED}")
    if path.name == "questions.jsonl":
        return "synthetic", path
    if VQAV2_QUESTIONS_RE.match(path.name):
        return "vqav2", path
    m = VQAV2_ANNOTATIONS_RE.match(path.name)
    if m:
        return "vqav2", path.with_name(f"v2_OpenEnded_mscoco_{m['split']}_questions.json")
    if path.suffix == ".json":  # TextVQA files keep their names less often; the loader checks the content
        return "textvqa", path
    raise ValueError(f"unrecognised dataset file {path}; {EXPECTED}")


def _pick(candidates: list[Path], split: str | None, directory: Path, name: str) -> Path | None:
    """The one candidate file (or the one whose name carries `split`); error when ambiguous."""
    if split is not None:
        candidates = [p for p in candidates if re.search(rf"_{re.escape(split)}[_.]", p.name)]
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise ValueError(f"{directory} holds several {name} splits ({names}); pass split= or the file path")
    return candidates[0] if candidates else None


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file {path}; {EXPECTED}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _load_synthetic(questions: Path, images_dir: Path | None, limit: int | None) -> list[VQAExample]:
    images = images_dir or questions.parent / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"synthetic dataset {questions.parent}: images directory {images} not found")
    out = []
    with open(questions, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(out) >= limit:
                break
            if line.strip():
                out.append(_synthetic_example(json.loads(line), images, questions, lineno))
    return out


def _synthetic_example(rec: dict, images: Path, source: Path, lineno: int) -> VQAExample:
    missing = [k for k in ("question_id", "image", "question", "answers") if k not in rec]
    if missing:
        raise ValueError(f"{source}:{lineno}: record lacks {missing}")
    box = rec.get("target_box")
    extra = {
        k: v for k, v in rec.items() if k not in ("question_id", "image", "question", "answers", "kind", "target_box")
    }
    return VQAExample(
        question_id=str(rec["question_id"]),
        image_path=images / rec["image"],
        question=rec["question"],
        answers=[str(a) for a in rec["answers"]],
        kind=rec.get("kind"),
        target_box=tuple(int(v) for v in box) if box is not None else None,
        extra=extra,
    )


def _load_textvqa(path: Path, images_dir: Path | None, limit: int | None) -> list[VQAExample]:
    data = _read_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("data"), list)):
        raise ValueError(f"{path}: not a TextVQA file (a JSON object with a 'data' list); {EXPECTED}")
    entries = data["data"] if limit is None else data["data"][:limit]
    out = []
    for i, e in enumerate(entries):
        missing = [k for k in ("question_id", "image_id", "question") if k not in e]
        if missing:
            raise ValueError(f"{path}: data[{i}] lacks {missing}")
        folder = images_dir or path.parent / ("test_images" if e.get("set_name") == "test" else "train_images")
        out.append(
            VQAExample(
                question_id=str(e["question_id"]),
                image_path=folder / f"{e['image_id']}.jpg",
                question=e["question"],
                answers=[str(a) for a in e.get("answers", [])],  # the test split has none
                extra={k: v for k, v in e.items() if k not in ("question_id", "question", "answers")},
            )
        )
    return out


def _load_vqav2(questions_path: Path, images_dir: Path | None, limit: int | None) -> list[VQAExample]:
    split = VQAV2_QUESTIONS_RE.match(questions_path.name)["split"]
    questions = _read_json(questions_path)
    if not (isinstance(questions, dict) and isinstance(questions.get("questions"), list)):
        raise ValueError(f"{questions_path}: expected VQAv2 questions, a JSON object with a 'questions' list")
    entries = questions["questions"] if limit is None else questions["questions"][:limit]
    annotations = _vqav2_annotations(questions_path.with_name(f"v2_mscoco_{split}_annotations.json"), split)
    image_split = "test2015" if split.startswith("test") else split  # test-dev images live in test2015
    folder = images_dir or _first_dir(
        [
            questions_path.parent / image_split,
            questions_path.parent / "images" / image_split,
            questions_path.parent / "images",
        ]
    )
    out = []
    for q in entries:
        ann = annotations.get(q["question_id"], {})
        if annotations and not ann:
            raise ValueError(f"{questions_path}: question {q['question_id']} has no annotation")
        extra = {"image_id": q["image_id"], "split": split}
        extra.update({k: v for k, v in ann.items() if k in ("question_type", "answer_type", "multiple_choice_answer")})
        out.append(
            VQAExample(
                question_id=str(q["question_id"]),
                image_path=folder / f"COCO_{image_split}_{int(q['image_id']):012d}.jpg",
                question=q["question"],
                answers=[str(a["answer"]) for a in ann.get("answers", [])],
                extra=extra,
            )
        )
    return out


def _vqav2_annotations(path: Path, split: str) -> dict:
    """question_id -> annotation; test splits have no annotation file (answers stay empty)."""
    if not path.is_file():
        if split.startswith("test"):
            return {}
        raise FileNotFoundError(
            f"VQAv2 annotations not found: {path} (needed next to the questions file for split {split})"
        )
    data = _read_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("annotations"), list)):
        raise ValueError(f"{path}: expected VQAv2 annotations, a JSON object with an 'annotations' list")
    return {a["question_id"]: a for a in data["annotations"]}


def _first_dir(candidates: list[Path]) -> Path:
    return next((c for c in candidates if c.is_dir()), candidates[0])


# ----------------------------------------------------------------------------------------------
# Official VQA answer normalisation and accuracy (GT-Vision-Lab/VQA, vqaEval.py)

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Both regexes are copied as published, quirks included: "(?!<=\d)" is a lookahead for the
# literal "<=" followed by a digit (not a lookbehind), so "2.5" keeps its period only because
# of the trailing "(?!\d)".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls periodStrip.sub("", text, re.UNICODE), which passes re.UNICODE (32) as
# the *count*: at most 32 periods are removed. Reproduced for exactness.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official processPunctuation: drop or space out punctuation, strip periods not in numbers."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Official processDigitArticle: lower-case, number words to digits, drop articles, fix contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation of a predicted answer ("Two." -> "2", "the cat" -> "cat")."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Iterable[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers, all normalised.

    With 10 (or more) answers: mean over i of min(1, #{j != i: gt_j == pred} / 3), the official
    leave-one-out average. With fewer than 10 answers the leave-one-out has no official meaning,
    so we use min(1, #{j: gt_j == pred} / 3) over the full list (1 matching answer = 1/3).

    Difference from vqaEval.py: it normalises ground-truth answers only with processPunctuation
    and only when they disagree (the released annotations are already normalised); we apply the
    full normalisation to every answer, which gives the same result on the official files and
    is robust for answers from other sources.
    """
    gts = [normalize_answer(a) for a in answers]
    if not gts:
        raise ValueError("no ground-truth answers to score against (a test split has none)")
    pred = normalize_answer(prediction)
    matches = sum(g == pred for g in gts)
    if len(gts) < 10:
        return min(1.0, matches / 3.0)
    return sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts) / len(gts)


def score_predictions(examples: Iterable[VQAExample], predictions: Mapping[str, str]) -> dict[str, float]:
    """Mean VQA accuracy over examples that have a prediction: overall and per `kind`."""
    per_kind: dict[str, list[float]] = {}
    for ex in examples:
        if ex.question_id in predictions:
            acc = vqa_accuracy(predictions[ex.question_id], ex.answers)
            per_kind.setdefault("all", []).append(acc)
            if ex.kind is not None:
                per_kind.setdefault(ex.kind, []).append(acc)
    return {k: sum(v) / len(v) for k, v in per_kind.items()}
