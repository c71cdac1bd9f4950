"""Gateway: the HTTP API (FastAPI ingress) that composes the stages into the two-stage protocol.

Visual features never pass through here: the encoder's response is handed to the first-pass
decoder and to the session store as a chained DeploymentResponse, and the refined decoder gets
the global features from the session store the same way.

(No `from __future__ import annotations` here: FastAPI must see the real parameter types.)
"""


import asyncio
import hmac
import logging
import os
import time
from typing import Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from collab.imaging import InvalidUpload, inspect_upload
from collab.policies import POLICIES, PolicySpec
from deployments import limits, metrics
from deployments.args import AppArgs
from deployments.common import load_collab_config
from deployments.sessions import digest

API_VERSION = "1.0"
MAX_QUESTION_CHARS = 1000
MAX_ORIGINAL_SIDE = 65_535
ENDPOINTS = {"/v1/query": "query", "/v1/refine": "refine", "/v1/models": "models"}
QUERY_FIELDS = {"question", "image", "original_width", "original_height", "policy", "threshold", "client_id", "question_id"}
REFINE_FIELDS = {"session_id", "image", "client_id"}
UPLOAD_STATUS = {"empty": 400, "too_large": 413, "not_image": 415, "animated": 422, "corrupt": 422, "size": 422}
# A stage that is down or restarting: the edge should retry (its retries are idempotent).
UNAVAILABLE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, BackPressureError)
log = logging.getLogger("ray.serve")

app = FastAPI(
    title="collab-vlm",
    version=API_VERSION,
    description="Collaborative edge-server VLM inference: the edge sends a low-resolution global image; "
    "when the server is unsure it asks for a crop of the original (`need_roi`), sent to `/v1/refine`.",
)


class Answered(BaseModel):
    status: Literal["answered"] = "answered"
    answer: str
    stage: int = Field(description="1: answered from the global image; 2: refined with the local image")
    score: float | None = Field(None, description="first-pass uncertainty of the gate's score kind")
    scores: dict[str, float] | None = None
    policy: str
    first_answer: str | None = None
    bytes_received: int
    timings_ms: dict[str, float]
    replayed: bool = False


class NeedRoI(BaseModel):
    status: Literal["need_roi"] = "need_roi"
    session_id: str
    box: list[int] = Field(description="[x0, y0, x1, y1] in ORIGINAL image pixels")
    local_size: list[int] = Field(description="[width, height] to resize the crop to")
    expires_in: float
    first_answer: str
    score: float
    scores: dict[str, float]
    policy: str
    bytes_received: int
    timings_ms: dict[str, float]


class ModelInfo(BaseModel):
    model: str
    encoder_size: list[int]
    grid: list[int]
    tokens_per_image: int
    device: str
    dtype: str
    policies: list[str]
    defaults: dict


def error(status: int, message: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=message, headers=headers)


