"""Shared fixtures: a random tiny LLaVA saved to disk and loaded back through from_pretrained."""

import os

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from test clusters


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from collab.models.tiny import TinyLlavaSpec, make_random_tiny_llava

    return make_random_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), spec=TinyLlavaSpec(), seed=0)


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir):
    from collab.adaptive import CalibrationCurve
    from collab.config import CollabConfig

    # the adaptive policy's curve for this model (a plausible shape: the app tests check the API, not its numbers)
    curve = CalibrationCurve(
        (0.0, 0.5, 1.0, 2.0, 4.0), (1.0, 0.8, 0.5, 0.2, 0.0), (0.3,) * 5, 2000.0, "tests", str(tiny_model_dir)
    )
    curve_path = curve.save(tiny_model_dir / "calibration.json")
    return CollabConfig.model_validate(
        {
            "model": {
                "path": str(tiny_model_dir),
                "prompt_template": "USER: <image>\n{question} ASSISTANT:",
                "refine_template": "USER: <image>\n<image>\n{question} ASSISTANT:",
                "max_new_tokens": 4,
            },
            "attention": {"layer": -1},
            "gate": {"adaptive": {"curve": str(curve_path)}},
        }
    )


@pytest.fixture(scope="session")
def tiny_backend(tiny_config):
    from collab.backends import load_backend

    return load_backend(tiny_config.model)


@pytest.fixture(scope="session")
def served(tiny_config, tmp_path_factory):
    """The app on a real local Ray (2 CPUs, loopback), shared by every test that needs HTTP."""
    from serve_helpers import APP, FAST_AUTOSCALE, free_port, start_serve, wait_for, write_collab_config

    from deployments.app import compose
    from deployments.args import AppArgs

    port = free_port()
    serve = start_serve(port)
    cfg = write_collab_config(tiny_config, tmp_path_factory.mktemp("serve") / "collab.yaml")
    args = {"config": str(cfg), "sessions": {"ttl_s": 30, "max_sessions": 100, "max_bytes": 2**24}}
    serve.run(
        compose(AppArgs.model_validate(args), {"FirstPassDecoder": {"autoscaling_config": FAST_AUTOSCALE}}),
        name=APP,
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}"

    def routed():  # the proxy learns the route shortly after serve.run returns
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(routed, timeout=60)
    yield url
    serve.delete(APP)
    serve.shutdown()
    import ray

    ray.shutdown()
