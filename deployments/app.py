"""Application builder: `serve run serve_config.yaml` calls `build_app(args)`.

    Gateway (HTTP) -> VisionEncoder -> FirstPassDecoder -> RoISearch -> SessionStore
                                 \\-> RefinedDecoder (global tokens from SessionStore + local tokens)

Each stage is its own deployment with its own autoscaling and resources (serve_config.yaml).
"""

from __future__ import annotations

from ray.serve import Application

from deployments.args import AppArgs
from deployments.encoder import VisionEncoder
from deployments.first_pass import FirstPassDecoder
from deployments.gateway import Gateway
from deployments.refined import RefinedDecoder
from deployments.roi_search import RoISearch
from deployments.sessions import SessionStore


def build_app(args: dict) -> Application:
    """The builder `serve run serve_config.yaml` calls with the config's `args:` (typed by AppArgs)."""
    return compose(AppArgs.model_validate(args or {}))


def compose(app_args: AppArgs, deployment_options: dict[str, dict] | None = None) -> Application:
    """Bind the DAG. deployment_options: per-deployment `.options(...)` overrides by name (tests,
    programmatic use); with `serve run`, serve_config.yaml's `deployments:` section does this."""
    opts = deployment_options or {}

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
