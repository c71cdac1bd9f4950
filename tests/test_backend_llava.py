"""The split path (encode, then decode from merged embeddings) must be the model's own function."""

import numpy as np
import pytest
import torch
from PIL import Image

from collab.attention import query_rows
from collab.backends import ModelLoadError, capture, load_backend
from collab.backends.base import AttentionRequest
from collab.config import ModelConfig

QUESTION = "what number is in the red circle ?"


def images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def fill(template, question=QUESTION):
    """The prompt text a plain transformers user would write: the template with the question in."""
    return template.replace("{question}", question)


@pytest.fixture(scope="module")
def processor(tiny_model_dir, tiny_backend):
    """transformers' own LlavaProcessor, loaded from the model directory as a plain transformers
    user would (collab.models.tiny saves processor_config.json). Its settings are checked against
    the model itself: the vision tower's patch size, the feature strategy, and the CLIP class token
    that the "default" strategy drops (num_additional_image_tokens)."""
    from transformers import LlavaProcessor

    model = tiny_backend.model
    embeddings = model.model.vision_tower.embeddings
    proc = LlavaProcessor.from_pretrained(tiny_model_dir)
    assert proc.patch_size == model.config.vision_config.patch_size
    assert proc.vision_feature_select_strategy == model.config.vision_feature_select_strategy
    assert proc.num_additional_image_tokens == embeddings.num_positions - embeddings.num_patches
    assert proc.image_token_id == model.config.image_token_id
    return proc


