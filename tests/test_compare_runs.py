"""The reproducibility scripts: compare_runs (same model? same software?) and stage2_first_losses."""

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from collab.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "compare_runs.py"
SOFTWARE = {"python": "3.11.7", "torch": "2.13.0+cpu", "pillow": "13.0.0"}


def make_run(path, elapsed, software, weight, loss=1.5):
    path.mkdir()
    rows = [
        {"elapsed_s": 0.0, "recipe": {"seed": 0}, "software": software},
        {"elapsed_s": elapsed, "stage": 2, "step": 500, "loss_ema": loss, "eval_s": elapsed / 10},
        {"elapsed_s": elapsed, "done": True, "minutes": elapsed / 60},
    ]
    (path / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_file({"w": torch.full((2, 2), weight)}, str(path / "model.safetensors"))


def compare(a, b):
    done = subprocess.run([sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout


def test_runs_that_differ_only_in_timing_are_identical(tmp_path):
    make_run(tmp_path / "a", 100.0, SOFTWARE, 0.5)
    make_run(tmp_path / "b", 130.0, SOFTWARE, 0.5)
    code, out = compare(tmp_path / "a", tmp_path / "b")
    assert code == 0, out
    assert "software: the same (python 3.11.7, torch 2.13.0+cpu, pillow 13.0.0)" in out
    assert "3 of 3 records equal" in out and "largest absolute difference 0" in out


def test_other_library_versions_are_named_and_other_weights_fail(tmp_path):
    make_run(tmp_path / "a", 100.0, SOFTWARE, 0.5)
    make_run(tmp_path / "b", 100.0, {**SOFTWARE, "pillow": "12.1.0"}, 0.25, loss=1.4)
    code, out = compare(tmp_path / "a", tmp_path / "b")
    assert code == 1, out
    assert "software differs, so the weights may too: pillow 13.0.0 / 12.1.0" in out
    assert "1 of 3 records equal" in out and "first difference: record 1 (step 500): loss_ema" in out
    assert "largest absolute difference 0.25" in out


def test_other_software_alone_is_named_but_equal_weights_still_pass(tmp_path):
    make_run(tmp_path / "a", 100.0, SOFTWARE, 0.5)
    make_run(tmp_path / "b", 100.0, {**SOFTWARE, "torch": "2.14.1"}, 0.5)
    code, out = compare(tmp_path / "a", tmp_path / "b")
    assert code == 0, out
    assert "software differs, so the weights may too: torch 2.13.0+cpu / 2.14.1" in out


def test_stage2_first_losses_are_the_same_whatever_torchs_seed(tmp_path):
    """scripts/stage2_first_losses.py prints a part's first batches and the fresh model's losses;
    the stream seeds its own generators, so torch's global seed must not change the printout, and
    the decoder's seed must."""
    import yaml

    from collab.training.recipe import Recipe
    from collab.training.train import train
    from tests.test_training import TOY

    raw = json.loads(json.dumps(TOY))
    raw["vlm"]["steps"] = 0
    tower = train(Recipe.model_validate(raw), tmp_path / "tower")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    script = str(REPO_ROOT / "scripts" / "stage2_first_losses.py")

    def printout(*extra):
        args = [sys.executable, script, "--recipe", str(tmp_path / "recipe.yaml"), "--tower", str(tower), *extra]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if line.startswith("batch ")]

    first = printout("--batches", "2")
    assert len(first) == 2 and "loss" in first[0]
    assert printout("--batches", "2", "--torch-seed", "7") == first
    drawn_at_3 = printout("--batches", "2", "--decoder-seed", "3")
    assert drawn_at_3 != first
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**raw, "decoder_seed": 3}))
    assert printout("--batches", "2") == drawn_at_3  # the recipe's own decoder_seed by default
