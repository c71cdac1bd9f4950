"""The adaptive gate's pure logic (collab.adaptive) on synthetic load traces: the controller converges
within a stated time after a step in load, holds without oscillating, stays in its bounds, and the
gate never asks an edge for a crop past its budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from collab.adaptive import (
    CalibrationCurve,
    ControllerSettings,
    EdgeBudget,
    LoadController,
    edge_allows,
    load_threshold,
)

# a calibration curve shaped like collab.eval's sweep: refine rate falls as the threshold rises
THRESHOLDS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
RATES = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0]
SLO = 1500.0


def curve():
    sweep = [{"threshold": t, "refine_rate": r, "accuracy": 0.3 + 0.1 * r} for t, r in zip(THRESHOLDS, RATES)]
    sweep.append({"threshold": math.inf, "refine_rate": 0.0, "accuracy": 0.3})  # dropped: not finite
    return CalibrationCurve.from_sweep(sweep, [2000] * 9 + [4000])


def plant(load: str, cap: float) -> float:
    """p95 server time of a window at a refine-rate cap: light load never reaches the SLO; under
    heavy load every refine is expensive (the refine path queues)."""
    return 300 + 400 * cap if load == "light" else 800 + 4000 * cap


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def run(trace, noise=0.0, seed=0, settings=None):
    """Drive a controller through (load, windows) phases; one window = 20 completions at the plant's
    latency (times a noise factor). Returns the cap and p95 after each window."""
    clock, rng = Clock(), np.random.default_rng(seed)
    ctl = LoadController(
        settings or ControllerSettings(slo_p95_ms=SLO, window_s=10, decrease=0.7), ceiling=0.6, clock=clock
    )
    caps, p95s = [], []
    for load, windows in trace:
        for _ in range(windows):
            value = plant(load, ctl.cap)
            for _ in range(20):
                clock.t += 0.5  # 20 completions over a 10 s window
                ctl.observe(value * (1 + noise * rng.uniform(-1, 1)) if noise else value)
            caps.append(ctl.cap)
            p95s.append(value)
    return caps, p95s


def test_curve_maps_rates_to_thresholds_and_round_trips(tmp_path):
    c = curve()
    assert c.thresholds == tuple(THRESHOLDS) and c.crop_bytes_p90 == pytest.approx(2200.0)
    assert c.rate_at(1.0) == 0.8 and c.rate_at(1.2) == pytest.approx(0.72) and c.rate_at(9.0) == 0.0
    assert c.rate_at(0.1) == 1.0  # below the first point: its rate
    assert c.threshold_for_rate(0.6) == 1.5 and c.threshold_for_rate(0.55) == 2.0 and c.threshold_for_rate(1.0) == 0.5
    assert CalibrationCurve.load(c.save(tmp_path / "curve.json")) == c
    with pytest.raises(ValueError, match="must not increase"):
        CalibrationCurve((1.0, 2.0), (0.2, 0.5), (0.3, 0.3), 100.0)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a calibration curve"):
        CalibrationCurve.load(tmp_path / "bad.json")


def test_load_threshold_is_the_static_one_while_it_fits():
    c = curve()
    assert load_threshold(c, 1.5, cap=0.6).reason == "calibrated"  # rate 0.6 fits a 0.6 cap
    raised = load_threshold(c, 1.5, cap=0.3)
    assert raised.reason == "load" and raised.threshold == 2.5 and c.rate_at(raised.threshold) <= 0.3
    assert load_threshold(c, 3.0, cap=0.3).threshold == 3.0  # never lowered below the static threshold
    zero = CalibrationCurve((1.0, 2.0), (0.5, 0.2), (0.3, 0.3), 100.0)
    assert load_threshold(zero, 1.0, cap=0.0).threshold == math.inf
    assert load_threshold(zero, 1.0, cap=0.0).as_dict() == {"threshold": None, "reason": "load"}


def test_a_step_up_in_load_converges_in_four_windows_and_then_holds():
    """Light -> heavy -> light. Heavy at the static rate (0.6) puts p95 at 3.2 s against a 1.5 s
    SLO: x0.7 per window reaches the hold band [0.8, 1.0] x SLO in 4 windows (40 s) and stays there
    (no oscillation); back to light, +0.05 per window returns to the static rate in 10 windows."""
    caps, p95s = run([("light", 10), ("heavy", 30), ("light", 15)])
    assert caps[:10] == [0.6] * 10  # headroom: the adaptive gate is the static one
    heavy = caps[10:40]
    first_ok = next(i for i, p in enumerate(p95s[10:40]) if p <= SLO)
    assert first_ok <= 4  # within the SLO from the 5th window of the step
    assert len(set(heavy[4:])) == 1  # then the cap does not move: held in the band
    assert all(p <= SLO for p in p95s[10 + first_ok : 40])
    assert caps[40 + 9] == pytest.approx(0.6) and max(caps) <= 0.6  # back to the ceiling, never above


def test_noise_inside_the_band_does_not_make_it_oscillate_and_bounds_hold():
    settings = ControllerSettings(slo_p95_ms=SLO, window_s=10, decrease=0.7, min_rate=0.05)
    caps, p95s = run([("heavy", 60)], noise=0.05, seed=3, settings=settings)
    after = caps[6:]
    changes = sum(a != b for a, b in zip(after, after[1:]))
    assert changes <= 6  # at most a few corrections in 54 windows of +-5 % noise
    assert all(0.05 <= c <= 0.6 for c in caps)
    assert np.mean([p <= SLO * 1.05 for p in p95s[6:]]) >= 0.9


def test_light_traffic_and_idle_windows_let_the_cap_recover_and_old_samples_do_not_count():
    clock = Clock()
    ctl = LoadController(
        ControllerSettings(slo_p95_ms=SLO, window_s=10, decrease=0.7, min_samples=5), ceiling=0.6, clock=clock
    )
    for _ in range(10):  # one slow window: cut to 0.42
        clock.t += 1
        ctl.observe(10_000)
    clock.t += 0.5
    assert ctl.update() == pytest.approx(0.42)
    for _ in range(3):
        clock.t += 11
        ctl.observe(10_000)  # one completion a window (light traffic): no evidence of overload
    assert ctl.cap == pytest.approx(0.57) and ctl.last_p95 == pytest.approx(10_000)
    for _ in range(10):  # a burst of slow samples, then an hour of silence
        clock.t += 0.1
        ctl.observe(10_000)
    clock.t += 3600
    assert ctl.update() == 0.6  # the burst's window is cut once, the idle hour recovers it
    assert len(ctl.window) == 0


def test_a_queue_building_up_is_seen_before_any_of_its_requests_completes():
    """Completions lag an overload by the very queueing they suffer; the oldest request in flight
    does not: 5 s old with nothing completed cuts the cap at the window's end (defaults: 5 s, x0.5)."""
    clock = Clock()
    ctl = LoadController(ControllerSettings(slo_p95_ms=SLO), ceiling=0.6, clock=clock)
    clock.t = 5.0
    assert ctl.update(oldest_in_flight_ms=5000) == pytest.approx(0.3) and ctl.last_p95 == 5000
    clock.t = 10.0
    assert ctl.update(oldest_in_flight_ms=800) == pytest.approx(0.35)  # young requests, no completions: headroom


