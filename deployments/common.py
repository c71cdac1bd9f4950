"""Shared start-up of model-holding replicas: config, thread count, backend."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from collab import stages
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
    stages.check_attention_fits(config.attention, backend.info)
    log.info("loaded %s on %s (%s)", backend.info.model_name, backend.info.device, backend.info.dtype)
    return config, backend


Request, Result = TypeVar("Request"), TypeVar("Result")


def each_on_failure(
    run: Callable[[list[Request]], list[Result]], requests: Sequence[Request]
) -> list[Result | Exception]:
    """`run` over the batch; if the batch fails, each request alone, so that one request's failure
    (an input the model cannot take, memory) is its own error and not its batch-mates'. The
    failures are returned in place, for the caller of each request to raise."""
    try:
        return run(list(requests))
    except Exception as exc:  # noqa: BLE001 - returned to the request it belongs to
        if len(requests) == 1:
            return [exc]
        log.warning(
            "a batch of %d failed (%s: %s); running its requests one by one", len(requests), type(exc).__name__, exc
        )
    out: list[Result | Exception] = []
    for request in requests:
        try:
            out.extend(run([request]))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    return out
