"""RequestQueue: FCFS and priority order, front insertion, removal, and the preemption victim choice."""

import random

import pytest

from pagedllm.core.request_queue import (
    FCFSRequestQueue,
    PriorityRequestQueue,
    make_request_queue,
)
from tests.core.fake_runner import make_request


def _req(rid: str, priority: int = 0, arrival: float = 0.0):
    return make_request(rid, [1], priority=priority, arrival=arrival)


def _ids(queue) -> list[str]:
    return [r.request_id for r in queue]


def test_make_request_queue_picks_the_policy_once_and_rejects_unknown_names():
    assert isinstance(make_request_queue("fcfs"), FCFSRequestQueue)
    assert isinstance(make_request_queue("priority"), PriorityRequestQueue)
    with pytest.raises(ValueError, match="policy"):
        make_request_queue("lifo")


def test_fcfs_order_front_insertion_and_removal():
    q = FCFSRequestQueue()
    assert not q and len(q) == 0
    a, b, c, d = (_req(x) for x in "abcd")
    q.add(a)
    q.add(b)
    q.prepend(c)  # preempted or forked: runs next
    q.add(d)
    assert _ids(q) == ["c", "a", "b", "d"] and len(q) == 4 and q
    assert q.peek() is c and q.pop() is c and q.peek() is a
    q.remove(b)
    assert _ids(q) == ["a", "d"]
    with pytest.raises(ValueError):
        q.remove(b)


def test_fcfs_victim_is_the_newest_running_request():
    running = [_req("old", priority=5), _req("mid"), _req("new", priority=-5)]
    assert FCFSRequestQueue.pick_victim(running) is running[-1]


def test_priority_order_is_by_priority_then_arrival_and_ignores_the_front():
    q = PriorityRequestQueue()
    reqs = {rid: _req(rid, p, t) for rid, p, t in
            [("late_hi", 0, 5.0), ("lo", 2, 0.0), ("early_hi", 0, 1.0), ("mid", 1, 0.5)]}
    for r in reqs.values():
        q.add(r)
    assert _ids(q) == ["early_hi", "late_hi", "mid", "lo"]
    q.prepend(_req("preempted_lo", 2, 3.0))  # a preempted request keeps its place by key
    assert _ids(q) == ["early_hi", "late_hi", "mid", "lo", "preempted_lo"]
    assert q.pop() is reqs["early_hi"] and q.peek() is reqs["late_hi"]
    q.remove(reqs["mid"])
    assert _ids(q) == ["late_hi", "lo", "preempted_lo"]


def test_priority_equal_keys_keep_insertion_order():
    q = PriorityRequestQueue()
    for rid in "abc":
        q.add(_req(rid, 1, 1.0))
    q.prepend(_req("d", 1, 1.0))
    assert _ids(q) == ["a", "b", "c", "d"]


def test_priority_matches_the_linear_insertion_it_replaced():
    """The bisect queue keeps exactly the order of the former scan-for-the-first-larger-key insert."""
    rng = random.Random(0)
    q, ref = PriorityRequestQueue(), []
    for i in range(300):
        op = rng.random()
        if op < 0.6 or not ref:
            r = _req(f"r{i}", rng.randint(0, 3), float(rng.randint(0, 20)))
            key = (r.priority, r.arrival_time)
            idx = next((j for j, x in enumerate(ref) if (x.priority, x.arrival_time) > key), len(ref))
            ref.insert(idx, r)
            (q.add if rng.random() < 0.5 else q.prepend)(r)
        elif op < 0.8:
            assert q.pop() is ref.pop(0)
        else:
            victim = rng.choice(ref)
            ref.remove(victim)
            q.remove(victim)
        assert list(q) == ref


def test_priority_victim_is_the_highest_priority_value_then_latest_arrival():
    running = [_req("a", 0, 3.0), _req("b", 2, 1.0), _req("c", 2, 2.0), _req("d", 1, 9.0)]
    assert PriorityRequestQueue.pick_victim(running).request_id == "c"
    tied = [_req("x", 1, 1.0), _req("y", 1, 1.0)]
    assert PriorityRequestQueue.pick_victim(tied).request_id == "x"  # max keeps the first of equals