def monolithic_generate(backend, processor, imgs, template):
    """What a user of plain transformers would run: the processor's inputs into model.generate."""
    inputs = processor(text=fill(template), images=imgs, return_tensors="pt")
    with torch.inference_mode():
        out = backend.model.generate(
            **inputs,
            max_new_tokens=backend.config.max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    new_tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return inputs, new_tokens, torch.cat(out.logits).float()


@pytest.mark.parametrize("n_images", [1, 2])
def test_split_path_equals_model_generate(tiny_backend, processor, n_images, monkeypatch):
    imgs = images(n_images)
    template = tiny_backend.config.prompt_template if n_images == 1 else tiny_backend.config.refine_template
    inputs, ref_tokens, ref_logits = monolithic_generate(tiny_backend, processor, imgs, template)
    received, encode = [], tiny_backend.encode
    monkeypatch.setattr(tiny_backend, "encode", lambda pixels: received.append(pixels) or encode(pixels))
    features = tiny_backend.encode_images(imgs)
    assert len(received) == 1 and torch.equal(received[0], inputs["pixel_values"])
    ours = tiny_backend.generate(list(features), QUESTION)
    assert ours.token_ids == ref_tokens
    assert ours.logits.shape == ref_logits.shape
    assert torch.allclose(ours.logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_images", [1, 2])
def test_prompt_ids_equal_llava_processor(tiny_backend, processor, n_images):
    template = tiny_backend.config.prompt_template if n_images == 1 else tiny_backend.config.refine_template
    want = processor(text=fill(template), images=images(n_images), return_tensors="pt")["input_ids"]
    # The processor's own count for this model: a 4x4 patch grid, the class token dropped.
    assert int((want == processor.image_token_id).sum()) == n_images * 16
    got = tiny_backend.prompt_ids(template, QUESTION, n_images)
    assert got.tolist() == want.tolist()


def test_encoder_is_batch_invariant(tiny_backend):
    imgs = images(3, seed=1)
    batched = tiny_backend.encode_images(imgs)
    single = torch.cat([tiny_backend.encode_images([im]) for im in imgs])
    assert batched.shape == (3, tiny_backend.info.tokens_per_image, tiny_backend.info.hidden_size)
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("mode", ["last_input", "answer", "all", "question"])
def test_attention_grid_reads_the_right_rows(tiny_backend, processor, mode):
    img = images(1, seed=2)
    features = tiny_backend.encode_images(img)[0]
    gen = tiny_backend.generate([features], QUESTION)
    answer = gen.token_ids[: gen.n_answer_tokens] or gen.token_ids[:1]
    grid = tiny_backend.attention_grid(features, QUESTION, answer, layer=-1, query_rows=mode)
    # Reference: the monolithic forward over the processor's prompt + answer, eager attention.
    inputs = processor(text=fill(tiny_backend.config.prompt_template), images=img, return_tensors="pt")
    prompt = inputs["input_ids"]
    ids = torch.cat([prompt, torch.tensor([answer])], dim=1)
    with torch.inference_mode():
        out = tiny_backend.model(
            input_ids=ids, pixel_values=inputs["pixel_values"], output_attentions=True, use_cache=False
        )
    att = out.attentions[-1][0]  # (heads, q, k)
    positions = (prompt[0] == processor.image_token_id).nonzero().flatten()
    rows = query_rows(prompt.shape[1], len(answer), mode, int(positions.max()) + 1)
    if mode == "question":  # the question's words and the template's tail, nothing of the image or before
        words = processor.tokenizer.convert_ids_to_tokens(prompt[0, rows].tolist())
        assert rows[-1] == prompt.shape[1] - 1 and not {"<image>", "user"} & set(words)
    expected = att[:, rows][:, :, positions].mean(dim=(0, 1)).reshape(tiny_backend.info.grid).numpy()
    assert grid.shape == tiny_backend.info.grid
    np.testing.assert_allclose(grid, expected, atol=1e-6)
    assert np.all(grid > 0)


def model_attentions(tiny_backend, processor, mode: str, seed: int):
    """The model's own forward with attentions over one image and QUESTION: (features, attentions,
    visual positions, query rows of `mode`)."""
    img = images(1, seed=seed)
    features = tiny_backend.encode_images(img)[0]
    inputs = processor(text=fill(tiny_backend.config.prompt_template), images=img, return_tensors="pt")
    prompt = inputs["input_ids"]
    with torch.inference_mode():
        out = tiny_backend.model(
            input_ids=prompt, pixel_values=inputs["pixel_values"], output_attentions=True, use_cache=False
        )
    positions = (prompt[0] == processor.image_token_id).nonzero().flatten()
    return features, out.attentions, positions, query_rows(prompt.shape[1], 0, mode, int(positions.max()) + 1)


@pytest.mark.parametrize("mode", ["last_input", "question"])
def test_a_head_subset_averages_only_those_heads(tiny_backend, processor, mode):
    features, attentions, positions, rows = model_attentions(tiny_backend, processor, mode, seed=3)
    att = attentions[0][0]  # layer 0: (heads, q, k)
    request = AttentionRequest(features, QUESTION, [])
    grids = {}
    for heads in ([1], [0, 1]):
        (grids[len(heads)],) = tiny_backend.attention_grids_batch([request], [0], mode, heads)[0]
        expected = att[heads][:, rows][:, :, positions].mean(dim=(0, 1)).reshape(tiny_backend.info.grid).numpy()
        np.testing.assert_allclose(grids[len(heads)], expected, atol=1e-6)
    (every,) = tiny_backend.attention_grids_batch([request], [0], mode)[0]
    assert not np.allclose(every, grids[1])  # one head's map is not the mean over every head
    with pytest.raises(ValueError, match="distinct indices"):
        tiny_backend.attention_grids_batch([request], [0], mode, [tiny_backend.info.num_heads])


@pytest.mark.parametrize("mode", ["last_input", "question"])
def test_attention_rows_keep_each_head_and_row(tiny_backend, processor, mode):
    """The unreduced read: the model's own maps, head by head and row by row, on the token grid."""
    features, attentions, positions, rows = model_attentions(tiny_backend, processor, mode, seed=4)
    request = AttentionRequest(features, QUESTION, [])
    layers = [0, -1]
    got = tiny_backend.attention_rows_batch([request, request], layers, mode, [2, 0])
    assert len(got) == 2 and len(got[0]) == len(layers)
    for layer, maps in zip(layers, got[0]):
        att = attentions[layer][0]
        assert maps.shape == (2, len(rows), *tiny_backend.info.grid)
        expected = att[[2, 0]][:, rows][:, :, positions].reshape(2, len(rows), *tiny_backend.info.grid).numpy()
        np.testing.assert_allclose(maps, expected, atol=1e-6)
    np.testing.assert_allclose(got[1][0], got[0][0])
    (mean,) = tiny_backend.attention_grids_batch([request], [0], mode, [2, 0])[0]
    np.testing.assert_allclose(got[0][0].mean(axis=(0, 1)), mean, atol=1e-6)  # the averaged read is its mean


def test_attention_layer_out_of_range(tiny_backend):
    features = tiny_backend.encode_images(images(1))[0]
    with pytest.raises(ValueError, match="out of range"):
        tiny_backend.attention_grid(features, QUESTION, [], layer=99, query_rows="last_input")


@pytest.mark.parametrize(
    "question, reason",
    [
        ("what is <image> here", "placeholder"),
        ("what </s> is it", "special_token"),
        ("<s><s> colour?", "special_token"),
        ("a " * 300, "too_long"),  # 300 tokens, 600 characters: the character cap would let it through
        (" \u3000\t", "empty"),
    ],
)
def test_questions_that_would_change_the_prompt_are_refused(tiny_backend, question, reason):
    import pickle

    from collab.backends.base import InvalidQuestion

    features = tiny_backend.encode_images(images(1))[0]
    with pytest.raises(InvalidQuestion) as info:
        tiny_backend.generate([features], question)
    assert info.value.reason == reason
    again = pickle.loads(pickle.dumps(info.value))  # it crosses Ray's process boundary intact
    assert again.reason == reason and str(again) == str(info.value)
    tiny_backend.check_question("what is \x1f<b>here</b>, ü?")  # odd but harmless: accepted


def test_backend_info_matches_model(tiny_backend):
    info = tiny_backend.info
    assert info.encoder_size == (32, 32) and info.grid == (4, 4) and info.tokens_per_image == 16
    assert info.num_layers == 2 and info.device == "cpu" and info.dtype == "float32"


def test_sdpa_backend_reads_the_same_maps_and_answers_as_eager(tiny_backend, tiny_config):
    """sdpa (fast on GPUs, no maps) decodes; the attention read switches to eager for its pass only."""
    sdpa = load_backend(tiny_config.model.model_copy(update={"attn_implementation": "sdpa"}))
    features = tiny_backend.encode_images(images(1))[0]
    layers = list(range(tiny_backend.info.num_layers))
    for backend in (tiny_backend, sdpa):
        assert backend.generate([features], QUESTION).token_ids == tiny_backend.generate([features], QUESTION).token_ids
    want = tiny_backend.attention_grids(features, QUESTION, [5, 6], layers, "all")
    got = sdpa.attention_grids(features, QUESTION, [5, 6], layers, "all")
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    cfg = (
        sdpa.model.config
    )  # switched back after the read (to sdpa behind the capture wrapper); the tower never switched
    assert (cfg.text_config._attn_implementation, cfg.vision_config._attn_implementation) == (
        capture.capturing_name("sdpa"),
        "sdpa",
    )
    with torch.inference_mode():  # and the switch really matters: sdpa itself returns no maps
        ids = sdpa.prompt_ids(sdpa.config.prompt_template, QUESTION, 1)
        out = sdpa.model(inputs_embeds=sdpa.merge_embeddings(ids, [features]), output_attentions=True)
    assert not out.attentions or out.attentions[0] is None


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_backend(ModelConfig(path=str(tmp_path / "no-such-model")))


def test_bfloat16_runs(tiny_config):
    backend = load_backend(tiny_config.model.model_copy(update={"dtype": "bfloat16"}))
    features = backend.encode_images(images(1))
    assert features.dtype == torch.bfloat16
    gen = backend.generate([features[0]], QUESTION)
    assert gen.logits.dtype == torch.float32 and np.isfinite(gen.scores.min_entropy).all()


def test_concurrent_decodes_and_attention_reads_on_sdpa_match_sequential(tiny_config):
    """A replica serves requests from a thread pool: decodes (sdpa) and attention reads (switched
    to eager) interleave, and each must still get exactly its sequential result."""
    from concurrent.futures import ThreadPoolExecutor

    sdpa = load_backend(tiny_config.model.model_copy(update={"attn_implementation": "sdpa"}))
    feats = sdpa.encode_images(images(4, seed=3))
    jobs = [("gen", i) for i in range(4)] + [("att", i) for i in range(4)]
    jobs = jobs * 3

    def run(job):
        kind, i = job
        if kind == "gen":
            return sdpa.generate([feats[i]], QUESTION).token_ids
        return sdpa.attention_grid(feats[i], QUESTION, [5], layer=-1, query_rows="all").tolist()

    want = [run(j) for j in jobs]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(run, jobs))
    for a, b in zip(want, got):
        np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-5, atol=1e-7)
    assert sdpa.model.config.text_config._attn_implementation == capture.capturing_name("sdpa")


