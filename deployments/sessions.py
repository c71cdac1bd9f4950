"""SessionStore: what a refine request needs, reachable from every gateway replica, bounded.

A session holds the global visual tokens (so the refined pass does not re-encode), the question,
the box the edge was asked for, the owner and the policy. Bounds: a TTL, a maximum count and a
maximum feature memory; the oldest sessions go first. Expired and evicted ids are remembered (a
bounded list) so the edge gets 410 Gone rather than 404, and knows to keep its first answer.

A completed refine stores its reply: a retry of the same refine (same image bytes) gets the same
answer back, so an edge that lost the reply can retry without the query counting twice; a refine
with different bytes for a completed session is a conflict.

Concurrent refines of one session: the first to open it claims it for its image digest (a lease,
so a claimant that died does not hold it for ever). Others with the same bytes are told "pending"
and wait for the claimant's reply; others with different bytes get "conflict" at once. So
identical retries all get one answer, and of different images exactly one is refined.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from ray import serve

from deployments.args import AppArgs


class SessionTooLarge(ValueError):
    """One request's features exceed the whole store (a sizing error of the deployment, not of the
    request): the gateway answers 503 with this message instead of failing."""


@dataclass
class Session:
    features: torch.Tensor
    meta: dict
    created: float
    expires: float
    nbytes: int
    result: dict | None = None
    image_digest: str | None = None
    claim: str | None = None  # token of the refine in progress
    claim_digest: str | None = None  # and the image digest it refines with
    claim_expires: float = 0.0
    events: list = field(default_factory=list)


class SessionTable:
    """The bounded table itself (plain Python, tested without Ray)."""

    def __init__(self, ttl_s: float, max_sessions: int, max_bytes: int, clock=time.monotonic):
        self.ttl_s, self.max_sessions, self.max_bytes, self.clock = ttl_s, max_sessions, max_bytes, clock
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.gone: OrderedDict[str, str] = OrderedDict()  # id -> "expired" | "evicted" | "completed"
        self.nbytes = 0
        self.completed_held = 0  # completed sessions still held (for replays)
        self.counters = {"created": 0, "expired": 0, "evicted": 0, "completed": 0}

    def _forget(self, sid: str, why: str) -> None:
        session = self.sessions.pop(sid)
        self.nbytes -= session.nbytes
        self.completed_held -= session.result is not None
        self.gone[sid] = why
        while len(self.gone) > self.max_sessions:
            self.gone.popitem(last=False)

    def sweep(self) -> None:
        """Expire from the oldest: one TTL for all, so creation order is expiry order and the scan
        stops at the first live session (a refine's polls cost O(expired), not O(sessions))."""
        now = self.clock()
        while self.sessions:
            sid, oldest = next(iter(self.sessions.items()))
            if oldest.expires > now:
                break
            completed = oldest.result is not None
            self._forget(sid, "expired")
            if not completed:  # a completed session ageing out is not an abandoned one
                self.counters["expired"] += 1

    @property
    def waiting(self) -> int:
        """Sessions still waiting for their refine (completed ones are kept only for replays)."""
        return len(self.sessions) - self.completed_held

    def create(self, features: torch.Tensor, meta: dict) -> dict:
        self.sweep()
        features = features.detach().cpu().contiguous()
        nbytes = features.element_size() * features.nelement()
        if nbytes > self.max_bytes:
            raise SessionTooLarge(
                f"session features ({nbytes} B) exceed the session store's max_bytes ({self.max_bytes} B)"
            )
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

    def open(self, sid: str, client_id: str | None, image_digest: str, lease_s: float) -> dict:
        """Check a refine request against its session and claim it. Status: "ok" (with the meta and
        a claim token), "pending" (the same bytes are being refined: wait), "replay" (with the
        reply), "conflict", "forbidden", "unknown", "expired" or "evicted"."""
        status, session = self.lookup(sid)
        if session is None:
            return {"status": status}
        owner = session.meta.get("client_id")
        if owner is not None and client_id != owner:
            return {"status": "forbidden"}
        if session.result is not None:
            if session.image_digest == image_digest:
                return {"status": "replay", "result": session.result}
            return {"status": "conflict"}
        now = self.clock()
        if session.claim is not None and session.claim_expires > now:
            return {"status": "pending" if session.claim_digest == image_digest else "conflict"}
        session.claim, session.claim_digest, session.claim_expires = uuid.uuid4().hex, image_digest, now + lease_s
        return {"status": "ok", "meta": session.meta, "claim": session.claim}

    def release(self, sid: str, claim: str) -> None:
        """A claimant that failed gives the session back (its retry, or another image, may claim it)."""
        session = self.sessions.get(sid)
        if session is not None and session.result is None and session.claim == claim:
            session.claim = session.claim_digest = None

    def complete(self, sid: str, claim: str, result: dict) -> bool:
        """Store the claimant's reply; False if the claim is no longer its own (its lease ran out
        and another refine took the session) or the session is gone."""
        session = self.sessions.get(sid)
        if session is None or session.result is not None or session.claim != claim:
            return False
        session.result, session.image_digest = result, session.claim_digest
        # The features are no longer needed: free them, keep the reply for idempotent retries.
        self.nbytes -= session.nbytes
        session.features, session.nbytes = torch.empty(0), 0
        self.completed_held += 1
        self.counters["completed"] += 1
        return True

    def stats(self) -> dict:
        self.sweep()
        return {"sessions": len(self.sessions), "bytes": self.nbytes, **self.counters}


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@serve.deployment  # options: serve_config.yaml `deployments:`
class SessionStore:
    """One replica: the single source of truth for refine sessions.

    Every method is `async def` although none awaits: Serve runs sync methods in a thread pool,
    and the table is not thread-safe; on the event loop the calls run one at a time."""

    def __init__(self, args: AppArgs):
        s = args.sessions
        self.table = SessionTable(s.ttl_s, s.max_sessions, s.max_bytes)
        # A claimant makes two bounded calls (the refined pass, then complete): its lease covers both.
        self.lease_s = 2 * args.request_timeout_s + 5
        self._settled: dict[str, asyncio.Event] = {}  # sessions with waiters for a refine in progress
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
        """Check a refine request against its session and claim it (SessionTable.open)."""
        try:
            return self.table.open(sid, client_id, image_digest, self.lease_s)
        finally:
            self._publish()

    async def wait(self, sid: str, timeout_s: float) -> None:
        """Return when the refine in progress on `sid` completes or gives up, or after timeout_s
        (a waiter with the same bytes then opens the session again)."""
        event = self._settled.setdefault(sid, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            if self._settled.get(sid) is event:  # nobody settled it (a claimant that died): do not keep it
                del self._settled[sid]

    def _settle(self, sid: str) -> None:
        event = self._settled.pop(sid, None)
        if event is not None:
            event.set()

    async def release(self, sid: str, claim: str) -> None:
        self.table.release(sid, claim)
        self._settle(sid)

    async def features(self, sid: str) -> torch.Tensor:
        status, session = self.table.lookup(sid)
        if session is None or session.result is not None:
            raise KeyError(f"session {sid} is {status if session is None else 'completed'}")
        return session.features

    async def complete(self, sid: str, claim: str, result: dict) -> bool:
        try:
            return self.table.complete(sid, claim, result)
        finally:
            self._settle(sid)
            self._publish()

    async def stats(self) -> dict:
        stats = self.table.stats()
        self._publish()
        return stats
