"""Shared fixtures: a random tiny LLaVA saved to disk and loaded back through from_pretrained."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from collab.models.tiny import TinyLlavaSpec, make_random_tiny_llava

    return make_random_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), spec=TinyLlavaSpec(), seed=0)


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir):
    from collab.config import CollabConfig

    return CollabConfig.model_validate(
        {
            "model": {
                "path": str(tiny_model_dir),
                "prompt_template": "USER: <image>\n{question} ASSISTANT:",
                "refine_template": "USER: <image>\n<image>\n{question} ASSISTANT:",
                "max_new_tokens": 4,
            },
            "attention": {"layer": -1},
        }
    )


@pytest.fixture(scope="session")
def tiny_backend(tiny_config):
    from collab.backends import load_backend

    return load_backend(tiny_config.model)
