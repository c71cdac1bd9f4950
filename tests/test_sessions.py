"""The session table's bounds, without Ray."""

import pytest
import torch

from deployments.sessions import SessionTable


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def feats(n=10):
    return torch.zeros(n, 4)  # 40 floats = 160 bytes


def test_ttl_expiry_is_reported_as_expired():
    clock = Clock()
    table = SessionTable(ttl_s=5, max_sessions=10, max_bytes=10_000, clock=clock)
    sid = table.create(feats(), {"q": 1})["session_id"]
    assert table.lookup(sid)[0] == "ok"
    clock.now = 5.0
    assert table.lookup(sid) == ("expired", None)
    assert table.lookup("nope") == ("unknown", None)
    assert table.stats()["expired"] == 1 and table.stats()["sessions"] == 0 and table.stats()["bytes"] == 0


def test_count_and_memory_caps_evict_oldest():
    table = SessionTable(ttl_s=100, max_sessions=3, max_bytes=10_000, clock=Clock())
    ids = [table.create(feats(), {})["session_id"] for _ in range(5)]
    assert [table.lookup(s)[0] for s in ids] == ["evicted", "evicted", "ok", "ok", "ok"]
    small = SessionTable(ttl_s=100, max_sessions=100, max_bytes=500, clock=Clock())
    ids = [small.create(feats(), {})["session_id"] for _ in range(5)]  # 160 B each: 3 fit
    assert small.stats()["bytes"] <= 500 and small.stats()["sessions"] == 3
    assert small.lookup(ids[0])[0] == "evicted"
    with pytest.raises(ValueError):
        small.create(torch.zeros(1000), {})


def test_ten_thousand_abandoned_sessions_stay_bounded():
    clock = Clock()
    table = SessionTable(ttl_s=30, max_sessions=500, max_bytes=50_000, clock=clock)
    for i in range(10_000):
        clock.now = i * 0.01
        table.create(feats(), {"i": i})
    stats = table.stats()
    assert stats["sessions"] <= 500 and stats["bytes"] <= 50_000
    assert len(table.gone) <= 500
    assert stats["created"] == 10_000


def test_complete_frees_features_and_keeps_reply():
    table = SessionTable(ttl_s=100, max_sessions=10, max_bytes=10_000, clock=Clock())
    sid = table.create(feats(), {})["session_id"]
    claim = table.open(sid, None, "abc", lease_s=10)["claim"]
    assert table.complete(sid, claim, {"answer": "7"})
    status, session = table.lookup(sid)
    assert status == "ok" and session.result == {"answer": "7"} and table.stats()["bytes"] == 0


def test_completed_sessions_are_not_waiting_and_do_not_count_as_abandoned():
    clock = Clock()
    table = SessionTable(ttl_s=5, max_sessions=10, max_bytes=10_000, clock=clock)
    done = table.create(feats(), {"q": 1})["session_id"]
    table.create(feats(), {"q": 2})
    assert table.complete(done, table.open(done, None, "digest", lease_s=10)["claim"], {"answer": "7"})
    assert table.waiting == 1 and len(table.sessions) == 2
    clock.now = 6.0
    table.sweep()
    assert table.counters["expired"] == 1 and table.counters["completed"] == 1 and table.waiting == 0


def test_concurrent_refines_claim_the_session_once():
    """First opener claims; the same bytes wait ("pending") and then replay; other bytes conflict."""
    clock = Clock()
    table = SessionTable(ttl_s=100, max_sessions=10, max_bytes=10_000, clock=clock)
    sid = table.create(feats(), {"client_id": "edge"})["session_id"]
    first = table.open(sid, "edge", "A", lease_s=10)
    assert first["status"] == "ok" and first["claim"]
    assert table.open(sid, "edge", "A", lease_s=10)["status"] == "pending"
    assert table.open(sid, "edge", "B", lease_s=10)["status"] == "conflict"
    assert table.open(sid, "thief", "A", lease_s=10)["status"] == "forbidden"
    assert table.complete(sid, "not-the-claim", {"answer": "wrong"}) is False
    assert table.lookup(sid)[1].result is None and table.waiting == 1
    assert table.complete(sid, first["claim"], {"answer": "7"}) is True
    assert table.waiting == 0 and table.nbytes == 0
    assert table.open(sid, "edge", "A", lease_s=10) == {"status": "replay", "result": {"answer": "7"}}
    assert table.open(sid, "edge", "B", lease_s=10)["status"] == "conflict"


def test_a_failed_or_dead_claimant_gives_the_session_back():
    clock = Clock()
    table = SessionTable(ttl_s=100, max_sessions=10, max_bytes=10_000, clock=clock)
    sid = table.create(feats(), {})["session_id"]
    a = table.open(sid, None, "A", lease_s=10)["claim"]
    table.release(sid, "someone-else")  # only the claimant can release
    assert table.open(sid, None, "B", lease_s=10)["status"] == "conflict"
    table.release(sid, a)
    b = table.open(sid, None, "B", lease_s=10)  # released: another image may go
    assert b["status"] == "ok"
    clock.now = 11.0  # B's claimant died: its lease ends, A's retry claims
    a2 = table.open(sid, None, "A", lease_s=10)["claim"]
    assert table.complete(sid, b["claim"], {"answer": "late"}) is False  # B came back too late: not stored
    assert table.complete(sid, a2, {"answer": "7"}) is True
    assert table.open(sid, None, "A", lease_s=10)["result"] == {"answer": "7"}


def test_sweep_stops_at_the_first_live_session():
    clock = Clock()
    table = SessionTable(ttl_s=5, max_sessions=100, max_bytes=100_000, clock=clock)
    old = [table.create(feats(), {})["session_id"] for _ in range(3)]
    clock.now = 3.0
    new = [table.create(feats(), {})["session_id"] for _ in range(3)]
    clock.now = 6.0
    table.sweep()
    assert [table.lookup(s)[0] for s in old + new] == ["expired"] * 3 + ["ok"] * 3
    assert table.waiting == 3
