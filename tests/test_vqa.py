"""VQA loaders (ours, TextVQA, VQAv2 on tiny fake files) and the official accuracy metric."""

import json

import numpy as np
import pytest
from PIL import Image

from collab.data import synthetic as syn
from collab.data.vqa import VQAExample, load_dataset, normalize_answer, score_predictions, vqa_accuracy

# ------------------------------------------------------------------------------------------------
# Normalisation and accuracy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two.", "2"),
        ("the cat", "cat"),
        ("dont", "don't"),
        ("A Man's hat", "man's hat"),
        ("Yes!", "yes"),
        ("  none\n", "0"),
        ("2.5", "2.5"),  # a period inside a number stays
        ("end.", "end"),
        ("1,000", "1000"),  # a digit,digit comma makes every punctuation mark vanish
        ("black/white", "black white"),  # otherwise punctuation becomes a space
        ("hot - dog", "hot dog"),  # punctuation next to a space is removed
        ("whats up?", "what's up"),
        ("Im", "im"),  # the official map has "Im", but it is applied after lower-casing
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def ten(pred: str, matches: int, other: str = "dog") -> list[str]:
    return [pred] * matches + [other] * (10 - matches)


def test_vqa_accuracy_hand_computed():
    # 3 of 10 match. Leaving out one of the 3 matching answers leaves 2 matches -> 2/3; leaving out
    # one of the 7 others leaves 3 -> 1. Mean = (3 * 2/3 + 7 * 1) / 10 = 9/10.
    assert vqa_accuracy("cat", ten("cat", 3)) == pytest.approx(0.9)
    # 2 match: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10.
    assert vqa_accuracy("cat", ten("cat", 2)) == pytest.approx(0.6)
    # 1 match: (1 * 0 + 9 * 1/3) / 10 = 0.3.
    assert vqa_accuracy("cat", ten("cat", 1)) == pytest.approx(0.3)
    # 4 match: leaving out any one still leaves >= 3 -> 1 everywhere.
    assert vqa_accuracy("cat", ten("cat", 4)) == pytest.approx(1.0)
    assert vqa_accuracy("cat", ten("cat", 10)) == pytest.approx(1.0)
    assert vqa_accuracy("cat", ten("cat", 0)) == 0.0