@app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and Starlette's own 404/405
async def _json_errors(request, exc: HTTPException):
    """Every error is JSON: {"error": message, "status": code} (registered before serve.ingress wraps the app)."""
    return JSONResponse({"error": exc.detail, "status": exc.status_code}, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_errors(request, exc: RequestValidationError):
    """FastAPI's field validation, in our error format (no input echoed back: it may be bytes)."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": problems or "invalid request", "status": 422}, status_code=422)


def _reject(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


@app.middleware("http")
async def _guard(request: Request, call_next):
    """Bearer-token auth (when configured), the body-size limit, error counting for /v1/*, and a
    JSON 500 (logged by type only, no request data) for anything that escapes a handler."""
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):  # an app under a route prefix: /prefix/v1/query -> /v1/query
        path = path[len(root):]
    response = _check_limits(request) if path.startswith("/v1/") else None
    if response is None:
        try:
            response = await call_next(request)
        except Exception as exc:
            log.error("internal error on %s: %s", ENDPOINTS.get(path, "other"), type(exc).__name__)
            response = _reject(500, "internal server error")
    if response.status_code >= 400 and path.startswith("/v1/"):
        endpoint = ENDPOINTS.get(path, "other")  # a fixed label set: no series per random path
        metrics.gateway().requests.inc(tags={"endpoint": endpoint, "policy": "-", "outcome": f"error_{response.status_code // 100}xx"})
    return response


def _check_limits(request: Request) -> JSONResponse | None:
    current = limits.CURRENT
    if current is None:
        return None
    if current.token is not None:  # constant-time compare: no timing oracle on the token
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {current.token}".encode()):
            return _reject(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None:
            return _reject(411, "a Content-Length header is required")
        if not length.isdigit() or int(length) > current.max_body_bytes:
            return _reject(413, f"the request body is larger than {current.max_body_bytes} bytes")
    return None


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=200)
@serve.ingress(app)
class Gateway:
    def __init__(
        self,
        encoder: DeploymentHandle,
        first_pass: DeploymentHandle,
        roi_search: DeploymentHandle,
        refined: DeploymentHandle,
        sessions: DeploymentHandle,
        args: AppArgs,
    ):
        self.encoder, self.first_pass, self.roi_search = encoder, first_pass, roi_search
        self.refined, self.sessions = refined, sessions
        self.args = args
        self.config = load_collab_config(args)
        self._info: dict | None = None
        limits.configure(os.environ.get(args.auth_token_env) if args.auth_token_env else None, args.max_body_bytes)

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.encoder.info.remote()
        return self._info

    async def _deadline(self, coro):
        """Never wait past request_timeout_s; a stage that is down is a 503 to retry, not a 500."""
        try:
            return await asyncio.wait_for(coro, timeout=self.args.request_timeout_s)
        except asyncio.TimeoutError:
            raise error(503, "the server is overloaded: a stage did not answer in time", {"Retry-After": "1"}) from None
        except UNAVAILABLE as exc:
            log.warning("a stage is unavailable: %s", type(exc).__name__)
            raise error(503, "a server stage is restarting or unavailable; retry", {"Retry-After": "1"}) from None

    async def _read_image(self, image: UploadFile, expected_size: tuple[int, int]) -> bytes:
        """The upload's bytes, after checking them (caps before decoding, JPEG/PNG, size)."""
        data = await image.read(self.args.max_image_bytes + 1)
        try:
            await asyncio.to_thread(inspect_upload, data, max_bytes=self.args.max_image_bytes,
                                    max_pixels=self.args.max_image_pixels, expected_size=expected_size)
        except InvalidUpload as exc:
            raise error(UPLOAD_STATUS[exc.reason], str(exc)) from None
        return data

    @staticmethod
    async def _no_extra_fields(request: Request, allowed: set[str]) -> None:
        extra = sorted(set((await request.form()).keys()) - allowed)
        if extra:
            raise error(422, f"unknown fields: {', '.join(extra)}; expected {', '.join(sorted(allowed))}")

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelInfo)
    async def models(self) -> ModelInfo:
        info = await self._deadline(self.info())
        gate = self.config.gate
        return ModelInfo(
            model=info["model_name"],
            encoder_size=list(info["encoder_size"]),
            grid=list(info["grid"]),
            tokens_per_image=info["tokens_per_image"],
            device=info["device"],
            dtype=info["dtype"],
            policies=list(POLICIES),
            defaults={"policy": gate.policy, "score": gate.score, "threshold": gate.threshold,
                      "aggregation_length": gate.aggregation_length, "random_rate": gate.random_rate,
                      "global_mode": self.config.imaging.global_mode},
        )

    @app.post("/v1/query", response_model=Answered | NeedRoI)
    async def query(
        self,
        request: Request,
        question: str = Form(..., description="the question about the image"),
        image: UploadFile = File(..., description="the global image (JPEG or PNG) at the encoder resolution"),
        original_width: int = Form(..., description="width of the edge's ORIGINAL image"),
        original_height: int = Form(..., description="height of the edge's ORIGINAL image"),
        policy: Literal["never", "always", "random", "entropy"] | None = Form(None),
        threshold: float | None = Form(None),
        client_id: str | None = Form(None, max_length=200),
        question_id: str | None = Form(None, max_length=200, description="stable id; keys the random policy"),
    ):
        started = time.perf_counter()
        await self._no_extra_fields(request, QUERY_FIELDS)
        question = question.strip()
        if not question:
            raise error(422, "the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise error(422, f"the question is longer than {MAX_QUESTION_CHARS} characters")
        if not (1 <= original_width <= MAX_ORIGINAL_SIDE and 1 <= original_height <= MAX_ORIGINAL_SIDE):
            raise error(422, f"original_width and original_height must be in 1..{MAX_ORIGINAL_SIDE}")
        if threshold is not None and not (-1e6 < threshold < 1e6):  # NaN fails both comparisons
            raise error(422, "threshold must be a finite number")
        info = await self._deadline(self.info())
        data = await self._read_image(image, tuple(info["encoder_size"]))
        spec = PolicySpec.from_gate(self.config.gate, name=policy, threshold=threshold)
        key = question_id or digest(data + question.encode())

        features = self.encoder.encode.remote(data)  # stays a DeploymentResponse: chained, not fetched
        first = await self._deadline(self.first_pass.run.remote(features, question, spec.__dict__, key))
        timings = dict(first["timings_ms"])
        m = metrics.gateway()
        m.uplink_bytes.inc(len(data), tags={"stage": "global"})
        if spec.name == "entropy":
            m.threshold.set(spec.threshold, tags={"policy": spec.name})
        if not first["refine"]:
            timings["total"] = (time.perf_counter() - started) * 1000
            m.requests.inc(tags={"endpoint": "query", "policy": spec.name, "outcome": "answered"})
            metrics.stage_latency().observe(timings["total"], tags={"stage": "query_total"})
            return Answered(answer=first["answer"], stage=1, score=first["uncertainty"], scores=first["uncertainties"],
                            policy=spec.name, first_answer=first["answer"], bytes_received=len(data), timings_ms=timings)

        roi = await self._deadline(self.roi_search.locate.remote(first["attention"], (original_width, original_height), tuple(info["encoder_size"])))
        timings.update(roi["timings_ms"])
        meta = {"question": question, "box": roi["box"], "client_id": client_id, "policy": spec.name,
                "first_answer": first["answer"], "score": first["uncertainty"], "original_size": [original_width, original_height]}
        session = await self._deadline(self.sessions.create.remote(features, meta))
        timings["total"] = (time.perf_counter() - started) * 1000
        m.requests.inc(tags={"endpoint": "query", "policy": spec.name, "outcome": "need_roi"})
        metrics.stage_latency().observe(timings["total"], tags={"stage": "query_total"})
        return NeedRoI(session_id=session["session_id"], box=roi["box"], local_size=list(info["encoder_size"]),
                       expires_in=session["expires_in"], first_answer=first["answer"], score=first["uncertainty"],
                       scores=first["uncertainties"], policy=spec.name, bytes_received=len(data), timings_ms=timings)

    @app.post("/v1/refine", response_model=Answered)
    async def refine(
        self,
        request: Request,
        session_id: str = Form(..., max_length=64),
        image: UploadFile = File(..., description="the local image: the crop of the ORIGINAL at the box, resized to local_size"),
        client_id: str | None = Form(None, max_length=200),
    ):
        started = time.perf_counter()
        await self._no_extra_fields(request, REFINE_FIELDS)
        info = await self._deadline(self.info())
        data = await self._read_image(image, tuple(info["encoder_size"]))
        image_digest = digest(data)
        opened = await self._deadline(self.sessions.open.remote(session_id, client_id, image_digest))
        status = opened["status"]
        if status == "unknown":
            raise error(404, "unknown session id")
        if status in ("expired", "evicted"):
            raise error(410, f"the session has {status}: keep the first-pass answer")
        if status == "forbidden":
            raise error(403, "this session belongs to another client")
        if status == "conflict":
            raise error(409, "this session was already refined with a different image")
        if status == "replay":
            return Answered(**{**opened["result"], "replayed": True})
        meta = opened["meta"]
        local = self.encoder.encode.remote(data)
        global_features = self.sessions.features.remote(session_id)
        try:
            refined = await self._deadline(self.refined.run.remote(global_features, local, meta["question"]))
        except KeyError:  # features gone: expired, or a concurrent attempt of this refine completed it
            again = await self._deadline(self.sessions.open.remote(session_id, client_id, image_digest))
            if again["status"] == "replay":
                return Answered(**{**again["result"], "replayed": True})
            raise error(410, "the session expired during the refine: keep the first-pass answer") from None
        timings = dict(refined["timings_ms"])
        timings["total"] = (time.perf_counter() - started) * 1000
        reply = Answered(answer=refined["answer"], stage=2, score=meta["score"], policy=meta["policy"],
                         first_answer=meta["first_answer"], bytes_received=len(data), timings_ms=timings)
        await self._deadline(self.sessions.complete.remote(session_id, image_digest, reply.model_dump()))
        m = metrics.gateway()
        m.uplink_bytes.inc(len(data), tags={"stage": "local"})
        m.requests.inc(tags={"endpoint": "refine", "policy": meta["policy"], "outcome": "refined"})
        metrics.stage_latency().observe(timings["total"], tags={"stage": "refine_total"})
        return reply