def test_the_kernel_switch_never_happens_while_a_decode_runs(tiny_config):
    """Deterministic check of the locking: decodes are slowed down so that they overlap the reads;
    every switch must find no decode in flight."""
    import threading
    import time as _time
    from concurrent.futures import ThreadPoolExecutor

    sdpa = load_backend(tiny_config.model.model_copy(update={"attn_implementation": "sdpa"}))
    feats = sdpa.encode_images(images(2, seed=4))
    guard, in_flight, seen_at_switch = threading.Lock(), [0], []
    generate, switch = sdpa._generate, sdpa.model.set_attn_implementation

    def slow_generate(*args, **kwargs):
        with guard:
            in_flight[0] += 1
        try:
            _time.sleep(0.02)
            return generate(*args, **kwargs)
        finally:
            with guard:
                in_flight[0] -= 1

    def watched_switch(value):
        seen_at_switch.append(in_flight[0])
        return switch(value)

    sdpa._generate, sdpa.model.set_attn_implementation = slow_generate, watched_switch
    jobs = [lambda i=i: sdpa.generate([feats[i % 2]], QUESTION) for i in range(8)]
    jobs += [lambda i=i: sdpa.attention_grid(feats[i % 2], QUESTION, [5], layer=-1, query_rows="all") for i in range(4)]
    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(job) for job in jobs[::2] + jobs[1::2]]:
            future.result()
    assert len(seen_at_switch) == 8 and set(seen_at_switch) == {0}
    # the last_input row is read by the capture wrapper in the configured kernel: no switch at all
    sdpa.attention_grid(feats[0], QUESTION, [], layer=-1, query_rows="last_input")
    assert len(seen_at_switch) == 8


