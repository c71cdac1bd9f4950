"""Request limits and the auth token of this gateway process.

A module of its own on purpose: `serve.ingress` copies the FastAPI app and Ray pickles the
Gateway class with the globals it uses, so state written on "the app" in `__init__` is not the
state the serving app reads. Modules are pickled by reference: the replica's `Gateway.__init__`
and the middleware both see this one.
"""

from __future__ import annotations

from dataclasses import dataclass

from collab.adaptive import Backlog


@dataclass(frozen=True)
class Limits:
    token: str | None
    max_body_bytes: int


CURRENT: Limits | None = None


def configure(token: str | None, max_body_bytes: int) -> None:
    global CURRENT
    CURRENT = Limits(token or None, max_body_bytes)


# the API requests this gateway process is serving (/v1/query, /v1/refine): the adaptive gate's
# backlog and the age of its oldest request, signals that do not lag the load
IN_FLIGHT = Backlog()
