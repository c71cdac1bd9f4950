"""Shared start-up of model-holding replicas: config, thread count, backend."""

from __future__ import annotations

import logging

import torch

from collab.backends import load_backend
from collab.config import CollabConfig, load_config
from collab.paths import REPO_ROOT
from deployments.args import AppArgs

log = logging.getLogger("ray.serve")


def load_collab_config(args: AppArgs) -> CollabConfig:
    return load_config(args.config_path(), args.overrides())


def load_model(args: AppArgs):
    """The collab config and a loaded backend; torch threads from config (Ray may set them to 1)."""
    config = load_collab_config(args)
    if config.model.num_threads:
        torch.set_num_threads(config.model.num_threads)
    backend = load_backend(config.model, search_roots=[REPO_ROOT])
    log.info("loaded %s on %s (%s)", backend.info.model_name, backend.info.device, backend.info.dtype)
    return config, backend