def test_recent_times_plan_on_the_slow_tail():
    from collab.adaptive import RecentTimes

    recent = RecentTimes(keep=10)
    assert recent.value == 0.0
    for ms in [100] * 8 + [1000, 1000]:
        recent.add(ms)
    assert recent.value == pytest.approx(1000.0)  # p90 of the last 10, not their mean (280)
    for ms in [100] * 10:
        recent.add(ms)
    assert recent.value == 100.0  # only the last `keep` count


def test_settings_are_validated():
    for bad in ({"slo_p95_ms": 0}, {"slo_p95_ms": 1, "decrease": 1.0}, {"slo_p95_ms": 1, "headroom": 1.2}):
        with pytest.raises(ValueError):
            ControllerSettings(**bad)
    # a deadline without the uplink: only the server's time counts
    assert edge_allows(EdgeBudget(deadline_ms=500), 2000, 200, 100) == (True, None)
    assert edge_allows(EdgeBudget(deadline_ms=250), 2000, 200, 100) == (False, "edge_deadline")


def test_the_gate_never_asks_for_a_crop_past_an_edges_budget():
    rng = np.random.default_rng(0)
    allowed = 0
    for _ in range(2000):
        budget = EdgeBudget(
            max_extra_bytes=int(rng.integers(500, 8000)) if rng.random() < 0.7 else None,
            deadline_ms=float(rng.uniform(100, 3000)) if rng.random() < 0.7 else None,
            uplink_kbps=float(rng.uniform(16, 2000)),
        )
        crop, elapsed, refine = float(rng.uniform(500, 6000)), float(rng.uniform(0, 1500)), float(rng.uniform(50, 800))
        ok, reason = edge_allows(budget, crop, elapsed, refine)
        if ok:
            allowed += 1
            assert budget.max_extra_bytes is None or crop <= budget.max_extra_bytes
            assert budget.deadline_ms is None or elapsed + crop * 8 / budget.uplink_kbps + refine <= budget.deadline_ms
        else:
            assert reason in ("edge_bytes", "edge_deadline")
    assert 200 < allowed < 1800  # both outcomes exercised
    # a 64 kbit/s link: a 2 KB crop takes 250 ms to upload
    assert edge_allows(EdgeBudget(deadline_ms=600, uplink_kbps=64), 2000, 200, 100) == (True, None)
    assert edge_allows(EdgeBudget(deadline_ms=500, uplink_kbps=64), 2000, 200, 100) == (False, "edge_deadline")
