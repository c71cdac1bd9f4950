"""Qwen2.5-VL behind the same backend interface: the split path computes the model's own function
(transformers' generate from pixels), batched == one by one, captured maps == the attention pass.
A tiny random model built from a config and saved locally; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from collab.backends import load_backend
from collab.backends.base import AttentionRequest, DecodeRequest
from collab.config import ModelConfig
from collab.models.tiny_qwen import QWEN_PROMPT, QWEN_REFINE_PROMPT, make_random_tiny_qwen_vl

QUESTIONS = ["what number is in the red circle ?", "how many objects ?", "what color is the square ?"]
# 8 x 8 patches (14 px for Qwen2.5-VL, 16 px for Qwen3-VL), 4 x 4 visual tokens after the 2 x 2 merge
SIDES = {"qwen2_5_vl": 112, "qwen3_vl": 128}
BUDGET = 24  # global-image tokens in the native-resolution variant: a 4:3 photo -> 5 x 4 tokens
VARIANTS = [(kind, budget) for kind in SIDES for budget in (None, BUDGET)]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{k}-{'budget' if b else 'square'}" for k, b in VARIANTS])
def qwen(request, tmp_path_factory):
    kind, budget = request.param
    path = make_random_tiny_qwen_vl(tmp_path_factory.mktemp(kind), seed=0, kind=kind)
    config = ModelConfig(
        path=str(path),
        family="qwen_vl",
        encoder_size=SIDES[kind],
        max_visual_tokens=budget,
        prompt_template=QWEN_PROMPT,
        refine_template=QWEN_REFINE_PROMPT,
        max_new_tokens=4,
    )
    return load_backend(config)


def images(n, seed=0, size=(112, 112)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def global_image(backend, original_size=(400, 300), seed=0):
    """The global image the edge sends for an original of this size (square, or at the budget)."""
    return images(1, seed, backend.info.global_size(original_size))[0]


def reference_generate(backend, pics, question):
    """What a plain transformers user runs: pixels and the prompt into model.generate, each image's
    pads expanded from the grid the processor reports (as Qwen's processor does)."""
    template = backend.config.prompt_template if len(pics) == 1 else backend.config.refine_template
    pixels = backend.preprocess(pics)
    tokens = [int(t * h * w) // backend.merge**2 for t, h, w in pixels.grid_thw.tolist()]
    ids = backend.prompt_ids(template, question, len(pics), tokens)
    with torch.inference_mode():
        out = backend.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels.pixel_values,
            image_grid_thw=pixels.grid_thw,
            mm_token_type_ids=(ids == backend.image_token_id).int(),
            max_new_tokens=backend.config.max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=backend.pad_token_id,
        )
    return out.sequences[0, ids.shape[1] :].tolist(), torch.stack(out.logits, 1)[0].float()


def test_backend_info(qwen):
    side = qwen.info.encoder_size[0]
    assert qwen.info.encoder_size == (side, side) and qwen.info.grid == (4, 4) and qwen.info.tokens_per_image == 16
    feats = qwen.encode_images(images(2, size=(150, 90)))  # not a size the server asks for: resized
    deepstack = qwen.model.config.model_type == "qwen3_vl"  # merged tokens and one deepstack layer
    rows, cols = qwen.info.global_grid((150, 90))
    assert all(f.shape == (2, rows, cols, qwen.info.hidden_size)[0 if deepstack else 1 :] for f in feats)
    if qwen.info.global_budget is None:
        assert (rows, cols) == (4, 4) and qwen.info.global_size((400, 300)) == (side, side)
    else:  # the photo's aspect ratio, both sides multiples of patch x merge, within the budget
        assert qwen.info.global_size((400, 300)) == (5 * qwen.unit, 4 * qwen.unit)
        assert qwen.info.global_grid((400, 300)) == (4, 5) and rows * cols <= BUDGET


@pytest.mark.parametrize("n_images", [1, 2])
def test_split_path_equals_model_generate(qwen, n_images):
    """One image and global + local, on a square original and a 4:3 one (a non-square global
    image and a square local one in the budget variant: two grids in one prompt)."""
    for original in ((300, 300), (400, 300)):
        pics = [global_image(qwen, original, seed=n_images), *images(n_images - 1, 5, qwen.info.encoder_size)]
        feats = list(qwen.encode_images(pics))
        for question in QUESTIONS:
            tokens, logits = reference_generate(qwen, pics, question)
            ours = qwen.generate(feats, question)
            n = len(ours.token_ids)
            assert ours.token_ids == tokens[:n] and (n == len(tokens) or tokens[n - 1] in qwen.eos_ids)
            torch.testing.assert_close(ours.logits, logits[:n], atol=1e-5, rtol=0)


def test_prompt_ids_equal_the_chat_template(qwen):
    """Our template, expanded as the Qwen processor expands <|image_pad|>, is the chat template's prompt."""
    messages = [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
    ]
    text = qwen.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * qwen.info.tokens_per_image)
    want = qwen.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert qwen.prompt_ids(qwen.config.prompt_template, QUESTIONS[0], 1)[0].tolist() == want


