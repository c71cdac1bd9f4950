"""The adaptive gate: a threshold that holds a latency SLO under load and respects each edge's budget.

A static entropy threshold is one number calibrated offline; under contention it asks for crops
the server cannot refine in time, and it does not know that one edge is on a slow link. Three
inputs decide each request's threshold here:

- the **calibration curve** (`CalibrationCurve`): for thresholds from `collab.eval`'s sweep on a
  calibration split, the refine rate and accuracy it gave, and the crop bytes. It turns "refine at
  most a share r of queries" into a threshold;
- the **server's load** (`LoadController`): the p95 of the server time of the queries this gateway
  replica completed in the last window, against `slo_p95_ms`. Above the SLO the cap on the refine
  rate is multiplied by `decrease`; below `headroom` x SLO it grows by `increase` back toward the
  static threshold's rate; in between it holds. One step per window, bounded, so a step in load
  moves the cap by a known amount per window and the hold band keeps it from oscillating
  (AIMD, as TCP's congestion window);
- the **backlog** (`Backlog`), the signal that leads the load: the requests ahead of this one
  divided by the rate this replica has been completing them (Little's law) is the time a new
  request will wait. A crop is asked for only while two such waits (the first pass's and the
  refine's) plus both stages' recent times fit `headroom` x SLO,
  so the first seconds of a load step, before any window closes, add no refines to the queue;
- the **edge's budget** (`EdgeBudget`, optional request fields): the crop is asked for only when
  its expected bytes (the curve's 90th percentile) fit `max_extra_bytes`, and its upload at the
  declared uplink plus the server's recent refine time and the backlog fits `deadline_ms`: planned
  before the first pass, and checked again after it on the time the first pass really took.

Pure Python, no Ray: each gateway replica runs its own controller on its own observations.
"""

from __future__ import annotations

import json
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CalibrationCurve:
    """Refine rate and accuracy per threshold on a calibration split (thresholds ascending)."""

    thresholds: tuple[float, ...]
    refine_rates: tuple[float, ...]  # non-increasing in the threshold
    accuracies: tuple[float, ...]
    crop_bytes_p90: float  # of the crops the calibration split sent
    source: str = ""
    model: str = ""  # model.path it was measured with: a curve belongs to one model and score

    def __post_init__(self) -> None:
        n = len(self.thresholds)
        if n < 2 or len(self.refine_rates) != n or len(self.accuracies) != n:
            raise ValueError("a calibration curve needs >= 2 points, each with a threshold, refine rate and accuracy")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError("calibration thresholds must increase")
        if any(b > a + 1e-12 for a, b in zip(self.refine_rates, self.refine_rates[1:])):
            raise ValueError("calibration refine rates must not increase with the threshold")

    @classmethod
    def from_sweep(
        cls, sweep: Sequence[dict], crop_bytes: Sequence[int], source: str = "", model: str = ""
    ) -> CalibrationCurve:
        """From `collab.eval`'s report (`sweep`) and the crop sizes of the same run."""
        points = sorted({float(p["threshold"]): p for p in sweep}.items())
        finite = [(t, p) for t, p in points if math.isfinite(t)]
        return cls(
            tuple(t for t, _ in finite),
            tuple(float(p["refine_rate"]) for _, p in finite),
            tuple(float(p["accuracy"]) for _, p in finite),
            float(np.percentile(crop_bytes, 90)) if len(crop_bytes) else 0.0,
            source,
            model,
        )

    def rate_at(self, threshold: float) -> float:
        """Refine rate at a threshold: linear between the calibrated points, the first point's rate
        below them, 0 past the last."""
        i = bisect_left(self.thresholds, threshold)
        if i >= len(self.thresholds):
            return 0.0
        if i == 0 or self.thresholds[i] == threshold:
            return self.refine_rates[i]
        t0, t1 = self.thresholds[i - 1], self.thresholds[i]
        r0, r1 = self.refine_rates[i - 1], self.refine_rates[i]
        return r0 + (r1 - r0) * (threshold - t0) / (t1 - t0)

    def threshold_for_rate(self, rate: float) -> float:
        """The lowest calibrated threshold that refines at most `rate` of the queries."""
        for t, r in zip(self.thresholds, self.refine_rates):
            if r <= rate + 1e-12:
                return t
        return math.inf  # not even the highest threshold refines this little: never

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationCurve:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                tuple(raw["thresholds"]),
                tuple(raw["refine_rates"]),
                tuple(raw["accuracies"]),
                float(raw["crop_bytes_p90"]),
                raw.get("source", ""),
                raw.get("model", ""),
            )
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a calibration curve ({exc})") from None


