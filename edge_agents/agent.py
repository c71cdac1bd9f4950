"""A simulated edge device: an asyncio loop that speaks the public HTTP protocol over a simulated link.

For each query the agent makes the global image from its ORIGINAL, sends it (`/v1/query`), and,
when the server answers `need_roi`, crops the original at the box it was given and sends the
local image (`/v1/refine`). Transient failures (connection errors, timeouts, 429 and 5xx) are
retried with exponential backoff and full jitter (honouring Retry-After); both calls are safe to
repeat (a repeated query opens a fresh session, a repeated refine is answered from the session's stored result), and a
query is recorded once, however many attempts it took. A refine whose session is gone (410, or 404
after a session-store restart) keeps the first-pass answer, marked `session_expired`.

`EdgeAgent` has no Ray import: the load test hosts agents inside Ray actors (`AgentHost`), tests
drive it with plain asyncio.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import asdict, dataclass

import httpx

from collab.data.vqa import vqa_accuracy
from collab.imaging import full_resolution_bytes
from edge_agents.client import MIME, EdgeImaging, global_upload, local_upload
from edge_agents.config import DeviceProfile, LoadTestConfig
from edge_agents.links import round_trip_s, transmission_s
from edge_agents.sources import EdgeItem, load_items

# Both calls are idempotent, so any server-side failure is worth another attempt.
RETRYABLE_STATUS = {429, 500, 502, 503, 504}


@dataclass
class QueryLog:
    """Everything measured about one query (one CSV row)."""

    agent: str
    seq: int
    question_id: str
    profile: str
    policy: str
    kind: str | None
    t_start: float  # seconds since the run started (arrival time for open loop)
    latency_ms: float = 0.0  # arrival -> final answer at the edge
    network_ms: float = 0.0  # simulated uplink transmission + RTT, all attempts
    server_ms: float = 0.0  # HTTP time of the calls (server processing and queueing), all attempts
    edge_ms: float = 0.0  # image work on the device (resize, crop, encode)
    backoff_ms: float = 0.0  # waiting between attempts
    queue_ms: float = 0.0  # open loop: waiting for a free slot on the device
    stage: int = 0
    answer: str | None = None
    first_answer: str | None = None
    score: float | None = None
    correct: float | None = None  # VQA accuracy when ground truth is known
    first_correct: float | None = None
    global_bytes: int = 0
    local_bytes: int = 0
    full_bytes: int = 0  # the original as a JPEG: what sending full resolution would cost
    box: str | None = None
    retries: int = 0
    session_expired: bool = False
    replayed: bool = False
    gate_threshold: float | None = None  # the threshold the server gated this query at (entropy, adaptive)
    gate_reason: str | None = None
    error: str | None = None

    def to_row(self) -> dict:
        return asdict(self)


class QueryFailed(RuntimeError):
    """A query that could not be completed after all attempts (or met a non-retryable error)."""


@dataclass
class _Attempts:
    retries: int = 0
    network_s: float = 0.0
    server_s: float = 0.0
    backoff_s: float = 0.0


class EdgeAgent:
    """One edge device. `run()` issues queries until the workload's duration is over."""

    def __init__(
        self,
        index: int,
        config: LoadTestConfig | dict,
        *,
        run_start: float | None = None,
        channel=None,
        items: list[EdgeItem] | None = None,
        policy: str | None = None,
        on_record=None,
    ):
        self.config = config if isinstance(config, LoadTestConfig) else LoadTestConfig.model_validate(config)
        self.index = index
        self.name = f"agent-{index:03d}"
        self.profile: DeviceProfile = self.config.profile_for(index)
        self.policy = policy or self.profile.policy or self.config.policy
        self.imaging = EdgeImaging("jpeg", self.profile.jpeg_quality)
        self.rng = random.Random(f"{self.config.seed}:{index}")
        self.run_start = run_start if run_start is not None else time.time()
        self.channel = channel  # SharedChannel, a Ray actor handle of one, or None (private link)
        self.items = items if items is not None else load_items(self.config.source, index, self.config.agents)
        self.on_record = on_record
        self.records: list[QueryLog] = []
        self._stopping = False
        self.in_flight = 0
        self._info: dict | None = None
        self._full_bytes: dict[str, int] = {}
        self.http: httpx.AsyncClient | None = None

    # ------------------------------------------------------------------ the loop
    async def run(self) -> list[QueryLog]:
        w = self.config.workload
        limits = httpx.Limits(max_connections=w.max_in_flight + 2, max_keepalive_connections=w.max_in_flight + 2)
        headers = {}
        token = os.environ.get(self.config.auth_token_env) if self.config.auth_token_env else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with httpx.AsyncClient(
            base_url=self.config.url, timeout=self.config.retry.request_timeout_s, limits=limits, headers=headers
        ) as http:
            self.http = http
            delay = w.ramp_up_s * self.index / max(1, self.config.agents)
            await self._sleep_until(self.run_start + delay)
            end = self.run_start + w.duration_s
            if w.mode == "closed":
                await self._closed_loop(end)
            else:
                await self._open_loop(end)
        return self.records

    def stop(self) -> None:
        """Start no new query (those in flight finish)."""
        self._stopping = True

    def _active(self, t: float) -> bool:
        """Whether this agent takes part at wall time t (workload.phases: a load step)."""
        w = self.config.workload
        return self.index < w.active_share(t - self.run_start) * self.config.agents - 1e-9

    async def _closed_loop(self, end: float) -> None:
        seq = 0
        while not self._stopping and time.time() < end:
            if not self._active(time.time()):
                await asyncio.sleep(min(0.5, max(0.0, end - time.time())))
                continue
            await self.query(self.items[seq % len(self.items)], seq, arrival=time.time())
            seq += 1
            think = self._think_time()
            if time.time() + think >= end:
                break
            await asyncio.sleep(think)

    def _think_time(self) -> float:
        w = self.config.workload
        if w.think_distribution == "fixed" or w.think_time_s == 0:
            return w.think_time_s
        return self.rng.expovariate(1 / w.think_time_s)

    async def _open_loop(self, end: float) -> None:
        """Poisson arrivals until `end`; arrivals queued behind a full device are still served
        (stop() does not drop them: they arrived before the end)."""
        w = self.config.workload
        slots = asyncio.Semaphore(w.max_in_flight)
        tasks: set[asyncio.Task] = set()
        arrival, seq = time.time(), 0
        while True:
            arrival += self.rng.expovariate(w.rate_qps)
            if arrival >= end:
                break
            if not self._active(arrival):  # outside this agent's phases: the arrival does not happen
                continue
            await self._sleep_until(arrival)
            await slots.acquire()  # a device has finite concurrency: arrivals beyond it queue here

            async def one(item=self.items[seq % len(self.items)], seq=seq, arrival=arrival):  # noqa: B008 - binds this arrival
                try:
                    await self.query(item, seq, arrival)
                finally:
                    slots.release()

            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            seq += 1
        if tasks:
            await asyncio.gather(*tasks)

    @staticmethod
    async def _sleep_until(t: float) -> None:
        delay = t - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ one query
    async def query(self, item: EdgeItem, seq: int, arrival: float) -> QueryLog:
        """Run one query to its end and record it exactly once (errors included)."""
        started = time.time()
        self.in_flight += 1
        log = QueryLog(
            self.name,
            seq,
            item.question_id,
            self.profile.name,
            self.policy,
            item.kind,
            t_start=arrival - self.run_start,
            queue_ms=(started - arrival) * 1000,
        )
        attempts = _Attempts()
        try:
            await self._query(item, log, attempts)
        except QueryFailed as exc:
            log.error = str(exc)[:300]
        except asyncio.CancelledError:
            log.error = "cancelled before an answer"
            raise
        except Exception as exc:  # a bug or an unexpected reply: record it, never lose the query
            log.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:  # recorded exactly once, whatever happened above
            log.retries = attempts.retries
            log.network_ms = attempts.network_s * 1000
            log.server_ms = attempts.server_s * 1000
            log.backoff_ms = attempts.backoff_s * 1000
            log.latency_ms = (time.time() - arrival) * 1000
            if item.answers and log.answer is not None and log.error is None:
                log.correct = vqa_accuracy(log.answer, item.answers)
                log.first_correct = vqa_accuracy(log.first_answer or log.answer, item.answers)
            self.in_flight -= 1
            self.records.append(log)
            if self.on_record is not None:
                self.on_record(log)
        return log

    async def _query(self, item: EdgeItem, log: QueryLog, attempts: _Attempts) -> None:
        info = await self.models(attempts)
        t = time.perf_counter()
        original = item.load()
        payload = global_upload(original, info, self.imaging)
        if item.question_id not in self._full_bytes:
            self._full_bytes[item.question_id] = full_resolution_bytes(original, "jpeg", self.imaging.jpeg_quality)
        log.full_bytes = self._full_bytes[item.question_id]
        log.edge_ms += (time.perf_counter() - t) * 1000
        log.global_bytes = payload.nbytes
        fields = {
            "question": item.question,
            "original_width": str(original.width),
            "original_height": str(original.height),
            "policy": self.policy,
            "client_id": self.name,
            "question_id": item.question_id,
        }
        if self.profile.threshold is not None:
            fields["threshold"] = str(self.profile.threshold)
        if self.profile.max_extra_bytes is not None:
            fields["max_extra_bytes"] = str(self.profile.max_extra_bytes)
        if self.profile.deadline_ms is not None:  # net of this device's two round trips (query, refine)
            rtts = 2 * (self.profile.rtt_ms + self.profile.jitter_ms)
            fields["deadline_ms"] = str(max(1.0, self.profile.deadline_ms - rtts))
            shared = self.config.channel.capacity_mbps  # on a shared channel: a fair share of it
            mbps = shared / self.config.agents if shared else self.profile.uplink_mbps
            fields["uplink_kbps"] = str(min(mbps * 1000, 9.9e6))
        files = {"image": ("global." + payload.format, payload.data, MIME[payload.format])}
        resp = await self._exchange("/v1/query", fields, files, payload.nbytes, attempts)
        first = _json_or_fail(resp, "/v1/query")
        log.score = first.get("score")
        gate = first.get("gate") or {}
        log.gate_threshold, log.gate_reason = gate.get("threshold"), gate.get("reason")
        if first["status"] == "answered":
            log.stage, log.answer, log.first_answer = 1, first["answer"], first.get("first_answer") or first["answer"]
            return
        log.first_answer, log.box = first["first_answer"], ",".join(map(str, first["box"]))
        t = time.perf_counter()
        local = local_upload(original, first["box"], first["local_size"], self.imaging)
        log.edge_ms += (time.perf_counter() - t) * 1000
        log.local_bytes = local.nbytes
        data = {"session_id": first["session_id"], "client_id": self.name}
        files = {"image": ("local." + local.format, local.data, MIME[local.format])}
        resp = await self._exchange("/v1/refine", data, files, local.nbytes, attempts)
        if resp.status_code in (404, 410):  # expired, evicted, or lost with a restarted session store:
            log.stage, log.answer, log.session_expired = 1, first["first_answer"], True  # the first answer stands
            return
        second = _json_or_fail(resp, "/v1/refine")
        log.stage, log.answer, log.replayed = 2, second["answer"], bool(second.get("replayed"))

    async def models(self, attempts: _Attempts | None = None) -> dict:
        """/v1/models, once per agent (retried like any call: the app may still be starting)."""
        if self._info is None:
            resp = await self._exchange("/v1/models", None, None, 0, attempts or _Attempts(), method="GET")
            self._info = _json_or_fail(resp, "/v1/models")
        return self._info

    async def _uplink(self, nbytes: int) -> float:
        """Simulated network time of one exchange: the upload (own link or shared channel) + RTT."""
        start = time.monotonic()
        if self.channel is None:
            await asyncio.sleep(transmission_s(nbytes, self.profile.uplink_mbps))
        else:
            transmit = self.channel.transmit
            await (transmit.remote(nbytes) if hasattr(transmit, "remote") else transmit(nbytes))
        await asyncio.sleep(round_trip_s(self.profile.rtt_ms, self.profile.jitter_ms, self.rng))
        return time.monotonic() - start

    async def _exchange(
        self, path: str, data, files, nbytes: int, attempts: _Attempts, method: str = "POST"
    ) -> httpx.Response:
        """One call with retries; returns the first non-retryable response."""
        retry = self.config.retry
        last = "no attempt made"
        for attempt in range(retry.max_attempts):
            if attempt:
                attempts.retries += 1
            attempts.network_s += await self._uplink(nbytes)
            t = time.monotonic()
            retry_after = 0.0
            try:
                if method == "GET":
                    resp = await self.http.get(path)
                else:
                    resp = await self.http.post(path, data=data, files=files)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                attempts.server_s += time.monotonic() - t
                last = f"{type(exc).__name__}: {exc}"
            else:
                attempts.server_s += time.monotonic() - t
                if resp.status_code not in RETRYABLE_STATUS:
                    return resp
                last = f"HTTP {resp.status_code} on {path}: {resp.text[:120]}"
                retry_after = _retry_after(resp)
            if attempt + 1 < retry.max_attempts:
                cap = min(retry.backoff_max_s, retry.backoff_s * 2**attempt)
                pause = max(retry_after, self.rng.uniform(0, cap))
                attempts.backoff_s += pause
                await asyncio.sleep(pause)
        raise QueryFailed(f"{path} failed after {retry.max_attempts} attempts; last: {last}")


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(30.0, max(0.0, float(resp.headers.get("retry-after", 0))))
    except ValueError:
        return 0.0


def _json_or_fail(resp: httpx.Response, path: str) -> dict:
    if resp.status_code >= 400:
        raise QueryFailed(f"HTTP {resp.status_code} on {path}: {resp.text[:200]}")
    return resp.json()
