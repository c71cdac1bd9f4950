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


def test_recent_times_forget_an_overload_once_the_stage_stops_being_used():
    """A stage refused under overload records no new times; its plan must not stay at the overload's
    (live, that refused every crop for the rest of a load step run, on an idle server)."""
    from collab.adaptive import RecentTimes

    clock = Clock()
    recent = RecentTimes(keep=10, max_age_s=30, clock=clock)
    for ms in (300, 320, 310):  # light load
        recent.add(ms)
        clock.t += 1
    for ms in [12_000] * 10:  # an overload: the light-load times leave the last 10
        recent.add(ms)
        clock.t += 1
    assert recent.value == pytest.approx(12_000)
    clock.t += 29
    assert recent.value == pytest.approx(12_000)  # still recent
    clock.t += 2
    assert recent.value == 300.0  # nothing recent: the fastest time seen, the stage without a queue
    recent.add(500)
    assert recent.value == 500.0  # a new time is the plan again
    with pytest.raises(ValueError):
        RecentTimes(max_age_s=0)


def test_after_an_overload_the_gate_asks_for_crops_again_once_the_queue_is_gone():
    from collab.adaptive import AdaptiveGate, RecentTimes

    clock = Clock()
    gate = AdaptiveGate(curve(), ControllerSettings(slo_p95_ms=SLO), 3.0, clock=clock)
    refine = RecentTimes(max_age_s=30, clock=clock)
    refine.add(400)
    for _ in range(20):
        refine.add(15_000)  # refines queued behind an overload
    plan = lambda: gate.decide(0.0, 3.0, EdgeBudget(), 100.0, refine.value, wait_ms=0.0, query_ms=100.0)  # noqa: E731
    assert plan().reason == "backlog"  # a 15 s refine does not fit a 2 s SLO
    clock.t += 31  # no refine since, and nothing queued: the cap has climbed back meanwhile
    for _ in range(40):
        gate.controller.update(0.0)
        clock.t += 5
    assert plan().reason == "calibrated" and math.isfinite(plan().threshold)


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


def test_a_first_pass_slower_than_planned_withdraws_the_crop_request():
    """The deadline is planned before the first pass on its recent time, and checked again on the
    time it really took: a crop that no longer fits is not asked for (the sensor's late refines at
    the load step's start came from first passes slower than planned)."""
    from collab.adaptive import AdaptiveGate

    gate = AdaptiveGate(curve(), ControllerSettings(slo_p95_ms=SLO), 3.0, clock=Clock())
    sensor = EdgeBudget(deadline_ms=1500, uplink_kbps=64)
    upload_ms = gate.curve.crop_bytes_p90 * 8 / 64
    refine_ms = 300.0
    global_ms = 250.0  # the global image's upload: elapsed when the request reaches the server
    planned = gate.decide(0.0, 3.0, sensor, global_ms + 100.0, refine_ms, query_ms=100.0)
    assert planned.reason == "calibrated"  # 250 + 100 (first pass) + upload + 300 fits 1.5 s
    assert gate.crop_still_fits(sensor, global_ms + 100.0, refine_ms)
    slow_first_pass = 1500 - global_ms - upload_ms - refine_ms + 1  # 1 ms too slow for the crop to make it
    assert not gate.crop_still_fits(sensor, global_ms + slow_first_pass, refine_ms)
    assert gate.crop_still_fits(sensor, global_ms + slow_first_pass - 2, refine_ms)
    assert not gate.crop_still_fits(sensor, global_ms + 100.0, refine_ms, wait_ms=slow_first_pass)  # a queue ahead
    spare = 1500 - global_ms - 100.0 - upload_ms - refine_ms
    assert gate.crop_still_fits(sensor, global_ms + 100.0, refine_ms, wait_ms=spare - 1)  # the refine's wait, once
    assert gate.crop_still_fits(EdgeBudget(), 10**6, 10**6)  # no deadline: nothing to miss


def test_the_backlog_is_requests_ahead_over_the_busy_service_rate():
    from collab.adaptive import Backlog

    clock = Clock()
    backlog = Backlog(horizon_s=5.0, clock=clock)
    assert backlog.wait_ms(0, 100) == 0.0 and backlog.wait_ms(3, 100) == 300.0  # nothing completed yet: serial
    for _ in range(4):  # light load: a 100 ms request every second
        clock.t += 0.9
        token = backlog.begin()
        clock.t += 0.1
        backlog.end(token)
    assert backlog.service_rate_per_s() == pytest.approx(10.0)  # per busy second, not the 1 a second that arrive
    assert backlog.wait_ms(2, 999) == pytest.approx(200.0)
    tokens = [backlog.begin() for _ in range(6)]  # a burst: 6 at once, served 4 a second
    for token in tokens:
        clock.t += 0.25
        backlog.end(token)
    assert len(backlog) == 0 and backlog.oldest_age_ms() == 0.0
    # horizon [0.5, 5.5]: the 4 light ones (0.1 s busy each) and the burst (1.5 s): 10 / 1.9
    assert backlog.service_rate_per_s() == pytest.approx(10 / 1.9)
    first = backlog.begin()
    clock.t += 2.0
    backlog.begin()
    assert backlog.oldest_age_ms() == pytest.approx(2000.0) and len(backlog) == 2
    backlog.end(first)
    backlog.end(first)  # ending twice counts once
    clock.t += 30.0
    assert backlog.wait_ms(2, 250) == 500.0  # an idle spell: back to the serial fallback


