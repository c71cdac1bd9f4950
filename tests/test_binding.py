"""collab.eval.binding: which object a row of attention is on, and the command on the shipped model."""

import json

import numpy as np

from collab.eval.binding import main, named_hits, object_cells


def test_object_cells_and_named_hits():
    objects = [{"box": [0, 0, 200, 200]}, {"box": [300, 300, 400, 400]}]
    cells = object_cells(objects, (400, 400), (4, 4))  # 100 px cells, centres at 50, 150, ...
    assert cells[0].tolist() == [0, 1, 4, 5] and cells[1].tolist() == [15]
    attention = np.zeros((2, 3, 16))  # (heads, rows, visual tokens)
    attention[0, :, 15] = 1.0  # head 0 on the small object
    attention[1, :, [0, 1]] = 0.3  # head 1 on part of the large one
    hits = named_hits(attention, cells, target=1)
    assert hits[0].tolist() == [1, 1, 1] and hits[1].tolist() == [0, 0, 0]
    empty = object_cells([{"box": [10, 10, 20, 20]}, {"box": [0, 0, 400, 400]}], (400, 400), (4, 4))
    assert len(empty[0]) == 0 and named_hits(np.ones(16), empty, target=0) == 0  # no cell: never the argmax


def test_the_command_reports_every_layer_head_and_token(tmp_path, capsys):
    assert main(["--split", "1001:2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "binding.json").read_text())
    assert set(report["coarse_by_objects"]) == {"color", "shape"}
    assert all(set(by_n) == {"1", "2", "3", "4", "5"} for by_n in report["coarse_by_objects"].values())
    assert [rows["qtype"] for rows in report["rows"]] == ["shape", "color", "number"]
    assert report["rows"][1]["tokens"][:2] == ["what", "color"]  # named by shape alone
    shape_rows = report["rows"][0]
    assert shape_rows["qtype"] == "shape" and shape_rows["tokens"][:2] == ["what", "shape"]
    assert len(shape_rows["hit"]) == 4 and set(shape_rows["hit"]["L0"]) == {"h0", "h1", "h2", "h3", "mean"}
    assert "named-object hit by layer" in capsys.readouterr().out
