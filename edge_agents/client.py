"""The edge side of the public HTTP protocol: make the global image, send it, obey `need_roi`.

Only the public API is used (`/v1/models`, `/v1/query`, `/v1/refine`); the edge never needs the
server's config, only how to size the images (`global_image`, `local_size`; API 1.1) and the
global-image mode that `/v1/models` reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import httpx
from PIL import Image

from collab.geometry import Box
from collab.imaging import ImageFormat, global_payload, global_size_from, load_image, local_payload

MIME = {"jpeg": "image/jpeg", "png": "image/png"}


@dataclass
class EdgeResult:
    """What the edge ends up with for one query."""

    answer: str
    stage: int
    first_answer: str | None
    policy: str
    score: float | None
    box: list[int] | None
    global_bytes: int
    local_bytes: int
    server_ms: dict[str, float] = field(default_factory=dict)
    session_expired: bool = False  # the refine was refused as expired: answer is the first pass's
    gate: dict | None = None  # the threshold the server used and why (entropy and adaptive policies)


class ProtocolError(RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


@dataclass
class EdgeImaging:
    """How this edge encodes images (its device profile decides quality)."""

    format: ImageFormat = "jpeg"
    jpeg_quality: int = 90


def global_upload(original: Image.Image, info: dict, imaging: EdgeImaging):
    """The global image as the server's /v1/models asks for it (size for this original, global-image mode)."""
    mode = info.get("defaults", {}).get("global_mode", "resize")
    size = global_size_from(info, original.size)
    return global_payload(original, size, mode, imaging.format, imaging.jpeg_quality)


def local_upload(original: Image.Image, box: list[int], local_size: list[int], imaging: EdgeImaging):
    """The crop a `need_roi` reply asks for (box in original pixels, at local_size)."""
    return local_payload(original, Box.from_seq(box), tuple(local_size), imaging.format, imaging.jpeg_quality)


class EdgeClient:
    """Synchronous client (tests, scripts)."""

    def __init__(
        self,
        base_url: str,
        client_id: str | None = None,
        imaging: EdgeImaging | None = None,
        timeout: float = 60.0,
        token: str | None = None,
    ):
        """`token`: bearer token for a gateway with auth on (default: $COLLAB_API_TOKEN if set)."""
        token = token if token is not None else os.environ.get("COLLAB_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)
        self.client_id = client_id
        self.imaging = imaging or EdgeImaging()
        self._info: dict | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def models(self) -> dict:
        if self._info is None:
            self._info = self._json(self.http.get("/v1/models"))
        return self._info

    @staticmethod
    def _json(resp: httpx.Response) -> dict:
        if resp.status_code >= 400:
            raise ProtocolError(resp.status_code, resp.text)
        return resp.json()

    def ask(
        self,
        image,
        question: str,
        *,
        policy: str | None = None,
        threshold: float | None = None,
        question_id: str | None = None,
        max_extra_bytes: int | None = None,
        deadline_ms: float | None = None,
        uplink_kbps: float | None = None,
    ) -> EdgeResult:
        """One query; the budget fields are for policy `adaptive` (the server asks for no crop that
        would not fit them)."""
        original = load_image(image)
        payload = global_upload(original, self.models(), self.imaging)
        fields = {"question": question, "original_width": str(original.width), "original_height": str(original.height)}
        for key, value in (
            ("policy", policy),
            ("threshold", threshold),
            ("client_id", self.client_id),
            ("question_id", question_id),
            ("max_extra_bytes", max_extra_bytes),
            ("deadline_ms", deadline_ms),
            ("uplink_kbps", uplink_kbps),
        ):
            if value is not None:
                fields[key] = str(value)
        files = {"image": ("global." + payload.format, payload.data, MIME[payload.format])}
        first = self._json(self.http.post("/v1/query", data=fields, files=files))
        if first["status"] == "answered":
            return EdgeResult(
                first["answer"],
                1,
                first.get("first_answer"),
                first["policy"],
                first.get("score"),
                None,
                payload.nbytes,
                0,
                first["timings_ms"],
                gate=first.get("gate"),
            )
        local = local_upload(original, first["box"], first["local_size"], self.imaging)
        data = {"session_id": first["session_id"]}
        if self.client_id is not None:
            data["client_id"] = self.client_id
        resp = self.http.post(
            "/v1/refine", data=data, files={"image": ("local." + local.format, local.data, MIME[local.format])}
        )
        if resp.status_code == 410:  # expired: nothing is lost, the edge keeps the first-pass answer
            return EdgeResult(
                first["first_answer"],
                1,
                first["first_answer"],
                first["policy"],
                first["score"],
                first["box"],
                payload.nbytes,
                local.nbytes,
                first["timings_ms"],
                session_expired=True,
                gate=first.get("gate"),
            )
        second = self._json(resp)
        timings = {**first["timings_ms"], **{f"refine_{k}": v for k, v in second["timings_ms"].items()}}
        return EdgeResult(
            second["answer"],
            2,
            first["first_answer"],
            first["policy"],
            first["score"],
            first["box"],
            payload.nbytes,
            local.nbytes,
            timings,
            gate=second.get("gate"),
        )