def simulate(gate, static, rates, seed=0, first_ms=80.0, refine_ms=300.0, uplink_ms=50.0, refine_share=0.35):
    """One FIFO server (one query at a time) under Poisson arrivals, `rates` = [(qps, seconds), ...];
    the gate decides at each arrival as the gateway does (its backlog of requests in flight, recent
    stage times); a refined query's crop arrives `uplink_ms` after its first answer. Returns
    (arrival time, server ms, refined) per query."""
    import heapq

    from collab.adaptive import Backlog, RecentTimes

    rng = np.random.default_rng(seed)
    arrivals, t = [], 0.0
    for qps, seconds in rates:
        end = t + seconds
        while True:
            t += rng.exponential(1 / qps)
            if t >= end:
                t = end
                break
            arrivals.append(t)
    clock = Clock()
    gate.controller.clock = clock
    backlog = Backlog(clock=clock)
    events = [(a, 0, i, "arrive") for i, a in enumerate(arrivals)]
    heapq.heapify(events)
    queue, busy_until = [], 0.0
    recent = {"query": RecentTimes(clock=clock), "refine": RecentTimes(clock=clock)}
    refined, first_done, done, tokens = {}, {}, {}, {}
    while events:
        clock.t, _, i, what = heapq.heappop(events)
        if what in ("arrive", "crop"):
            tokens[i] = backlog.begin()
            queue.append((i, "query" if what == "arrive" else "refine", clock.t))
        if what == "arrive":
            uncertain = rng.random() < refine_share  # the share of first passes the static gate refines
            q, r = recent["query"].value, recent["refine"].value
            wait = backlog.wait_ms(len(backlog) - 1, q)
            decision = gate.decide(backlog.oldest_age_ms(), static, EdgeBudget(), q, r, wait_ms=wait, query_ms=q)
            refined[i] = uncertain and math.isfinite(decision.threshold)
        elif what.startswith("done"):
            backlog.end(tokens[i])
            kind, began = what.split(":")[1], float(what.split(":")[2])
            ms = (clock.t - began) * 1000
            recent[kind].add(ms)
            if kind == "query" and refined[i]:
                first_done[i] = ms
                heapq.heappush(events, (clock.t + uplink_ms / 1000, 1, i, "crop"))
            else:
                done[i] = ms + first_done.get(i, 0.0)
                gate.controller.observe(done[i])
        while queue and busy_until <= clock.t:
            j, kind, began = queue.pop(0)
            busy_until = clock.t + (first_ms if kind == "query" else refine_ms) / 1000
            heapq.heappush(events, (busy_until, 2, j, f"done:{kind}:{began}"))
    return [(arrivals[i], done[i], refined[i]) for i in sorted(done)]


def test_the_backlog_holds_the_slo_through_a_load_step_where_the_window_controller_alone_does_not():
    """2 -> 10 -> 2 queries/s at a server that takes 80 ms a first pass and 300 ms a refine: 35 % refines
    overload it (10 x (0.08 + 0.35 x 0.3) = 1.85 s of work a second); first passes alone do not (0.8).
    The issue's measure: p95 server time per 10 s window of arrivals, from the step on."""
    from collab.adaptive import AdaptiveGate

    settings = ControllerSettings(slo_p95_ms=SLO)
    static = 3.0
    steep = CalibrationCurve((2.0, 3.0, 4.0), (0.6, 0.35, 0.0), (0.4, 0.38, 0.3), 2000.0)
    rates = [(2, 60), (10, 60), (2, 60)]

    def window_p95s(rows):
        return [float(np.percentile([ms for a, ms, _ in rows if w <= a < w + 10], 95)) for w in range(60, 180, 10)]

    with_backlog = simulate(AdaptiveGate(steep, settings, static), static, rates)
    window_only = AdaptiveGate(steep, settings, static)
    decide = window_only.decide
    window_only.decide = lambda *a, **k: decide(*a, **{**k, "wait_ms": 0.0})  # the gate as it was: windows only
    without = simulate(window_only, static, rates)
    assert max(window_p95s(with_backlog)) <= SLO  # every window from the step on
    assert max(window_p95s(without)[:2]) > SLO  # the step's first windows queue before the first cut

    def refine_rate(rows, start, end):
        return float(np.mean([r for a, _, r in rows if start <= a < end]))

    assert abs(refine_rate(with_backlog, 0, 60) - 0.35) < 0.1  # light load: the static gate's refines
    assert 0 < refine_rate(with_backlog, 60, 120) < 0.2  # the step: fewer, not none
    # after the step down there is no cap to climb back: refines return at once (the window
    # controller's cap is still at its floor for the first window, then climbs back)
    assert refine_rate(with_backlog, 120, 130) > refine_rate(without, 120, 130) + 0.1
    assert abs(refine_rate(with_backlog, 130, 180) - 0.35) < 0.1  # and stay at the static gate's share
