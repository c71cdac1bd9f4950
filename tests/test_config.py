from pathlib import Path

import pytest

from collab.config import CollabConfig, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    import yaml

    collab_configs = [
        p for p in sorted((REPO / "configs").glob("*.yaml")) if "applications" not in yaml.safe_load(p.read_text())
    ]
    assert len(collab_configs) >= 2
    for path in collab_configs:
        assert isinstance(load_config(path), CollabConfig), path


def test_serve_configs_name_real_deployments_and_valid_args():
    import yaml

    from deployments.args import AppArgs

    names = {"Gateway", "VisionEncoder", "FirstPassDecoder", "RoISearch", "RefinedDecoder", "SessionStore"}
    for path in (
        REPO / "serve_config.yaml",
        REPO / "configs" / "serve_gpu.yaml",
        REPO / "configs" / "serve_gpu_qwen.yaml",
    ):
        app = yaml.safe_load(path.read_text())["applications"][0]
        assert app["import_path"] == "deployments.app:build_app"
        args = AppArgs.model_validate(app["args"])
        assert isinstance(load_config(args.config_path()), CollabConfig)
        deployments = {d["name"]: d for d in app["deployments"]}
        assert set(deployments) == names, path
        for d in deployments.values():
            scaling = d.get("autoscaling_config")
            if scaling:
                assert d["max_ongoing_requests"] > scaling["target_ongoing_requests"], (path, d["name"])


def test_bad_field_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gate:\n  threshold: high\nroi:\n  ratios: [1.0, -2]\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "gate.threshold" in message and "roi.ratios" in message and str(bad) in message


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("gate:\n  treshold: 0.3\n")
    with pytest.raises(ConfigError, match="gate.treshold"):
        load_config(bad)


def test_templates_must_have_placeholders(tmp_path):
    bad = tmp_path / "tpl.yaml"
    bad.write_text("model:\n  refine_template: 'USER: <image> {question}'\n")
    with pytest.raises(ConfigError, match="two <image>"):
        load_config(bad)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_overrides_merge_deeply(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("gate:\n  threshold: 0.3\n  score: shannon\n")
    cfg = load_config(f, overrides={"gate": {"threshold": 0.9}})
    assert cfg.gate.threshold == 0.9 and cfg.gate.score == "shannon"


def test_serve_config_max_replicas_fit_the_cpus_it_is_sized_for():
    """Every scale-up must be able to start: at max replicas the CPUs asked for fit 2 CPUs."""
    import yaml

    from collab.paths import REPO_ROOT

    app = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())["applications"][0]
    total = 0.0
    for d in app["deployments"]:
        replicas = d.get("num_replicas") or d["autoscaling_config"]["max_replicas"]
        total += replicas * d["ray_actor_options"]["num_cpus"]
    assert total <= 2.0, f"serve_config.yaml asks for {total:.2f} CPUs at max replicas"


def test_attention_heads_are_checked_in_the_file_and_against_the_model(tmp_path, tiny_config, tiny_backend):
    from collab import stages
    from collab.pipeline import ReferencePipeline

    bad = tmp_path / "heads.yaml"
    for heads in ("[]", "[1, 1]", "[-1]"):
        bad.write_text(f"attention:\n  heads: {heads}\n")
        with pytest.raises(ConfigError, match="attention.heads"):
            load_config(bad)

    def with_attention(**fields):
        return tiny_config.model_copy(update={"attention": tiny_config.attention.model_copy(update=fields)})

    n = tiny_backend.info.num_heads
    with pytest.raises(ConfigError, match=rf"attention: .*\[0, {n}\)"):  # at start-up, not on the first crop
        ReferencePipeline(tiny_backend, with_attention(heads=[n], layer=0))
    with pytest.raises(ConfigError, match="out of range"):
        stages.check_attention_fits(with_attention(layer=99).attention, tiny_backend.info)
    stages.check_attention_fits(with_attention(heads=[n - 1], layer=0).attention, tiny_backend.info)