def test_shared_exclusive_lock_excludes_and_prefers_waiting_exclusive():
    import threading
    import time as _time

    from collab.backends.hf import SharedExclusiveLock

    lock, events = SharedExclusiveLock(), []
    first_shared_in = threading.Event()

    def shared(name, hold):
        with lock.shared():
            events.append(f"{name}+")
            first_shared_in.set()
            _time.sleep(hold)
            events.append(f"{name}-")

    def exclusive():
        with lock.exclusive():
            events.append("X+")
            _time.sleep(0.05)
            events.append("X-")

    a = threading.Thread(target=shared, args=("a", 0.2))
    a.start()
    first_shared_in.wait()
    x = threading.Thread(target=exclusive)
    x.start()
    while lock._waiting != 1:  # x is now waiting for a
        _time.sleep(0.001)
    b = threading.Thread(target=shared, args=("b", 0.01))  # arrives while x waits: must go after x
    b.start()
    for t in (a, x, b):
        t.join()
    assert events == ["a+", "a-", "X+", "X-", "b+", "b-"]


def test_random_model_cli_builds_the_sizes_asked_for(tmp_path, capsys):
    """`python -m collab.models.tiny` makes heavier stand-ins (e.g. for benchmarks.serve_bench --model)."""
    import json as _json

    from collab.models import tiny

    tiny.main(
        [
            "--out",
            str(tmp_path / "m"),
            "--image-size",
            "48",
            "--patch-size",
            "8",
            "--vision-hidden",
            "48",
            "--vision-layers",
            "3",
            "--text-hidden",
            "64",
            "--text-layers",
            "3",
            "--text-heads",
            "2",
        ]
    )
    cfg = _json.loads((tmp_path / "m" / "config.json").read_text())
    assert (
        cfg["vision_config"]["image_size"],
        cfg["vision_config"]["hidden_size"],
        cfg["vision_config"]["num_hidden_layers"],
    ) == (48, 48, 3)
    assert (
        cfg["text_config"]["hidden_size"],
        cfg["text_config"]["num_hidden_layers"],
        cfg["text_config"]["num_attention_heads"],
    ) == (64, 3, 2)
    backend = load_backend(ModelConfig(path=str(tmp_path / "m"), max_new_tokens=2))
    assert backend.info.grid == (6, 6)
    with pytest.raises(SystemExit):
        tiny.main(["--out", str(tmp_path / "bad"), "--image-size", "50", "--patch-size", "8"])
    assert "multiple of --patch-size" in capsys.readouterr().err


def test_question_rows_are_normalised_by_the_generic_prompts_own_text_rows(tiny_backend):
    """attention.query_rows=question reads every text row after the image, for the question and for
    the generic prompt alike, and never needs the answer."""
    from collab import stages
    from collab.config import AttentionConfig

    features = tiny_backend.encode_images(images(1, seed=3))[0]
    cfg = AttentionConfig(layer=-1, query_rows="question")
    assert stages.capture_layers(cfg, [-1]) == []
    got = stages.attention_map(tiny_backend, features, QUESTION, [], cfg)
    q = tiny_backend.attention_grid(features, QUESTION, [], layer=-1, query_rows="question")
    g = tiny_backend.attention_grid(features, cfg.generic_prompt, [], layer=-1, query_rows="question")
    np.testing.assert_allclose(got, q / (g + cfg.epsilon), rtol=1e-6)
    last = tiny_backend.attention_grid(features, QUESTION, [], layer=-1, query_rows="last_input")
    assert not np.allclose(q, last)  # more rows than the last one
