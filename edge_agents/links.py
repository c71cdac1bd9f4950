"""Simulated uplinks: a private link per device, or one multi-access channel shared by all.

Time on a link is simulated by waiting, so the server sees requests arrive exactly as late as the
network would have made them. One exchange costs

    transmission (bytes / rate) + RTT (+ jitter, uniform in [-jitter, +jitter], never below 0)

With a shared channel (the paper's open question 1: many edge devices behind one uplink) the
transmission part is decided by the channel instead of the device's own rate:

- ``ps`` (processor sharing): the capacity is split equally among the transfers in flight, so a
  transfer slows down while others are sending; two equal transfers started together both take
  twice as long as one alone.
- ``fifo``: one transfer at a time at full capacity, in arrival order.

Pure asyncio, no Ray: the load test wraps `SharedChannel` in a Ray actor so every agent process
sees the same channel.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass
from typing import Literal

Discipline = Literal["ps", "fifo"]


def transmission_s(nbytes: int, rate_mbps: float) -> float:
    """Seconds to push nbytes through rate_mbps (10^6 bit/s) of uplink."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if rate_mbps <= 0:
        raise ValueError(f"rate_mbps must be > 0, got {rate_mbps}")
    return nbytes * 8 / (rate_mbps * 1e6)


def round_trip_s(rtt_ms: float, jitter_ms: float, rng: random.Random) -> float:
    """One RTT with uniform jitter, clipped at zero (a packet never arrives before it is sent)."""
    jitter = rng.uniform(-jitter_ms, jitter_ms) if jitter_ms > 0 else 0.0
    return max(0.0, rtt_ms + jitter) / 1000.0


def exchange_s(nbytes: int, rate_mbps: float, rtt_ms: float, jitter_ms: float, rng: random.Random) -> float:
    """Network time of one request/response exchange on a private link."""
    return transmission_s(nbytes, rate_mbps) + round_trip_s(rtt_ms, jitter_ms, rng)


@dataclass
class _Transfer:
    remaining_bits: float
    done: asyncio.Future


class SharedChannel:
    """A multi-access uplink of `capacity_mbps` shared by every agent that transmits through it.

    `transmit(nbytes)` returns when the bytes are through, after the wait the discipline implies.
    The channel also keeps what an operator wants to see: busy time (utilisation), transfers and
    bits carried, and the most transfers in flight at once.
    """

    def __init__(self, capacity_mbps: float, discipline: Discipline = "ps"):
        if capacity_mbps <= 0:
            raise ValueError(f"capacity_mbps must be > 0, got {capacity_mbps}")
        if discipline not in ("ps", "fifo"):
            raise ValueError(f"discipline must be 'ps' or 'fifo', got {discipline!r}")
        self.capacity_bps = capacity_mbps * 1e6
        self.discipline = discipline
        self._active: dict[int, _Transfer] = {}
        self._ids = itertools.count()
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._fifo_free_at = 0.0
        self._fifo_lock: asyncio.Lock | None = None
        self._started = time.monotonic()
        self._busy_s = 0.0
        self._bits = 0.0
        self._transfers = 0
        self._peak = 0
        self._fifo_in_flight = 0

    async def transmit(self, nbytes: int) -> float:
        """Send nbytes; returns the seconds it took (queueing and sharing included)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        start = time.monotonic()
        self._transfers += 1
        self._bits += nbytes * 8
        if nbytes == 0:
            return 0.0
        if self.discipline == "fifo":
            await self._transmit_fifo(nbytes * 8)
        else:
            await self._transmit_ps(nbytes * 8)
        return time.monotonic() - start

    # -- FIFO: one at a time, arrival order (asyncio.Lock wakes waiters in FIFO order)
    async def _transmit_fifo(self, bits: float) -> None:
        if self._fifo_lock is None:
            self._fifo_lock = asyncio.Lock()
        self._fifo_in_flight += 1
        self._peak = max(self._peak, self._fifo_in_flight)
        try:
            async with self._fifo_lock:
                duration = bits / self.capacity_bps
                await asyncio.sleep(duration)
                self._busy_s += duration
        finally:
            self._fifo_in_flight -= 1

    # -- processor sharing: event-driven; progress is advanced at every arrival and departure
    async def _transmit_ps(self, bits: float) -> None:
        loop = asyncio.get_running_loop()
        self._advance()
        transfer = _Transfer(bits, loop.create_future())
        key = next(self._ids)
        self._active[key] = transfer
        self._peak = max(self._peak, len(self._active))
        self._reschedule(loop)
        try:
            await transfer.done
        except asyncio.CancelledError:  # the sender gave up: free its share for the others
            self._advance()
            self._active.pop(key, None)
            self._reschedule(loop)
            raise

    def _advance(self) -> None:
        """Credit every active transfer with its share of the capacity since the last event."""
        now = time.monotonic()
        elapsed = now - self._last
        self._last = now
        if not self._active or elapsed <= 0:
            return
        self._busy_s += elapsed
        share = self.capacity_bps * elapsed / len(self._active)
        for t in self._active.values():
            t.remaining_bits -= share

    def _reschedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._active:
            least = min(t.remaining_bits for t in self._active.values())
            delay = max(0.0, least * len(self._active) / self.capacity_bps)
            self._timer = loop.call_later(delay, self._on_departure, loop)

    def _on_departure(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._advance()
        tolerance = self.capacity_bps * 1e-6  # a microsecond of capacity: timer granularity
        for key in [k for k, t in self._active.items() if t.remaining_bits <= tolerance]:
            transfer = self._active.pop(key)
            if not transfer.done.done():
                transfer.done.set_result(None)
        self._reschedule(loop)

    def reset(self) -> None:
        """Start the counters afresh (the load test calls it when the load starts)."""
        self._advance()
        self._started = time.monotonic()
        self._busy_s = self._bits = 0.0
        self._transfers = self._peak = 0

    def stats(self) -> dict:
        """Counters since the channel was created; utilisation = busy time / elapsed time."""
        self._advance()
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {
            "discipline": self.discipline,
            "capacity_mbps": self.capacity_bps / 1e6,
            "transfers": self._transfers,
            "bytes": int(self._bits // 8),
            "busy_s": self._busy_s,
            "elapsed_s": elapsed,
            "utilisation": min(1.0, self._busy_s / elapsed),
            "in_flight": len(self._active) if self.discipline == "ps" else self._fifo_in_flight,
            "peak_in_flight": self._peak,
        }