@pytest.mark.parametrize("m", range(11))
def test_vqa_accuracy_closed_form(m):
    expected = (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10 if m else 0.0
    assert vqa_accuracy("cat", ten("cat", m)) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("The Cat", ten("cat", 3)) == pytest.approx(0.9)


def test_vqa_accuracy_fewer_than_ten_answers():
    assert vqa_accuracy("cat", ["cat"]) == pytest.approx(1 / 3)
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    assert vqa_accuracy("cat", ["cat"] * 3) == 1.0
    with pytest.raises(ValueError, match="no ground-truth"):
        vqa_accuracy("cat", [])


def test_score_predictions_per_kind():
    exs = [
        VQAExample("a", None, "q", ["1"] * 10, kind="fine"),
        VQAExample("b", None, "q", ["red"] * 10, kind="coarse"),
        VQAExample("c", None, "q", ["2"] * 10, kind="fine"),
    ]
    scores = score_predictions(exs, {"a": "1", "b": "red", "c": "3"})
    assert scores == {"all": pytest.approx(2 / 3), "fine": 0.5, "coarse": 1.0}


# ------------------------------------------------------------------------------------------------
# Loaders


def test_synthetic_round_trip(tmp_path):
    out = syn.write_dataset(tmp_path / "syn", seed=7, n=4, progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["generator"] == "collab.data.synthetic" and meta["seed"] == 7 and meta["n"] == 4
    assert meta["fine_fraction"] == 0.5 and meta["vocabulary"] == syn.VOCABULARY
    examples = load_dataset(out)
    assert len(examples) == 4
    for ex, item in zip(examples, syn.generate_items(7, 4)):
        assert ex.question_id == item.question_id and ex.question == item.question
        assert ex.answers == item.answers and ex.kind == item.kind
        assert ex.target_box == (tuple(item.target_box) if item.target_box else None)
        assert ex.extra["objects"] == item.objects and ex.extra["answer"] == item.answer
        assert np.array_equal(np.asarray(ex.load_image()), np.asarray(item.image))
    assert [e.question_id for e in load_dataset(out / "questions.jsonl", limit=2)] == [
        e.question_id for e in examples[:2]
    ]


def write_jpeg(path, size=(40, 20), orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (200, 30, 30))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(path, format="JPEG", exif=exif.tobytes())


def write_textvqa(root, split="val", n=3):
    data = {
        "dataset_type": split,
        "dataset_name": "textvqa",
        "data": [
            {
                "question_id": 100 + i,
                "image_id": f"img{i:04x}",
                "question": f"what does sign {i} say?",
                "answers": ["stop"] * 9 + ["halt"],
                "image_classes": ["Traffic sign"],
                "set_name": split,
            }
            for i in range(n)
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps(data))
    for i in range(n):
        write_jpeg(root / "train_images" / f"img{i:04x}.jpg", orientation=6 if i == 0 else None)
    return root


def test_textvqa_loader(tmp_path):
    root = write_textvqa(tmp_path / "textvqa")
    for source in (root, root / "TextVQA_0.5.1_val.json"):
        exs = load_dataset(source)
        assert [e.question_id for e in exs] == ["100", "101", "102"]
        assert exs[1].image_path == root / "train_images" / "img0001.jpg"
        assert exs[1].answers == ["stop"] * 9 + ["halt"] and exs[1].kind is None
        assert exs[1].extra["image_id"] == "img0001" and exs[1].extra["set_name"] == "val"
    assert exs[0].load_image().size == (20, 40)  # EXIF orientation 6 (rotate 90) applied
    assert exs[1].load_image().size == (40, 20)
    assert len(load_dataset(root, limit=2)) == 2
    moved = root.rename(tmp_path / "elsewhere")
    other = tmp_path / "json_only"
    other.mkdir()
    (moved / "TextVQA_0.5.1_val.json").rename(other / "TextVQA_0.5.1_val.json")
    with pytest.raises(FileNotFoundError, match="images_dir"):
        load_dataset(other)
    exs = load_dataset(other, images_dir=moved / "train_images")
    assert exs[2].image_path == moved / "train_images" / "img0002.jpg"


def test_textvqa_several_splits_need_a_choice(tmp_path):
    root = write_textvqa(tmp_path / "t", "val")
    write_textvqa(root, "train", n=2)
    with pytest.raises(ValueError, match="split="):
        load_dataset(root)
    assert len(load_dataset(root, split="train")) == 2
    assert len(load_dataset(root, split="val")) == 3


def write_vqav2(root, split="val2014"):
    questions = {
        "data_subtype": split,
        "questions": [
            {"image_id": 42, "question": "How many dogs?", "question_id": 420},
            {"image_id": 7, "question": "What color is the bus?", "question_id": 70},
        ],
    }
    answers_42 = ["2"] * 8 + ["two", "3"]
    annotations = {
        "annotations": [
            {
                "question_id": 70,
                "image_id": 7,
                "question_type": "what color is the",
                "answer_type": "other",
                "multiple_choice_answer": "red",
                "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
            },
            {
                "question_id": 420,
                "image_id": 42,
                "question_type": "how many",
                "answer_type": "number",
                "multiple_choice_answer": "2",
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers_42)
                ],
            },
        ]
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(questions))
    (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(annotations))
    for image_id in (42, 7):
        write_jpeg(root / split / f"COCO_{split}_{image_id:012d}.jpg")
    return root


def test_vqav2_loader(tmp_path):
    root = write_vqav2(tmp_path / "vqav2")
    for source in (
        root,
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        root / "v2_mscoco_val2014_annotations.json",
    ):
        exs = load_dataset(source)
        assert [e.question_id for e in exs] == ["420", "70"]
        assert exs[0].image_path == root / "val2014" / "COCO_val2014_000000000042.jpg"
        assert exs[0].answers == ["2"] * 8 + ["two", "3"]
        assert exs[0].extra["answer_type"] == "number" and exs[0].extra["image_id"] == 42
        assert exs[1].answers == ["red"] * 10
    assert vqa_accuracy("two", exs[0].answers) == 1.0
    assert exs[1].load_image().mode == "RGB"
    assert len(load_dataset(root, limit=1)) == 1


def test_vqav2_errors(tmp_path):
    root = write_vqav2(tmp_path / "v")
    write_vqav2(root, "train2014")
    with pytest.raises(ValueError, match="several VQAv2 splits"):
        load_dataset(root)
    assert len(load_dataset(root, split="train2014")) == 2
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match="v2_mscoco_val2014_annotations.json"):
        load_dataset(root, split="val2014")


def test_clear_errors_on_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no known VQA dataset.*questions\.jsonl"):
        load_dataset(empty)
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="unrecognised dataset file"):
        load_dataset(bad)
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="not a TextVQA file"):
        load_dataset(wrong)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_dataset(broken)
    no_images = tmp_path / "noimg"
    no_images.mkdir()
    (no_images / "questions.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="images directory"):
        load_dataset(no_images)


def test_missing_image_is_named(tmp_path):
    ex = VQAExample("q1", tmp_path / "missing.jpg", "q", ["a"])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        ex.load_image()


def test_package_reexports_resolve():
    import collab.data as data

    for name in data.__all__:
        assert getattr(data, name) is not None
    with pytest.raises(AttributeError):
        data.no_such_name  # noqa: B018


def test_vqav2_answer_type_is_the_question_type(tmp_path):
    """collab.eval groups VQAv2 items by answer_type ("number", "other", "yes/no")."""
    from collab.eval.runner import dataset_items

    assert [it.qtype for it in dataset_items(write_vqav2(tmp_path / "vqav2"))] == ["number", "other"]
