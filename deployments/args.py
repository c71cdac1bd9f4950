"""Typed arguments of the Serve application, read from `serve_config.yaml` `args:`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from collab.paths import REPO_ROOT


class SessionArgs(BaseModel):
    """Bounds of the refine-session store: nothing grows without limit."""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(60.0, gt=0, description="A session not refined within this time expires.")
    max_sessions: int = Field(10_000, ge=1, description="Oldest sessions are evicted beyond this count.")
    max_bytes: int = Field(512 * 2**20, ge=1, description="Oldest sessions are evicted beyond this feature memory.")


class BatchArgs(BaseModel):
    """`@serve.batch` of a stage: requests that arrive within the wait share one model pass."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)


class AppArgs(BaseModel):
    """What the app builder needs; everything about the method itself stays in the collab config."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field("configs/default.yaml", description="collab YAML config (relative to the repo root or cwd).")
    model_path: str | None = Field(None, description="Override model.path of the collab config.")
    device: str | None = Field(None, description="Override model.device (e.g. cuda).")
    dtype: str | None = Field(None, description="Override model.dtype.")
    sessions: SessionArgs = Field(default_factory=SessionArgs)
    encoder_batch: BatchArgs = Field(default_factory=BatchArgs)
    decoder_batch: BatchArgs = Field(
        default_factory=BatchArgs, description="Batching of concurrent first and refined passes (each decoder)."
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Gateway deadline for one request's downstream calls.")
    max_image_bytes: int = Field(8 * 2**20, ge=1, description="Largest accepted image upload (bytes).")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest accepted image (pixels), checked before decoding."
    )
    max_body_bytes: int = Field(8 * 2**20 + 2**16, ge=1, description="Largest accepted request body (bytes).")
    auth_token_env: str | None = Field(
        "COLLAB_API_TOKEN",
        description="If this environment variable is set on the gateway, /v1/* needs `Authorization: Bearer <it>`.",
    )

    def overrides(self) -> dict:
        model = {k: v for k, v in (("path", self.model_path), ("device", self.device), ("dtype", self.dtype)) if v}
        return {"model": model} if model else {}

    def config_path(self) -> Path:
        path = Path(self.config)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        return path
