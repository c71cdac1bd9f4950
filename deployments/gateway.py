"""Gateway: the HTTP API (FastAPI ingress) that composes the stages into the two-stage protocol.

Visual features never pass through here: the encoder's response is handed to the first-pass
decoder and to the session store as a chained DeploymentResponse, and the refined decoder gets
the global features from the session store the same way.

(No `from __future__ import annotations` here: FastAPI must see the real parameter types.)
"""

import asyncio
import hmac
import logging
import math
import os
import time
from dataclasses import replace
from typing import Literal

import anyio
from fastapi import File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from collab.adaptive import AdaptiveGate, EdgeBudget, RecentTimes
from collab.backends.base import UNICODE_WHITESPACE, BackendInfo, InvalidQuestion
from collab.config import PolicyName
from collab.imaging import (
    InvalidUpload,
    describe_global_image,
    encode_image,
    inspect_upload,
    server_global,
    upload_cap,
)
from collab.policies import POLICIES, PolicySpec
from deployments import limits, metrics
from deployments.args import AppArgs
from deployments.common import load_collab_config
from deployments.forms import undecodable_text_field
from deployments.sessions import SessionTooLarge, digest

# 1.1: /v1/models says how to size the global image (global_image, local_size); policy `adaptive`
# with the edge's budget (max_extra_bytes, deadline_ms, uplink_kbps) and the reply's `gate`
API_VERSION = "1.1"
MAX_QUESTION_CHARS = 1000
MAX_ORIGINAL_SIDE = 65_535
ENDPOINTS = {"/v1/query": "query", "/v1/refine": "refine", "/v1/models": "models"}
QUERY_FIELDS = {
    "question",
    "image",
    "original_width",
    "original_height",
    "policy",
    "threshold",
    "client_id",
    "question_id",
    "max_extra_bytes",
    "deadline_ms",
    "uplink_kbps",
}
REFINE_FIELDS = {"session_id", "image", "client_id"}
UPLOAD_STATUS = {"empty": 400, "too_large": 413, "not_image": 415, "animated": 422, "corrupt": 422, "size": 422}
# A stage that is down or restarting: the edge should retry (its retries are idempotent).
UNAVAILABLE = (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError, BackPressureError)
log = logging.getLogger("ray.serve")

app = FastAPIOffline(  # /docs and /redoc with their assets served by the app: they work with no internet
    title="collab-vlm",
    version=API_VERSION,
    description="Collaborative edge-server VLM inference: the edge sends a low-resolution global image; "
    "when the server is unsure it asks for a crop of the original (`need_roi`), sent to `/v1/refine`.",
)


def done(endpoint: str, policy: str, outcome: str, started: float, timings: dict) -> None:
    """A request answered: its total latency (timings['total'], collab_stage_latency_ms{ENDPOINT_total})
    and its count by outcome."""
    metrics.record(f"{endpoint}_total", started, timings, "total")
    metrics.gateway().requests.inc(tags={"endpoint": endpoint, "policy": policy, "outcome": outcome})


def finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity (the encoder would fail the reply): a non-finite score is null."""
    return value if value is not None and math.isfinite(value) else None


def finite_scores(scores: dict | None) -> dict | None:
    return None if scores is None else {k: finite(v) for k, v in scores.items()}


GATE_DESCRIPTION = (
    'entropy and adaptive policies: {"threshold": the threshold used (null: no crop will be asked for), "reason": '
    '"static" (entropy), "calibrated" (adaptive at the static threshold), "load" (raised to hold the latency SLO), '
    '"backlog" (the wait ahead leaves no time for a refine), "edge_bytes" or "edge_deadline" (the crop would not '
    "fit the edge's budget)}"
)


class Answered(BaseModel):
    status: Literal["answered"] = "answered"
    answer: str
    stage: int = Field(description="1: answered from the global image; 2: refined with the local image")
    score: float | None = Field(
        None, description="first-pass uncertainty of the gate's score kind (null if not finite)"
    )
    scores: dict[str, float | None] | None = None
    policy: str
    first_answer: str | None = None
    bytes_received: int
    timings_ms: dict[str, float]
    replayed: bool = False
    global_made_by: Literal["edge", "server"] | None = Field(
        None, description="who made the global image: the edge, or the server from an uploaded original (queries only)"
    )
    gate: dict | None = Field(None, description=GATE_DESCRIPTION)


class NeedRoI(BaseModel):
    status: Literal["need_roi"] = "need_roi"
    session_id: str
    box: list[int] = Field(description="[x0, y0, x1, y1] in ORIGINAL image pixels")
    local_size: list[int] = Field(description="[width, height] to resize the crop to")
    expires_in: float
    first_answer: str
    score: float | None
    scores: dict[str, float | None]
    policy: str
    bytes_received: int
    timings_ms: dict[str, float]
    global_made_by: Literal["edge", "server"] = "edge"
    gate: dict | None = Field(None, description=GATE_DESCRIPTION)


class ModelInfo(BaseModel):
    model: str
    api_version: str = API_VERSION
    encoder_size: list[int] = Field(description="[width, height] of the local image (and of a fixed-size global one)")
    global_image: dict = Field(
        description='how the edge sizes the global image: {"mode": "fixed", "size": [w, h]}, or {"mode": "budget", '
        '"unit", "max_tokens", "min_tokens"}: the original\'s aspect ratio kept, both sides multiples of unit, '
        "round(side / unit) tokens along each, scaled down to max_tokens (up to min_tokens) as Qwen-VL's smart_resize "
        "does (collab.imaging.budget_size)"
    )
    local_size: list[int] = Field(description="[width, height] of the local image (need_roi replies repeat it)")
    grid: list[int] = Field(description="[rows, cols] of the local image's visual tokens")
    tokens_per_image: int
    device: str
    dtype: str
    policies: list[str]
    defaults: dict


class ErrorReply(BaseModel):
    """Every error, whatever its status."""

    error: str
    status: int


ERROR_MEANINGS = {
    400: "the image file is empty",
    401: "missing or wrong bearer token (when the gateway has one)",
    403: "the session belongs to another client_id",
    404: "unknown session id",
    409: "the session was (or is being) refined with a different image",
    410: "the session expired or was evicted: keep the first-pass answer",
    411: "a POST without Content-Length",
    413: "body or image too large (bytes or pixels)",
    415: "the image is not a JPEG or PNG",
    422: "a field is missing, malformed or out of range, the question cannot be used, or the image is corrupt, "
    "animated or of the wrong size",
    503: "a stage is overloaded or restarting: retry after Retry-After seconds",
}


def error_responses(*codes: int) -> dict:
    return {code: {"model": ErrorReply, "description": ERROR_MEANINGS[code]} for code in codes}


def remote_message(exc: BaseException) -> str:
    """The message of an exception raised in a replica: Ray's wrapper's str() is the remote
    traceback (pid, address, source paths), which a client must not see."""
    cause = getattr(exc, "cause", None)
    return str(cause if isinstance(cause, BaseException) else exc)


def error(status: int, message: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=message, headers=headers)


@app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and Starlette's own 404/405
async def _json_errors(request, exc: HTTPException):
    """Every error is JSON: {"error": message, "status": code} (registered before serve.ingress wraps the app)."""
    return JSONResponse(
        {"error": exc.detail, "status": exc.status_code}, status_code=exc.status_code, headers=exc.headers
    )


@app.exception_handler(RequestValidationError)
async def _validation_errors(request, exc: RequestValidationError):
    """FastAPI's field validation, in our error format (no input echoed back: it may be bytes)."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": problems or "invalid request", "status": 422}, status_code=422)


