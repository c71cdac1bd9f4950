"""The `collab-vlm` command, `ask` against the live app, the demo's pictures, and the shared
parsers and loaders every command line uses."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from collab.cli import COMMANDS
from collab.cli import main as cli_main
from collab.config import ConfigError, load_typed, nested, parse_sets
from collab.data.synthetic import generate_item, parse_split
from collab.progress import progress


def test_every_command_dispatches_to_a_module_with_a_main():
    import importlib

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_cli_help_and_unknown_command(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert cli_main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_cli_passes_arguments_through(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["eval", "--synthetic", "five"])  # the eval parser's own error
    assert exit_.value.code == 2
    assert "expected SEED:N" in capsys.readouterr().err


def test_parse_split():
    assert parse_split("4242:500") == (4242, 500)
    for bad in ("12", "a:b", "1:0", "1:-3", "-1:5", ""):
        with pytest.raises(ValueError):
            parse_split(bad)


def test_nested_and_parse_sets_share_one_shape():
    assert nested({"a.b": 1, "a.c": 2, "d": 3}) == {"a": {"b": 1, "c": 2}, "d": 3}
    assert parse_sets(["a.b=1", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    with pytest.raises(ConfigError, match="already set"):
        nested({"a": 1, "a.b": 2})
    given = {"a": {"b": {"c": 1}}}
    assert nested({**given, "a.b.d": 2}) == {"a": {"b": {"c": 1, "d": 2}}} and given == {"a": {"b": {"c": 1}}}
    # YAML 1.1 would read 77:16 as the base-60 integer 4636: a split stays a string
    assert parse_sets(["source.synthetic=77:16", "x=1e-3"]) == {"source": {"synthetic": "77:16"}, "x": 0.001}


def test_a_split_written_unquoted_in_yaml_loads(tmp_path):
    from edge_agents.config import load_loadtest_config

    path = tmp_path / "load.yaml"
    path.write_text("agents: 2\nsource:\n  synthetic: 77:16\n")
    assert load_loadtest_config(path).source.synthetic == "77:16"


def test_load_typed_names_every_bad_field():
    from edge_agents.config import LoadTestConfig

    with pytest.raises(ConfigError) as err:
        load_typed(LoadTestConfig, {"agents": 0}, nested({"workload.mode": "sideways"}), "x.yaml", "load-test config")
    lines = str(err.value).splitlines()
    assert lines[0] == "x.yaml: invalid load-test config"
    assert {line.split(":")[0].strip() for line in lines[1:]} == {"agents", "workload.mode"}


def test_progress_off_a_terminal_writes_a_few_whole_lines():
    buf = io.StringIO()
    bar = progress(total=1000, desc="work", every_s=3600, file=buf)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(loss=0.5)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue()
    assert len(lines) == 2 and "0/1000" in lines[0] and "1000/1000" in lines[1]


def test_deployment_options_come_from_the_serve_configs():
    from deployments.app import deployment_options

    local, gpu = deployment_options(), deployment_options("configs/serve_gpu.yaml")
    names = {"Gateway", "VisionEncoder", "FirstPassDecoder", "RoISearch", "RefinedDecoder", "SessionStore"}
    assert set(local) == set(gpu) == names
    assert local["SessionStore"]["num_replicas"] == gpu["SessionStore"]["num_replicas"] == 1
    assert gpu["FirstPassDecoder"]["ray_actor_options"]["num_gpus"] > 0
    with pytest.raises(ConfigError):
        deployment_options("configs/default.yaml")  # not a Serve config


def test_ask_your_own_image_against_the_live_app(served, tmp_path, capsys):
    from edge_agents.ask import main as ask_main

    item = generate_item(31, 0, kind="fine")
    photo = tmp_path / "photo.jpg"
    item.image.save(photo, quality=95)
    picture = tmp_path / "out" / "photo.png"
    assert ask_main([str(photo), item.question, "--url", served, "--policy", "always", "--out", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "stage 2" in out and "box:" in out and str(picture) in out
    with Image.open(picture) as im:
        assert im.width > 640 and im.height > 400  # the image with its box, the uploads beside it, a caption

    assert ask_main([str(photo), item.question, "--url", served, "--policy", "never", "--out", "none", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["stage"] == 1 and record["box"] is None and record["local_bytes"] == 0 and record["picture"] is None
    assert 0 < record["global_bytes"] < record["full_resolution_bytes"]


def test_ask_refusals_are_clear_exit_2(served, tmp_path, capsys):
    from edge_agents.ask import main as ask_main

    photo = tmp_path / "photo.png"
    generate_item(31, 1).image.save(photo)
    assert ask_main([str(tmp_path / "missing.jpg"), "what?", "--url", served]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert ask_main([str(photo), "what is <image> here?", "--url", served, "--out", "none"]) == 2
    assert "HTTP 422" in capsys.readouterr().err
    assert ask_main([str(photo), "what?", "--url", "http://127.0.0.1:9", "--out", "none"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_demo_sheet_shows_each_query(tmp_path):
    from edge_agents.client import EdgeImaging, EdgeResult
    from edge_agents.pictures import QueryView, queries_sheet

    info = {"encoder_size": [96, 96], "defaults": {"global_mode": "resize"}}
    item = generate_item(31, 2, kind="fine")
    refined = EdgeResult("7", 2, "3", "entropy", 2.5, list(item.target_box), 3000, 2500)
    answered = EdgeResult("red", 1, "red", "entropy", 0.2, None, 3000, 0)
    views = [QueryView(item.image, item.question, refined, item.answer), QueryView(item.image, "what?", answered)]
    assert "refined from the crop" in views[0].caption() and "answered from the global image" in views[1].caption()
    path = queries_sheet(views, info, EdgeImaging(), tmp_path / "queries.png")
    with Image.open(path) as im:
        assert im.height > im.width / 4 * 1.5  # two rows
