"""Application builder: `serve run serve_config.yaml` calls `build_app(args)`.

    Gateway (HTTP) -> VisionEncoder -> FirstPassDecoder -> RoISearch -> SessionStore
                                 \\-> RefinedDecoder (global tokens from SessionStore + local tokens)

Each stage is its own deployment with its own autoscaling and resources. Those options are written
in one place, the Serve config's `deployments:` section (serve_config.yaml; configs/serve_gpu.yaml
for GPUs): `serve run` applies them, and `compose` reads the same file for programmatic use.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve import Application

from collab.config import ConfigError
from collab.paths import REPO_ROOT
from deployments.args import AppArgs
from deployments.encoder import VisionEncoder
from deployments.first_pass import FirstPassDecoder
from deployments.gateway import Gateway
from deployments.refined import RefinedDecoder
from deployments.roi_search import RoISearch
from deployments.sessions import SessionStore


def build_app(args: dict) -> Application:
    """The builder `serve run CONFIG` calls with the config's `args:` (typed by AppArgs). Serve then
    applies that file's own `deployments:` options, so none are set here."""
    return compose(AppArgs.model_validate(args or {}), serve_config=None)


SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"


def deployment_options(serve_config: str | Path = SERVE_CONFIG, app: str = "collab") -> dict[str, dict]:
    """Each deployment's options (resources, autoscaling, limits) by name, from a Serve config file."""
    try:
        apps = yaml.safe_load(Path(serve_config).read_text())["applications"]
        found = next(a for a in apps if a.get("name") == app)
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration) as exc:
        raise ConfigError(f"{serve_config}: no application {app!r} with deployments ({type(exc).__name__})") from None
    return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in found.get("deployments") or []}


def compose(
    app_args: AppArgs, overrides: dict[str, dict] | None = None, serve_config: str | Path | None = SERVE_CONFIG
) -> Application:
    """Bind the DAG with each deployment's options from `serve_config` (None: Serve's defaults);
    `overrides` replaces option keys per deployment name (tests, programmatic use)."""
    opts = deployment_options(serve_config) if serve_config is not None else {}
    for name, extra in (overrides or {}).items():
        opts[name] = {**opts.get(name, {}), **extra}

    def bind(deployment, *init_args):
        options = opts.get(deployment.name)
        return (deployment.options(**options) if options else deployment).bind(*init_args)

    return bind(
        Gateway,
        bind(VisionEncoder, app_args),
        bind(FirstPassDecoder, app_args),
        bind(RoISearch, app_args),
        bind(RefinedDecoder, app_args),
        bind(SessionStore, app_args),
        app_args,
    )
