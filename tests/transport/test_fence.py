"""The generation fence (stream_app/transport/fence.py): pure logic on a fake clock. The
live behaviour is `streamrec bench faults`' paused_worker row (tests/bench/test_faults_bench.py)."""
from __future__ import annotations

import pytest

from stream_app.transport.fence import Fence, Fenced


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_gap_longer_than_the_session_fences_until_the_generation_changes():
    clock = Clock()
    f = Fence(limit_s=10, settle_s=20, clock=clock)
    for t in range(5):
        clock.now = t * 0.25
        f.tick(generation=3)
    f.check(generation=3)  # ticking steadily: writes go on
    clock.now = 31.0  # SIGSTOP for 30 s; the agent resumes before the ticker
    with pytest.raises(Fenced, match="stalled 30.0s"):
        f.check(generation=3)
    clock.now = 31.25
    f.tick(generation=3)  # the same gap is not counted twice
    assert f.gaps == [30.0] and f.fenced(3)
    assert f.unreported() == [30.0] and f.unreported() == []  # the batch saw it first: reported once all the same
    assert not f.fenced(4)  # rejoined: a new generation, a fresh start
    f.check(generation=4)


def test_the_ticker_noticing_first_fences_too_and_the_fence_settles_if_no_rebalance_comes():
    clock = Clock()
    f = Fence(limit_s=10, settle_s=20, clock=clock)
    f.tick(1)
    clock.now = 12.0  # only the event loop stalled; the member survived
    f.tick(1)
    with pytest.raises(Fenced):
        f.check(1)
    for t in range(13, 32):  # the ticker keeps running while the agent waits
        clock.now = t + 0.9
        f.tick(1)
    assert f.fenced(1)
    clock.now = 32.0
    assert not f.fenced(1)  # no rebalance within settle_s: still the owner
    f.check(1)


def test_gaps_shorter_than_the_session_never_fence():
    clock = Clock()
    f = Fence(limit_s=10, settle_s=20, clock=clock)
    for t in (0, 2, 9.5, 19, 28):
        clock.now = t
        f.tick(1)
        f.check(1)
    assert f.gaps == []