def _openapi() -> dict:
    """FastAPI's document, plus what it cannot infer: the upload forms take no other fields
    (`_no_extra_fields` refuses them: additionalProperties false), and a query gives the original's
    width and height together or not at all (dependentRequired)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            servers=app.servers or None,
        )
        for name, body in schema.get("components", {}).get("schemas", {}).items():
            if name.startswith("Body_"):
                body["additionalProperties"] = False
            if name.startswith("Body_query"):  # the original's size: both fields or neither
                body["dependentRequired"] = {
                    "original_width": ["original_height"],
                    "original_height": ["original_width"],
                }
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


def _reject(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


@app.middleware("http")
async def _guard(request: Request, call_next):
    """Bearer-token auth (when configured), the body-size limit, error counting for /v1/*, and a
    JSON 500 (logged by type only, no request data) for anything that escapes a handler."""
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):  # an app under a route prefix: /prefix/v1/query -> /v1/query
        path = path[len(root) :]
    response = _check_limits(request) if path.startswith("/v1/") else None
    if response is None and path.startswith("/v1/") and request.method == "POST":
        response = await _check_text_fields(request)
    if response is None:
        flight = limits.IN_FLIGHT.begin() if path in ("/v1/query", "/v1/refine") else None
        try:
            response = await call_next(request)
        except Exception as exc:
            log.error("internal error on %s: %s", ENDPOINTS.get(path, "other"), type(exc).__name__)
            response = _reject(500, "internal server error")
        finally:
            if flight is not None:
                limits.IN_FLIGHT.end(flight)
    if response.status_code >= 400 and path.startswith("/v1/"):
        endpoint = ENDPOINTS.get(path, "other")  # a fixed label set: no series per random path
        metrics.gateway().requests.inc(
            tags={"endpoint": endpoint, "policy": "-", "outcome": f"error_{response.status_code // 100}xx"}
        )
    return response


async def _check_text_fields(request: Request) -> JSONResponse | None:
    """Text fields must be UTF-8 (Starlette would decode them as latin-1). The body is already
    bounded by max_body_bytes; the handler reads it again from Starlette's cache."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/"):
        return None
    name = undecodable_text_field(await request.body(), content_type)
    if name is not None:
        return _reject(422, f"the field {name!r} is not valid UTF-8 text")
    return None


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


@serve.deployment  # options: serve_config.yaml `deployments:`
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
        try:  # each replica runs its own controller on what it observes
            self.adaptive = AdaptiveGate.from_config(self.config.gate, self.config.model.path)
            self.adaptive_error = None
        except ValueError as exc:  # no curve: every other policy still works
            self.adaptive, self.adaptive_error = None, str(exc)
        self.server_ms = {"query": RecentTimes(), "refine": RecentTimes()}  # p90 of the last 50
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
            self._observe_failure()
            raise error(503, "the server is overloaded: a stage did not answer in time", {"Retry-After": "1"}) from None
        except UNAVAILABLE as exc:
            log.warning("a stage is unavailable: %s", type(exc).__name__)
            self._observe_failure()
            raise error(503, "a server stage is restarting or unavailable; retry", {"Retry-After": "1"}) from None

    async def _read_image(self, image: UploadFile, expected_size: tuple[int, int] | None, max_bytes: int):
        """The upload's bytes and decoded image, after checking them (caps before decoding,
        JPEG/PNG, size when one is required)."""
        data = await image.read(max_bytes + 1)
        try:
            decoded = await asyncio.to_thread(
                inspect_upload,
                data,
                max_bytes=max_bytes,
                max_pixels=self.args.max_image_pixels,
                expected_size=expected_size,
            )
        except InvalidUpload as exc:
            raise error(UPLOAD_STATUS[exc.reason], str(exc)) from None
        return data, decoded

    async def _global_image(
        self, data: bytes, decoded, backend: BackendInfo, original
    ) -> tuple[bytes, tuple[int, int], str]:
        """The global image's bytes, the original's size, and who made the global image."""
        imaging = self.config.imaging
        try:
            made, original_size = server_global(
                decoded, backend.encoder_size, original, imaging.global_mode, backend.global_budget
            )
        except InvalidUpload as exc:
            raise error(UPLOAD_STATUS[exc.reason], str(exc)) from None
        if made is None:
            return data, original_size, "edge"
        payload = await asyncio.to_thread(encode_image, made, imaging.format, imaging.jpeg_quality)
        return payload.data, original_size, "server"

    @staticmethod
    async def _no_extra_fields(request: Request, allowed: set[str]) -> None:
        extra = sorted(set((await request.form()).keys()) - allowed)
        if extra:
            raise error(422, f"unknown fields: {', '.join(extra)}; expected {', '.join(sorted(allowed))}")

    def _gate(
        self, spec: PolicySpec, budget: EdgeBudget, started: float, upload_bytes: int
    ) -> tuple[PolicySpec, dict | None]:
        """The threshold this request is gated at, and the reply's `gate`."""
        if spec.name == "entropy":
            return spec, {"threshold": spec.threshold, "reason": "static"}
        if spec.name != "adaptive":
            return spec, None
        if self.adaptive is None:
            raise error(422, f"the adaptive policy is not available on this server: {self.adaptive_error}")
        oldest_ms = limits.IN_FLIGHT.oldest_age_ms()
        elapsed_ms = self._edge_elapsed_ms(budget, started, upload_bytes)
        query_ms, refine_ms = self._stage_plan_ms()
        decision = self.adaptive.decide(
            oldest_ms,
            spec.threshold,
            budget,
            elapsed_ms + query_ms,
            refine_ms,
            # the requests ahead of this one (it is in flight too)
            wait_ms=limits.IN_FLIGHT.wait_ms(len(limits.IN_FLIGHT) - 1, query_ms),
            query_ms=query_ms,
        )
        m = metrics.gateway()
        m.adaptive_cap.set(self.adaptive.controller.cap)
        m.adaptive_backlog.set(self.adaptive.last_wait_ms)
        if self.adaptive.controller.last_p95 is not None:
            m.adaptive_p95.set(self.adaptive.controller.last_p95)
        return replace(spec, threshold=decision.threshold), decision.as_dict()

    @staticmethod
    def _edge_elapsed_ms(budget: EdgeBudget, started: float, upload_bytes: int) -> float:
        """The query's time so far as the edge counts it: the server's, and the global image's
        upload at the declared rate (before this request reached the server)."""
        elapsed_ms = (time.perf_counter() - started) * 1000
        if budget.uplink_kbps:
            elapsed_ms += upload_bytes * 8 / budget.uplink_kbps
        return elapsed_ms

    def _stage_plan_ms(self) -> tuple[float, float]:
        """Recent first-pass and refine server times, read once a decision. Before any refine has
        been seen, a refine is planned at the first pass's time: it decodes the same prompt with the
        local image's tokens added, so it costs at least that (planning it at 0 let a cold server's
        first crop miss the edge's deadline)."""
        query_ms = self.server_ms["query"].value
        return query_ms, self.server_ms["refine"].value or query_ms

    def _crop_too_late(self, spec: PolicySpec, budget: EdgeBudget, started: float, upload_bytes: int) -> bool:
        """Adaptive, after the first pass: the crop no longer fits the edge's deadline on the time the
        first pass really took (its plan used the recent p90)."""
        if spec.name != "adaptive" or self.adaptive is None or budget.deadline_ms is None:
            return False
        _, refine_ms = self._stage_plan_ms()
        wait_ms = limits.IN_FLIGHT.wait_ms(len(limits.IN_FLIGHT) - 1, refine_ms)
        elapsed_ms = self._edge_elapsed_ms(budget, started, upload_bytes)
        return not self.adaptive.crop_still_fits(budget, elapsed_ms, refine_ms, wait_ms)

    def _observe(self, endpoint: str, query_ms: float, stage_ms: float | None = None) -> None:
        """A completed query's server time (first pass, or first pass + refine) for the controller,
        and the recent time of the endpoint's own stage for the edge-deadline check."""
        self.server_ms[endpoint].add(query_ms if stage_ms is None else stage_ms)
        if self.adaptive is not None:
            self.adaptive.controller.observe(query_ms)

    def _observe_failure(self) -> None:
        """A query that got no answer in time is the slowest kind: the controller must see it (as
        the time it was given), or its p95 would read low exactly when the server is overloaded."""
        if self.adaptive is not None:
            self.adaptive.controller.observe(self.args.request_timeout_s * 1000)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelInfo, responses=error_responses(401, 503))
    async def models(self) -> ModelInfo:
        info = await self._deadline(self.info())
        gate = self.config.gate
        backend = BackendInfo.from_dict(info)
        return ModelInfo(
            model=info["model_name"],
            encoder_size=list(info["encoder_size"]),
            global_image=describe_global_image(backend.encoder_size, backend.global_budget),
            local_size=list(info["encoder_size"]),
            grid=list(info["grid"]),
            tokens_per_image=info["tokens_per_image"],
            device=info["device"],
            dtype=info["dtype"],
            policies=list(POLICIES),
            defaults={
                "policy": gate.policy,
                "score": gate.score,
                "threshold": gate.threshold,
                "aggregation_length": gate.aggregation_length,
                "random_rate": gate.random_rate,
                "global_mode": self.config.imaging.global_mode,
            },
        )

    # Optional form fields are typed without `| None` (default None): multipart has no null, and the
    # OpenAPI document then says "optional integer", not "integer or null" (which a client would send as "null").
    @app.post(
        "/v1/query", response_model=Answered | NeedRoI, responses=error_responses(400, 401, 411, 413, 415, 422, 503)
    )
    async def query(
        self,
        request: Request,
        question: str = Form(
            ...,
            min_length=1,
            max_length=MAX_QUESTION_CHARS,
            pattern=r"\S",
            description=f"the question about the image (UTF-8, at most {MAX_QUESTION_CHARS} characters and "
            "the model's max_question_tokens tokens; no image or control tokens such as <image>, </s>)",
        ),
        image: UploadFile = File(
            ...,
            description="the global image (JPEG or PNG) at the size GET /v1/models gives for the original "
            "(global_image), "
            "or the original photo, which the server then makes into the global image",
        ),
        original_width: int = Form(
            None, ge=1, le=MAX_ORIGINAL_SIDE, description="width of the ORIGINAL image (default: the uploaded image's)"
        ),
        original_height: int = Form(
            None, ge=1, le=MAX_ORIGINAL_SIDE, description="height of the ORIGINAL image (default: the uploaded image's)"
        ),
        policy: PolicyName = Form(None, description="default: the server's (GET /v1/models)"),
        threshold: float = Form(
            None, gt=-1e6, lt=1e6, description="gate threshold (a finite number; default: the server's)"
        ),
        client_id: str = Form(None, max_length=200, description="owner of the refine session, if given"),
        question_id: str = Form(None, max_length=200, description="stable id; keys the random policy"),
        max_extra_bytes: int = Form(
            None, ge=0, le=10**9, description="adaptive: the most crop bytes this edge will send for this query"
        ),
        deadline_ms: float = Form(
            None,
            gt=0,
            lt=1e7,
            description="adaptive: the time this edge can wait for the answer; with uplink_kbps the uploads count too",
        ),
        uplink_kbps: float = Form(None, gt=0, lt=1e7, description="adaptive: this edge's uplink rate (kbit/s)"),
    ):
        started = time.perf_counter()
        await self._no_extra_fields(request, QUERY_FIELDS)
        # Length, non-blank (pattern \S: Unicode White_Space, what the strip removes) and a finite
        # threshold are checked by the Form constraints above, which the OpenAPI document states.
        question = question.strip(UNICODE_WHITESPACE)
        if (original_width is None) != (original_height is None):
            raise error(
                422, "give both original_width and original_height, or neither (then the upload's size is used)"
            )
        info = await self._deadline(self.info())
        backend = BackendInfo.from_dict(info)
        upload, decoded = await self._read_image(image, None, self.args.max_image_bytes)
        data, (original_width, original_height), made_by = await self._global_image(
            upload, decoded, backend, (original_width, original_height)
        )
        spec = PolicySpec.from_gate(self.config.gate, name=policy, threshold=threshold)
        budget = EdgeBudget(max_extra_bytes, deadline_ms, uplink_kbps)
        spec, gate_used = self._gate(spec, budget, started, len(upload))
        key = question_id or digest(data + question.encode())

        features = self.encoder.encode.remote(data)  # stays a DeploymentResponse: chained, not fetched
        try:
            first = await self._deadline(self.first_pass.run.remote(features, question, spec, key))
        except InvalidQuestion as exc:  # checked with the model's own tokenizer, in the decoder
            raise error(422, remote_message(exc)) from None
        timings = dict(first.timings_ms)
        m = metrics.gateway()
        m.uplink_bytes.inc(len(upload), tags={"stage": "global"})
        if spec.name in ("entropy", "adaptive") and math.isfinite(spec.threshold):
            m.threshold.set(spec.threshold, tags={"policy": spec.name})
        if first.refine and self._crop_too_late(spec, budget, started, len(upload)):
            first = replace(first, refine=False)
            gate_used = {"threshold": None, "reason": "edge_deadline"}
        if not first.refine:
            done("query", spec.name, "answered", started, timings)
            self._observe("query", timings["total"])
            return Answered(
                answer=first.answer,
                stage=1,
                score=finite(first.uncertainty),
                scores=finite_scores(first.uncertainties),
                policy=spec.name,
                first_answer=first.answer,
                bytes_received=len(upload),
                timings_ms=timings,
                global_made_by=made_by,
                gate=gate_used,
            )

        located = await self._deadline(
            self.roi_search.locate.remote(
                first.attention,
                (original_width, original_height),
                backend.global_size((original_width, original_height)),
                backend.encoder_size,
            )
        )
        timings.update(located.timings_ms)
        box = located.roi.box.as_list()
        meta = {
            "question": question,
            "box": box,
            "client_id": client_id,
            "policy": spec.name,
            "first_answer": first.answer,
            "score": first.uncertainty,
            "original_size": [original_width, original_height],
            "gate": gate_used,
            "query_ms": (time.perf_counter() - started) * 1000,  # the query's server time, for the controller
        }
        try:
            session = await self._deadline(self.sessions.create.remote(features, meta))
        except SessionTooLarge as exc:
            log.error("session store too small: %s", remote_message(exc))
            raise error(
                503,
                f"the server cannot hold a refine session for this request: {remote_message(exc)}; "
                "raise sessions.max_bytes in the app args",
            ) from None
        done("query", spec.name, "need_roi", started, timings)
        self.server_ms["query"].add(timings["total"])  # the first pass's time, for the plans (not the controller)
        return NeedRoI(
            session_id=session["session_id"],
            box=box,
            local_size=list(info["encoder_size"]),
            expires_in=session["expires_in"],
            first_answer=first.answer,
            score=finite(first.uncertainty),
            scores=finite_scores(first.uncertainties),
            policy=spec.name,
            bytes_received=len(upload),
            timings_ms=timings,
            global_made_by=made_by,
            gate=gate_used,
        )

    @app.post(
        "/v1/refine",
        response_model=Answered,
        responses=error_responses(400, 401, 403, 404, 409, 410, 411, 413, 415, 422, 503),
    )
    async def refine(
        self,
        request: Request,
        session_id: str = Form(..., min_length=1, max_length=64, description="the session_id of the need_roi reply"),
        image: UploadFile = File(
            ..., description="the local image: the crop of the ORIGINAL at the box, resized to local_size"
        ),
        client_id: str = Form(None, max_length=200, description="the client_id the query gave, if any"),
    ):
        started = time.perf_counter()
        await self._no_extra_fields(request, REFINE_FIELDS)
        info = await self._deadline(self.info())
        local_size = tuple(info["encoder_size"])
        data, _ = await self._read_image(image, local_size, upload_cap(local_size, self.args.max_image_bytes))
        image_digest = digest(data)
        opened = await self._open_session(session_id, client_id, image_digest)
        status = opened["status"]
        if status == "unknown":
            raise error(404, "unknown session id")
        if status in ("expired", "evicted"):
            raise error(410, f"the session has {status}: keep the first-pass answer")
        if status == "forbidden":
            raise error(403, "this session belongs to another client")
        if status == "conflict":
            raise error(409, "this session was already refined, or is being refined, with a different image")
        if status == "replay":
            return Answered(**{**opened["result"], "replayed": True})
        try:  # this request holds the session's claim until it completes it or gives it back
            return await self._refine(
                session_id, opened["claim"], opened["meta"], data, started, client_id, image_digest
            )
        except BaseException:
            with anyio.CancelScope(shield=True):  # a cancelled request (client gone) still gives the claim back
                await self._release(session_id, opened["claim"])
            raise

    async def _open_session(self, session_id: str, client_id: str | None, image_digest: str) -> dict:
        """Open (and claim) the session; while another request with the same bytes holds it, wait
        for it to finish (then replay its reply) rather than refining twice. A claimant's lease is
        2 x request_timeout_s + 5 s: waiting longer than that means it died."""
        give_up = time.monotonic() + 2 * self.args.request_timeout_s + 5
        while True:
            opened = await self._deadline(self.sessions.open.remote(session_id, client_id, image_digest))
            left = give_up - time.monotonic()
            if opened["status"] != "pending":
                return opened
            if left <= 0:
                raise error(
                    503, "the same refine is still being answered by another request; retry", {"Retry-After": "1"}
                )
            await self._deadline(self.sessions.wait.remote(session_id, min(left, self.args.request_timeout_s / 2)))

    async def _release(self, session_id: str, claim: str) -> None:
        try:
            await asyncio.wait_for(self.sessions.release.remote(session_id, claim), timeout=5)
        except Exception as exc:  # noqa: BLE001 - the claim's lease ends it anyway
            log.warning("could not release a refine claim: %s", type(exc).__name__)

    async def _refine(
        self,
        session_id: str,
        claim: str,
        meta: dict,
        data: bytes,
        started: float,
        client_id: str | None,
        image_digest: str,
    ) -> Answered:
        local = self.encoder.encode.remote(data)
        global_features = self.sessions.features.remote(session_id)
        try:
            refined = await self._deadline(self.refined.run.remote(global_features, local, meta["question"]))
        except KeyError:  # features gone: the session expired or was evicted meanwhile
            raise error(410, "the session expired during the refine: keep the first-pass answer") from None
        timings = dict(refined.timings_ms)
        timings["total"] = (time.perf_counter() - started) * 1000  # observed once the session holds the reply
        reply = Answered(
            answer=refined.answer,
            stage=2,
            score=finite(meta["score"]),
            policy=meta["policy"],
            first_answer=meta["first_answer"],
            bytes_received=len(data),
            timings_ms=timings,
            gate=meta.get("gate"),
        )
        stored = await self._deadline(self.sessions.complete.remote(session_id, claim, reply.model_dump()))
        if not stored:  # this claim's lease ran out and another refine completed the session: its reply stands
            again = await self._deadline(self.sessions.open.remote(session_id, client_id, image_digest))
            if again["status"] == "replay":
                return Answered(**{**again["result"], "replayed": True})
            raise error(
                409 if again["status"] == "conflict" else 410,
                "this session was refined meanwhile by another request"
                if again["status"] == "conflict"
                else "the session expired during the refine: keep the first-pass answer",
            )
        m = metrics.gateway()
        m.uplink_bytes.inc(len(data), tags={"stage": "local"})
        m.requests.inc(tags={"endpoint": "refine", "policy": meta["policy"], "outcome": "refined"})
        metrics.stage_latency().observe(timings["total"], tags={"stage": "refine_total"})
        self._observe("refine", meta.get("query_ms", 0.0) + timings["total"], timings["total"])
        return reply
