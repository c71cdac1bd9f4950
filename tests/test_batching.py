"""Batched decoding and attention reads: each request's result equals its own unbatched one, and
the question map read from a first pass's prefill equals the separate attention pass's map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from collab import stages
from collab.backends import load_backend
from collab.backends.base import AttentionRequest, DecodeRequest
from collab.policies import PolicySpec

# different lengths in tokens: the batch is left-padded
QUESTIONS = [
    "what number is in the red circle ?",
    "how many objects are there ?",
    "what color is the square ?",
    "what shape is the blue object ? what number is in the green cross ?",
    "what ?",
]


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def feats(tiny_backend):
    return tiny_backend.encode_images(images(len(QUESTIONS), seed=5))


@pytest.fixture(scope="module")
def sdpa_backend(tiny_config):
    return load_backend(tiny_config.model.model_copy(update={"attn_implementation": "sdpa"}))


def assert_same_generation(got, want):
    assert got.token_ids == want.token_ids and got.n_answer_tokens == want.n_answer_tokens
    assert got.answer == want.answer
    assert got.logits.shape == want.logits.shape
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.scores.min_entropy, want.scores.min_entropy, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_first_and_refined_passes_equal_one_by_one(tiny_backend, sdpa_backend, feats, attn):
    backend = tiny_backend if attn == "eager" else sdpa_backend
    lengths = {len(backend.tokenizer(q)["input_ids"]) for q in QUESTIONS}
    assert len(lengths) >= 3  # the batch really is ragged
    first = [DecodeRequest([f], q) for f, q in zip(feats, QUESTIONS)]
    refined = [DecodeRequest([f, feats[(i + 1) % len(feats)]], q) for i, (f, q) in enumerate(zip(feats, QUESTIONS))]
    for requests in (first, refined, first[:2] + refined[2:]):  # one kind, the other, and both in one batch
        batched = backend.generate_batch(requests)
        for r, got in zip(requests, batched):
            assert_same_generation(got, backend.generate(list(r.features), r.question))


def test_a_row_that_ends_early_is_trimmed_at_its_eos(tiny_backend, feats):
    """Rows of a batch keep decoding (as padding) after their EOS; each result stops at its own.
    Row 0 is made to emit EOS as its second token (a hook on the LM head from its second call on)."""
    eos, force = min(tiny_backend.eos_ids), {"on": True, "calls": 0}

    def eos_for_row_0(module, args, logits):
        force["calls"] += 1
        if force["on"] and force["calls"] == 2:  # call 1 is the prefill (first token), call 2 the second token
            logits = logits.clone()
            logits[0, -1, eos] = logits[0, -1].max() + 10.0
        return logits

    handle = tiny_backend.model.lm_head.register_forward_hook(eos_for_row_0)
    try:
        requests = [DecodeRequest([f], q) for f, q in zip(feats, QUESTIONS)]
        batched = tiny_backend.generate_batch(requests)
        force["calls"] = 0
        alone = [tiny_backend.generate(list(requests[0].features), requests[0].question)]
        force["on"] = False
        alone += [tiny_backend.generate(list(r.features), r.question) for r in requests[1:]]
    finally:
        handle.remove()
    assert batched[0].token_ids[1] == eos and len(batched[0].token_ids) == 2
    assert max(len(g.token_ids) for g in batched[1:]) > 2  # the others went on
    for got, want in zip(batched, alone):
        assert_same_generation(got, want)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefill_captured_maps_equal_the_attention_pass(tiny_backend, sdpa_backend, feats, attn):
    backend = tiny_backend if attn == "eager" else sdpa_backend
    layers = list(range(backend.info.num_layers))
    batched = backend.generate_batch([DecodeRequest([f], q, layers) for f, q in zip(feats, QUESTIONS)])
    for f, q, gen in zip(feats, QUESTIONS, batched):
        # the eager (maps) pass of the eager backend is the reference for both kernels
        want = tiny_backend.attention_grids(f, q, gen.token_ids[: gen.n_answer_tokens], layers, "last_input")
        assert set(gen.attention) == set(layers)
        for layer, grid in zip(layers, want):
            np.testing.assert_allclose(gen.attention[layer], grid, rtol=1e-4, atol=1e-6)
        alone = backend.generate([f], q, capture_layers=[-1])  # negative index, batch of one
        np.testing.assert_allclose(alone.attention[-1], want[-1], rtol=1e-4, atol=1e-6)
    assert backend.generate([feats[0]], QUESTIONS[0]).attention == {}  # nothing captured unless asked


def test_batched_attention_reads_equal_one_by_one(tiny_backend, feats):
    layers = [0, -1]
    requests = [AttentionRequest(f, q, [5, 6][: i % 3]) for i, (f, q) in enumerate(zip(feats, QUESTIONS))]
    for rows in ("last_input", "answer", "all"):
        batched = tiny_backend.attention_grids_batch(requests, layers, rows)
        for r, got in zip(requests, batched):
            want = tiny_backend.attention_grids(r.features, r.question, r.answer_ids, layers, rows)
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_captured_maps_leave_only_the_generic_pass(tiny_backend, tiny_config, feats, monkeypatch):
    cfg = tiny_config.attention
    spec = PolicySpec(name="always")
    requests = [stages.FirstPassRequest(f, q, spec, q) for f, q in zip(feats, QUESTIONS)]
    firsts = stages.first_passes(tiny_backend, requests, stages.capture_layers(cfg, [cfg.layer]))
    separate = [
        stages.attention_map(tiny_backend, f, q, p.generation.token_ids[: p.generation.n_answer_tokens], cfg)
        for f, q, p in zip(feats, QUESTIONS, firsts)
    ]
    calls = []
    original = tiny_backend.attention_grids_batch
    monkeypatch.setattr(
        tiny_backend,
        "attention_grids_batch",
        lambda reqs, *a: calls.append([r.question for r in reqs]) or original(reqs, *a),
    )
    map_requests = [
        stages.MapRequest(f, q, p.generation.token_ids[: p.generation.n_answer_tokens], p.generation.attention)
        for f, q, p in zip(feats, QUESTIONS, firsts)
    ]
    maps = stages.attention_maps_batch(tiny_backend, map_requests, cfg, [cfg.layer])
    assert calls == [[], [cfg.generic_prompt] * len(QUESTIONS)]  # no question pass; one generic pass for all
    for got, want in zip(maps, separate):
        np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-6)
    answer_rows = cfg.model_copy(update={"query_rows": "answer"})
    assert stages.capture_layers(answer_rows, [1]) == []  # answer rows need the answer: their own pass


def test_batched_layer_heads_reads_equal_one_by_one(tiny_backend, tiny_config, feats):
    """The read the first-pass deployment batches (stages.read_maps_batch) with (layer, head) pairs
    from two layers: a batch of questions of different lengths gives each query its own map."""
    cfg = tiny_config.attention.model_copy(
        update={
            "query_rows": "question",
            "rows": "sharpest",
            "head_reduce": "geometric",
            "layer_heads": [(0, 1), (-1, 0)],
        }
    )
    requests = [stages.MapRequest(f, q, []) for f, q in zip(feats, QUESTIONS)]
    batched = stages.read_maps_batch(tiny_backend, requests, cfg)
    assert len(batched) == len(QUESTIONS)
    for r, got in zip(requests, batched):
        np.testing.assert_allclose(got, stages.attention_map(tiny_backend, r.features, r.question, [], cfg), rtol=1e-4)
    assert not np.allclose(batched[0], batched[1])  # not one map for all


def test_a_failing_batch_is_rerun_request_by_request():
    """One request that breaks a batch (here: a negative number) fails alone; the others answer."""
    from deployments.common import each_on_failure

    calls = []

    def run(batch):
        calls.append(list(batch))
        if any(x < 0 for x in batch):
            raise ValueError("negative")
        return [2 * x for x in batch]

    out = each_on_failure(run, [1, -1, 3])
    assert out[0] == 2 and out[2] == 6 and isinstance(out[1], ValueError)
    assert calls == [[1, -1, 3], [1], [-1], [3]]
    assert each_on_failure(run, [4, 5]) == [8, 10]
