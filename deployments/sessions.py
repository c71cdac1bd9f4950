"""SessionStore: what a refine request needs, reachable from every gateway replica, bounded.

A session holds the global visual tokens (so the refined pass does not re-encode), the question,
the box the edge was asked for, the owner and the policy. Bounds: a TTL, a maximum count and a
maximum feature memory; the oldest sessions go first. Expired and evicted ids are remembered (a
bounded list) so the edge gets 410 Gone rather than 404, and knows to keep its first answer.

A completed refine stores its reply: a retry of the same refine (same image bytes) gets the same
answer back, so an edge that lost the reply can retry without the query counting twice; a refine
with different bytes for a completed session is a conflict.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from ray import serve

from deployments.args import AppArgs


@dataclass
class Session:
    features: torch.Tensor
    meta: dict
    created: float
    expires: float
    nbytes: int
    result: dict | None = None
    image_digest: str | None = None
    events: list = field(default_factory=list)


class SessionTable:
    """The bounded table itself (plain Python, tested without Ray)."""

    def __init__(self, ttl_s: float, max_sessions: int, max_bytes: int, clock=time.monotonic):
        self.ttl_s, self.max_sessions, self.max_bytes, self.clock = ttl_s, max_sessions, max_bytes, clock
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.gone: OrderedDict[str, str] = OrderedDict()  # id -> "expired" | "evicted" | "completed"
        self.nbytes = 0
        self.counters = {"created": 0, "expired": 0, "evicted": 0, "completed": 0}

    def _forget(self, sid: str, why: str) -> None:
        session = self.sessions.pop(sid)
        self.nbytes -= session.nbytes
        self.gone[sid] = why
        while len(self.gone) > self.max_sessions:
            self.gone.popitem(last=False)

    def sweep(self) -> None:
        now = self.clock()
        for sid in [sid for sid, s in self.sessions.items() if s.expires <= now]:
            completed = self.sessions[sid].result is not None
            self._forget(sid, "expired")
            if not completed:  # a completed session ageing out is not an abandoned one
                self.counters["expired"] += 1

    @property
    def waiting(self) -> int:
        """Sessions still waiting for their refine (completed ones are kept only for replays)."""
        return sum(1 for s in self.sessions.values() if s.result is None)

    def create(self, features: torch.Tensor, meta: dict) -> dict:
        self.sweep()
        features = features.detach().cpu().contiguous()
        nbytes = features.element_size() * features.nelement()
        if nbytes > self.max_bytes:
            raise ValueError(f"session features ({nbytes} B) exceed the store's max_bytes ({self.max_bytes} B)")
        while self.sessions and (len(self.sessions) >= self.max_sessions or self.nbytes + nbytes > self.max_bytes):
            self._forget(next(iter(self.sessions)), "evicted")
            self.counters["evicted"] += 1
        sid = uuid.uuid4().hex
        now = self.clock()
        self.sessions[sid] = Session(features, dict(meta), now, now + self.ttl_s, nbytes)
        self.nbytes += nbytes
        self.counters["created"] += 1
        return {"session_id": sid, "expires_in": self.ttl_s}

    def lookup(self, sid: str) -> tuple[str, Session | None]:
        """('ok', session) | ('expired'|'evicted', None) | ('unknown', None)."""
        self.sweep()
        session = self.sessions.get(sid)
        if session is not None:
            return "ok", session
        return self.gone.get(sid, "unknown"), None

    def complete(self, sid: str, image_digest: str, result: dict) -> None:
        session = self.sessions.get(sid)
        if session is not None and session.result is None:
            session.result, session.image_digest = result, image_digest
            # The features are no longer needed: free them, keep the reply for idempotent retries.
            self.nbytes -= session.nbytes
            session.features, session.nbytes = torch.empty(0), 0
            self.counters["completed"] += 1

    def stats(self) -> dict:
        self.sweep()
        return {"sessions": len(self.sessions), "bytes": self.nbytes, **self.counters}


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@serve.deployment(ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=256, num_replicas=1)
class SessionStore:
    """One replica: the single source of truth for refine sessions.

    Every method is `async def` although none awaits: Serve runs sync methods in a thread pool,
    and the table is not thread-safe; on the event loop the calls run one at a time."""

    def __init__(self, args: AppArgs):
        s = args.sessions
        self.table = SessionTable(s.ttl_s, s.max_sessions, s.max_bytes)
        self._published = dict(self.table.counters)

    def _publish(self) -> None:
        """Gauges for size, counters for the events since the last call."""
        from deployments import metrics

        m = metrics.sessions()
        m.active.set(self.table.waiting)
        m.bytes.set(self.table.nbytes)
        for event, count in self.table.counters.items():
            if count > self._published[event]:
                m.events.inc(count - self._published[event], tags={"event": event})
        self._published = dict(self.table.counters)

    async def create(self, features: torch.Tensor, meta: dict) -> dict:
        try:
            return self.table.create(features, meta)
        finally:
            self._publish()

    async def open(self, sid: str, client_id: str | None, image_digest: str) -> dict:
        """Check a refine request against its session: status, meta, and a cached reply if any."""
        status, session = self.table.lookup(sid)
        self._publish()
        if session is None:
            return {"status": status}
        owner = session.meta.get("client_id")
        if owner is not None and client_id != owner:
            return {"status": "forbidden"}
        if session.result is not None:
            if session.image_digest == image_digest:
                return {"status": "replay", "result": session.result}
            return {"status": "conflict"}
        return {"status": "ok", "meta": session.meta}

    async def features(self, sid: str) -> torch.Tensor:
        status, session = self.table.lookup(sid)
        if session is None or session.result is not None:
            raise KeyError(f"session {sid} is {status if session is None else 'completed'}")
        return session.features

    async def complete(self, sid: str, image_digest: str, result: dict) -> None:
        self.table.complete(sid, image_digest, result)
        self._publish()

    async def stats(self) -> dict:
        stats = self.table.stats()
        self._publish()
        return stats