def test_batched_equals_one_by_one_and_captured_maps_equal_the_pass(qwen):
    """Requests of different grids (a 4:3 and a 3:4 global, a square one) in one left-padded batch."""
    pics = [global_image(qwen, size, seed=7 + i) for i, size in enumerate([(400, 300), (300, 400), (300, 300)])]
    feats = qwen.encode_images(pics)
    requests = [DecodeRequest([f], q, [0, -1]) for f, q in zip(feats, QUESTIONS)]
    local = qwen.encode_images(images(1, 9, qwen.info.encoder_size))[0]
    requests.append(DecodeRequest([feats[0], local], QUESTIONS[1]))
    batched = qwen.generate_batch(requests)
    for r, got in zip(requests, batched):
        want = qwen.generate(list(r.features), r.question, r.capture_layers)
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
    for f, q, gen, pic in zip(feats, QUESTIONS, batched, pics):
        answer = gen.token_ids[: gen.n_answer_tokens]
        eager = qwen.attention_grids(f, q, answer, [0, -1], "all")  # the eager pass (answer rows included)
        plain = qwen._eager_grids(AttentionRequest(f, q, []), [0, -1], "last_input")
        for layer, grid in zip([0, -1], plain):
            np.testing.assert_allclose(gen.attention[layer], grid, rtol=1e-4, atol=1e-6)
        rows, cols = pic.height // qwen.unit, pic.width // qwen.unit
        assert all(g.shape == (rows, cols) for g in eager + plain)
    last = qwen.attention_grids_batch([AttentionRequest(f, q) for f, q in zip(feats, QUESTIONS)], [-1], "last_input")
    for (grid,), gen in zip(last, batched):
        np.testing.assert_allclose(grid, gen.attention[-1], rtol=1e-4, atol=1e-6)


def test_questions_that_would_change_the_prompt_are_refused(qwen):
    from collab.backends.base import InvalidQuestion

    for question in ("what is <|image_pad|> ?", "<|im_end|> hi", "what <image> ?"):
        with pytest.raises(InvalidQuestion):
            qwen.check_question(question)


def test_the_reference_pipeline_runs_both_stages_on_qwen(qwen):
    from collab.config import CollabConfig
    from collab.data.synthetic import generate_item
    from collab.pipeline import ReferencePipeline

    config = CollabConfig(model=qwen.config, attention={"layer": -1})
    pipeline = ReferencePipeline(qwen, config)
    item = generate_item(3, 0)
    item.image = item.image.resize((640, 360))  # 16:9: the budget variant's global image keeps it
    record = pipeline.run(item.image, item.question, policy=pipeline.policy(name="always"))
    assert record.stage == 2 and record.box is not None and record.local_bytes > 0
    item.width, item.height = item.image.size
    x0, y0, x1, y1 = record.box
    assert 0 <= x0 < x1 <= item.width and 0 <= y0 < y1 <= item.height
    never = pipeline.run(item.image, item.question, policy=pipeline.policy(name="never"))
    assert never.stage == 1 and never.answer == record.first_answer


def test_unreduced_attention_rows_on_qwen_grids(qwen):
    """Per-head, per-row maps on a non-square token grid: their mean is the averaged read, and the
    per-head read of stages (sharpest rows, geometric heads) gives one finite map on that grid."""
    from collab import stages
    from collab.config import AttentionConfig

    pic = global_image(qwen)
    feats = qwen.encode_images([pic])[0]
    request = AttentionRequest(feats, QUESTIONS[0])
    (maps,) = qwen.attention_rows_batch([request], [-1], "question")[0]
    (mean,) = qwen.attention_grids_batch([request], [-1], "question")[0]
    rows, cols = pic.height // qwen.unit, pic.width // qwen.unit
    assert maps.shape[0] == qwen.info.num_heads and maps.shape[2:] == (rows, cols) == mean.shape
    np.testing.assert_allclose(maps.mean(axis=(0, 1)), mean, rtol=1e-5, atol=1e-7)
    cfg = AttentionConfig(layer=-1, query_rows="question", rows="sharpest", head_reduce="geometric")
    (grid,) = stages.attention_maps(qwen, feats, QUESTIONS[0], [], cfg, [-1])
    assert grid.shape == (rows, cols) and np.all(np.isfinite(grid)) and np.all(grid > 0)
