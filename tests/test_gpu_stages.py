"""The accelerator benchmark (benchmarks.gpu_stages) runs here on CPU at a tiny shape, so the script that
goes to a GPU machine is known to work before device time is spent on it."""

from __future__ import annotations

import json

from benchmarks import gpu_stages

STAGES = {
    "edge_global",
    "encode_global",
    "first_pass",
    "attention",
    "roi_search",
    "edge_local",
    "encode_local",
    "refine",
}


def test_tiny_shape_on_cpu_reports_every_stage_and_matches_plain_generate(tmp_path, capsys):
    assert (
        gpu_stages.main(
            [
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--dtype",
                "float32",
                "--attn",
                "eager,sdpa",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--max-new-tokens",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "gpu_stages.json").read_text())
    assert report["visual_tokens_per_image"] == 16 and report["max_new_tokens"] == 4
    for attn in ("eager", "sdpa"):
        variant = report["variants"][attn]
        # the split path (edge JPEG, separate encode, merged embeddings) is the model's own function
        assert variant["first_pass_tokens_equal_baseline"] == "3/3"
        assert set(variant["ours"]["p50_ms_per_stage"]) == STAGES
        assert variant["ours"]["first_pass_tokens_per_s"] > 0 and variant["baseline_generate"]["tokens_per_s"] > 0
        assert variant["ours"]["peak_memory_gib"] is None  # no CUDA here: not invented
    enc = report["encoder_batching"]
    assert enc["batch"] == 8 and enc["images_per_s_batch_1"] > 0 and enc["images_per_s_batch_8"] > 0
    assert "first-pass tokens equal to baseline: 3/3" in capsys.readouterr().out


def test_tiny_qwen_shape_on_cpu_matches_plain_generate_on_native_resolution_globals(tmp_path):
    """The Qwen2.5-VL variant (global images at a token budget, the photo's aspect ratio kept):
    the split path's first-pass tokens equal model.generate's from pixels and the image grid."""
    argv = ["--shape", "tiny-qwen", "--device", "cpu", "--dtype", "float32", "--attn", "sdpa"]
    argv += ["--repeats", "2", "--warmup", "1", "--max-new-tokens", "4", "--encoder-batch", "2", "--out", str(tmp_path)]
    assert gpu_stages.main(argv) == 0
    report = json.loads((tmp_path / "gpu_stages.json").read_text())
    assert report["shape"] == "tiny-qwen" and report["visual_tokens_per_image"] == 16  # the 112 px local
    variant = report["variants"]["sdpa"]
    assert variant["first_pass_tokens_equal_baseline"] == "3/3"
    assert set(variant["ours"]["p50_ms_per_stage"]) == STAGES
    assert report["encoder_batching"]["images_per_s_batch_2"] > 0


def test_bad_arguments_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        gpu_stages.main(["--shape", "tiny", "--device", "cpu", "--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_stages.main(["--shape", "tiny", "--device", "cpu", "--encoder-batch", "-1"])
