"""Request limits and the auth token of this gateway process.

A module of its own on purpose: `serve.ingress` copies the FastAPI app and Ray pickles the
Gateway class with the globals it uses, so state written on "the app" in `__init__` is not the
state the serving app reads. Modules are pickled by reference: the replica's `Gateway.__init__`
and the middleware both see this one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    token: str | None
    max_body_bytes: int


CURRENT: Limits | None = None


def configure(token: str | None, max_body_bytes: int) -> None:
    global CURRENT
    CURRENT = Limits(token or None, max_body_bytes)


class InFlight:
    """Start times of the API requests this gateway process is serving. The age of the oldest is
    the load signal that does not lag: a completion's latency is seen only once the queue it
    waited in has let it through."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._next = 0

    def begin(self, now: float) -> int:
        self._next += 1
        self._started[self._next] = now
        return self._next

    def end(self, token: int) -> None:
        self._started.pop(token, None)

    def oldest_age_s(self, now: float) -> float:
        return max((now - t for t in self._started.values()), default=0.0)

    def __len__(self) -> int:
        return len(self._started)


IN_FLIGHT = InFlight()
