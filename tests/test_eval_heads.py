"""python -m collab.eval.heads: the pairs it chooses, scored offline, score the same in collab.eval."""

import json

import pytest
import yaml

from collab.eval.__main__ import main as eval_main
from collab.eval.heads import main as heads_main


@pytest.mark.parametrize("relative", [True, False])  # a tie goes to the config's: both reads are exercised
def test_chosen_pairs_score_in_the_evaluation_as_they_did_offline(tiny_config, tmp_path, relative):
    """The tool's offline read of its chosen pairs gives the RoI box that `collab.eval` finds with
    attention.layer_heads set to them, item by item, and so the same hit rate: the offline read is
    the server's read."""
    config = tiny_config.model_dump(mode="json")
    config["attention"].update(query_rows="question", rows="sharpest", head_reduce="geometric", relative=relative)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    assert heads_main(["--split", "7:40", "--config", str(cfg), "--max-pairs", "3", "--out", str(tmp_path)]) == 0
    chosen = json.loads((tmp_path / "heads.json").read_text())
    info_layers = {row["layer"] for row in chosen["alone"]}
    assert len(chosen["alone"]) == len(info_layers) * len({row["head"] for row in chosen["alone"]})
    assert 1 <= len(chosen["layer_heads"]) <= 3
    assert chosen["hit_rate"] == max(step["hit_rate"] for step in chosen["path"])
    best_alone = max(row["hit_rate"] for row in chosen["alone"])
    assert chosen["path"][0]["hit_rate"] == best_alone  # greedy starts from the best single pair

    assert {read["relative"] for read in chosen["reads"]} == {False, True}
    assert chosen["hit_rate"] == max(read["hit_rate"] for read in chosen["reads"])

    pairs, relative = json.dumps(chosen["layer_heads"]), json.dumps(chosen["relative"])
    out = tmp_path / "eval"
    sets = ["--set", f"attention.layer_heads={pairs}", "--set", f"attention.relative={relative}"]
    argv = ["--synthetic", "7:40", "--config", str(cfg), *sets, "--out", str(out)]
    assert eval_main([*argv, "--policies", "never,always", "--layers", "all"]) == 0
    assert (out / "layers.png").stat().st_size > 0  # each layer alone, the pairs' read as a line
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["attention"]["layer_heads"] == chosen["layer_heads"]
    assert report["config"]["attention"]["relative"] == chosen["relative"]
    assert report["roi"]["n"] == chosen["items"]
    assert abs(report["roi"]["hit_rate"] - chosen["hit_rate"]) < 1e-9
    evaluated = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    boxes = {o["question_id"]: o["roi_box"] for o in evaluated if o["question_id"] in chosen["rois"]}
    assert len(boxes) == chosen["items"] and boxes == chosen["rois"]  # the same box, item by item


def test_rejects_a_bad_split(capsys):
    assert heads_main(["--split", "five"]) == 2
    assert "SEED:N" in capsys.readouterr().err