@dataclass(frozen=True)
class ControllerSettings:
    """Gains and bounds of the load controller (defaults: docs/adaptive.md)."""

    slo_p95_ms: float
    window_s: float = 5.0
    decrease: float = 0.5  # cap x this per window above the SLO
    increase: float = 0.05  # cap + this per window below headroom x SLO
    headroom: float = 0.8
    min_rate: float = 0.0
    min_samples: int = 5  # fewer completions in a window: hold (no evidence either way)

    def __post_init__(self) -> None:
        if self.slo_p95_ms <= 0 or self.window_s <= 0:
            raise ValueError("slo_p95_ms and window_s must be > 0")
        if not (0 < self.decrease < 1 and 0 < self.increase <= 1 and 0 < self.headroom < 1):
            raise ValueError("need 0 < decrease < 1, 0 < increase <= 1, 0 < headroom < 1")
        if not 0 <= self.min_rate <= 1 or self.min_samples < 1:
            raise ValueError("need 0 <= min_rate <= 1 and min_samples >= 1")


class LoadController:
    """AIMD on the cap of the refine rate, from the p95 server time of recent completions.

    The cap starts at (and never exceeds) `ceiling`, the static threshold's calibrated rate: with
    headroom the adaptive gate is the static one. Not thread-safe; one per gateway replica (its
    asyncio loop is the only caller)."""

    def __init__(self, settings: ControllerSettings, ceiling: float, clock: Callable[[], float] = time.monotonic):
        self.settings, self.ceiling, self.clock = settings, min(1.0, max(0.0, ceiling)), clock
        self.cap = self.ceiling
        self.window: deque[float] = deque()
        self.window_start = clock()
        self.last_p95: float | None = None

    def observe(self, server_ms: float) -> None:
        """One finished query's server time (first pass, or first pass + refine; a query that
        timed out counts with the time it was given). A window that is over is closed first, so
        every window holds only its own samples."""
        self.update()
        self.window.append(float(server_ms))

    def update(self, oldest_in_flight_ms: float = 0.0) -> float:
        """Close the window if it is over: one AIMD step on its signal, the larger of the p95 of
        its completions (when it holds min_samples) and the age of the oldest request still in
        flight (which sees a queue build up before any of its requests completes). A window with
        neither, and every window since that passed idle, is headroom: one increase each, so the
        cap recovers when the load has gone. Returns the cap."""
        now = self.clock()
        s = self.settings
        passed = int((now - self.window_start) // s.window_s)
        if passed < 1:
            return self.cap
        idle = passed - 1
        signal = float(oldest_in_flight_ms) if oldest_in_flight_ms > s.slo_p95_ms else None
        if len(self.window) >= s.min_samples:
            signal = max(signal or 0.0, float(np.percentile(list(self.window), 95)))
        if signal is not None:
            p95 = signal
            self.last_p95 = p95
            if p95 > s.slo_p95_ms:
                self.cap = max(s.min_rate, self.cap * s.decrease)
            elif p95 < s.headroom * s.slo_p95_ms:
                idle += 1
        else:
            idle += 1
        self.cap = min(self.ceiling, self.cap + s.increase * idle)
        self.window.clear()
        self.window_start += passed * s.window_s
        return self.cap


class Backlog:
    """The API requests one gateway replica is serving, and how long a new one will wait behind them.

    The wait is the requests ahead over the rate the replica completes requests while it is busy
    (completions in the last `horizon_s` over the busy time they took: Little's law with the
    service rate, not the arrival rate, so that one request ahead under light load reads as one
    service time, not as the gap between arrivals). Unlike the p95 of completions, which sees a
    queue only once its requests come out of it, the wait rises with the first request that
    queues; so does the age of the oldest request in flight. With no completion in the horizon,
    the requests ahead are assumed to run one after another at `fallback_ms` each. Not
    thread-safe: the replica's event loop is the only caller."""

    def __init__(self, horizon_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if horizon_s <= 0:
            raise ValueError("horizon_s must be > 0")
        self.horizon_s, self.clock = horizon_s, clock
        self._started: dict[int, float] = {}
        self._next = 0
        self._done: deque[tuple[float, float]] = deque()  # (completion time, busy seconds since the previous one)
        self._busy, self._last = 0.0, clock()

    def _advance(self) -> float:
        now = self.clock()
        if self._started:
            self._busy += now - self._last
        self._last = now
        return now

    def begin(self) -> int:
        now = self._advance()
        self._next += 1
        self._started[self._next] = now
        return self._next

    def end(self, token: int) -> None:
        if token not in self._started:
            return
        now = self._advance()  # busy up to now, this request included
        del self._started[token]
        self._done.append((now, self._busy))
        self._busy = 0.0
        self._forget(now)

    def _forget(self, now: float) -> None:
        """Completions older than the horizon no longer count (and are not kept: a gateway whose
        policy never reads the wait would otherwise grow this queue without bound)."""
        while self._done and self._done[0][0] < now - self.horizon_s:
            self._done.popleft()

    def __len__(self) -> int:
        return len(self._started)

    def oldest_age_ms(self) -> float:
        now = self.clock()
        return 1000.0 * max((now - t for t in self._started.values()), default=0.0)

    def service_rate_per_s(self) -> float:
        """Completions per busy second over the horizon (0 with none)."""
        self._forget(self.clock())
        busy = sum(b for _, b in self._done)
        return len(self._done) / busy if busy > 0 else 0.0

    def wait_ms(self, ahead: int, fallback_ms: float) -> float:
        if ahead <= 0:
            return 0.0
        rate = self.service_rate_per_s()
        return ahead * fallback_ms if rate == 0 else 1000.0 * ahead / rate


@dataclass(frozen=True)
class EdgeBudget:
    """What one edge can afford for a crop (optional request fields; None = no limit)."""

    max_extra_bytes: int | None = None
    deadline_ms: float | None = None  # the whole query, from the edge's send of the global image
    uplink_kbps: float | None = None  # the edge's declared uplink; without it uploads are not counted


@dataclass(frozen=True)
class GateDecision:
    """The threshold in force for one request and why (the reply's `gate`)."""

    threshold: float
    # "calibrated" (the static threshold), "load" (raised by the controller), "backlog" (the wait ahead
    # leaves no time for a refine), "edge_bytes", "edge_deadline"
    reason: str

    def as_dict(self) -> dict:
        return {"threshold": self.threshold if math.isfinite(self.threshold) else None, "reason": self.reason}


def load_threshold(curve: CalibrationCurve, static_threshold: float, cap: float) -> GateDecision:
    """The static threshold while its calibrated rate fits under the cap, else the one that does."""
    if curve.rate_at(static_threshold) <= cap + 1e-12:
        return GateDecision(static_threshold, "calibrated")
    return GateDecision(max(static_threshold, curve.threshold_for_rate(cap)), "load")


def edge_allows(budget: EdgeBudget, crop_bytes: float, elapsed_ms: float, refine_ms: float) -> tuple[bool, str | None]:
    """Whether a crop of `crop_bytes` fits the edge's budget, `elapsed_ms` into the query, with the
    refine taking about `refine_ms` on the server. (False, reason) when it does not."""
    if budget.max_extra_bytes is not None and crop_bytes > budget.max_extra_bytes:
        return False, "edge_bytes"
    if budget.deadline_ms is not None:
        upload_ms = crop_bytes * 8 / budget.uplink_kbps if budget.uplink_kbps else 0.0  # kbit/s = bit/ms
        if elapsed_ms + upload_ms + refine_ms > budget.deadline_ms:
            return False, "edge_deadline"
    return True, None


class RecentTimes:
    """The last `keep` values of a stage's time; `value` is the 90th percentile of those no older
    than `max_age_s` (a deadline check that plans on a typical time misses every slower one).

    With none that recent, `value` is the fastest time ever seen: what the stage costs with no
    queue (the backlog wait covers queueing). Without that, a stage that stopped being used under
    overload kept its overload times as the plan, and the plan kept refusing it: after a load
    step the adaptive gate refused every crop for the rest of the run although the server was idle."""

    def __init__(
        self, keep: int = 50, quantile: float = 90, max_age_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ):
        if max_age_s <= 0:
            raise ValueError("max_age_s must be > 0")
        self.values: deque[tuple[float, float]] = deque(maxlen=keep)  # (when, value)
        self.quantile, self.max_age_s, self.clock = quantile, max_age_s, clock
        self.fastest: float | None = None

    def add(self, value: float) -> None:
        self.values.append((self.clock(), float(value)))
        self.fastest = float(value) if self.fastest is None else min(self.fastest, float(value))

    @property
    def value(self) -> float:
        now = self.clock()
        recent = [v for t, v in self.values if now - t <= self.max_age_s]
        if recent:
            return float(np.percentile(recent, self.quantile))
        return self.fastest or 0.0


class AdaptiveGate:
    """What one gateway replica runs for `policy=adaptive`: the curve, its own load controller."""

    def __init__(
        self, curve: CalibrationCurve, settings: ControllerSettings, static_threshold: float, clock=time.monotonic
    ):
        self.curve, self.settings = curve, settings
        self.controller = LoadController(settings, ceiling=curve.rate_at(static_threshold), clock=clock)
        self.last_wait_ms = 0.0

    @classmethod
    def from_config(cls, gate, model_path: str | None = None) -> AdaptiveGate:
        """From a GateConfig; ValueError if its calibration curve cannot be read or was measured
        with another model than `model_path`."""
        from collab.paths import REPO_ROOT

        cfg = gate.adaptive
        path = Path(cfg.curve).expanduser()
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
        if not path.exists():
            raise ValueError(f"no calibration curve at {cfg.curve} (make one: collab-vlm eval --write-curve)")
        curve = CalibrationCurve.load(path)
        if curve.model and model_path is not None and Path(curve.model).name != Path(model_path).name:
            raise ValueError(
                f"the calibration curve {cfg.curve} was measured with {curve.model}, not {model_path}: "
                "make one for this model (collab-vlm eval --write-curve) and set gate.adaptive.curve"
            )
        settings = ControllerSettings(
            cfg.slo_p95_ms, cfg.window_s, cfg.decrease, cfg.increase, cfg.headroom, cfg.min_rate
        )
        return cls(curve, settings, gate.threshold)

    def decide(
        self,
        oldest_in_flight_ms: float,
        static_threshold: float,
        budget: EdgeBudget,
        before_refine_ms: float,
        refine_ms: float,
        wait_ms: float = 0.0,
        query_ms: float = 0.0,
    ) -> GateDecision:
        """This request's threshold: the load's, unless the backlog leaves no time for a refine or
        a crop would not fit the edge's budget. `before_refine_ms`: the query's time until a crop
        could be sent (its global upload at the declared rate, the time so far and the expected
        first pass; round trips are the edge's to leave room for); `wait_ms`: the replica's
        backlog (`Backlog.wait_ms`); `query_ms`, `refine_ms`: recent first-pass and refine server
        times."""
        cap = self.controller.update(oldest_in_flight_ms)
        if cap >= self.controller.ceiling:  # no load pressure: the static gate, whatever threshold was asked for
            decision = GateDecision(static_threshold, "calibrated")
        else:
            decision = load_threshold(self.curve, static_threshold, cap)
        self.last_wait_ms = wait_ms
        # the first pass waits behind the backlog and so will the refine: 2 waits, both stages
        planned_ms = 2 * wait_ms + query_ms + refine_ms
        if math.isfinite(decision.threshold) and planned_ms > self.settings.headroom * self.settings.slo_p95_ms:
            return GateDecision(math.inf, "backlog")
        fits, reason = edge_allows(budget, self.curve.crop_bytes_p90, before_refine_ms + wait_ms, refine_ms + wait_ms)
        return decision if fits else GateDecision(math.inf, reason)

    def crop_still_fits(self, budget: EdgeBudget, elapsed_ms: float, refine_ms: float, wait_ms: float = 0.0) -> bool:
        """After the first pass, on the time it actually took: whether the crop's upload and the refine
        (behind `wait_ms` of backlog) still fit the edge's deadline. `decide` planned the first pass at
        its recent p90, and a first pass slower than that (a cold replica, the first seconds of a load
        step) would otherwise send the edge a crop request it can only answer late."""
        if budget.deadline_ms is None:
            return True
        return edge_allows(budget, self.curve.crop_bytes_p90, elapsed_ms, refine_ms + wait_ms)[0]  # one wait left
