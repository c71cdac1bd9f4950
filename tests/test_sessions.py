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
    table.complete(sid, "abc", {"answer": "7"})
    status, session = table.lookup(sid)
    assert status == "ok" and session.result == {"answer": "7"} and table.stats()["bytes"] == 0


def test_completed_sessions_are_not_waiting_and_do_not_count_as_abandoned():
    clock = Clock()
    table = SessionTable(ttl_s=5, max_sessions=10, max_bytes=10_000, clock=clock)
    done = table.create(feats(), {"q": 1})["session_id"]
    table.create(feats(), {"q": 2})
    table.complete(done, "digest", {"answer": "7"})
    assert table.waiting == 1 and len(table.sessions) == 2
    clock.now = 6.0
    table.sweep()
    assert table.counters["expired"] == 1 and table.counters["completed"] == 1 and table.waiting == 0
