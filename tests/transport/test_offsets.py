"""OffsetGuard: pure logic of the per-partition hole detector (stream_app/transport/offsets.py).
The live behaviour is covered by the rebalance and crash tests, which failed without it."""
from __future__ import annotations

from stream_app.transport.offsets import OffsetGuard


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(guard: OffsetGuard, partition: int, offsets) -> list[tuple[int, bool, int | None]]:
    return [(o, *guard.admit(partition, o)) for o in offsets]


def test_contiguous_offsets_and_redeliveries_pass():
    g = OffsetGuard()
    g.new_generation(1)
    assert all(ok and seek is None for _, ok, seek in feed(g, 0, [5, 6, 7, 7, 3, 4, 5, 6, 7, 8]))
    assert g.expected == {0: 9}


def test_a_hole_drops_what_follows_until_the_reread_fills_it():
    g = OffsetGuard(clock=Clock())
    g.new_generation(1)
    feed(g, 0, range(130, 138))
    # Faust lost 138-147; 148.. arrive; then the re-read after the seek starts at 138
    got = feed(g, 0, [148, 149, 150]) + feed(g, 0, range(138, 152))
    assert got[0] == (148, False, 138)  # seek back to the first missing offset, once
    assert got[1:3] == [(149, False, None), (150, False, None)]
    assert [o for o, ok, _ in got[3:] if ok] == list(range(138, 152))  # everything in order
    assert not g.holes


def test_other_partitions_are_unaffected():
    g = OffsetGuard()
    g.new_generation(1)
    feed(g, 0, [10, 11])
    feed(g, 1, [50])
    assert g.admit(0, 20) == (False, 12)
    assert g.admit(1, 51) == (True, None)


def test_a_hole_without_records_is_accepted_when_the_reread_shows_it():
    """Offsets can be absent for real (compaction, transaction markers): after the seek,
    the re-read starts at the offset that revealed the hole, which is then taken."""
    g = OffsetGuard()
    g.new_generation(1)
    feed(g, 0, [1, 2])
    assert g.admit(0, 6) == (False, 3)
    assert g.admit(0, 7) == (False, None)  # fetched before the seek
    assert g.admit(0, 6) == (True, None)  # the re-read: nothing existed at 3-5
    assert g.admit(0, 7) == (True, None)


def test_seek_is_asked_again_when_the_reread_does_not_start():
    clock = Clock()
    g = OffsetGuard(retry_s=2.0, clock=clock)
    g.new_generation(1)
    feed(g, 0, [1])
    assert g.admit(0, 5) == (False, 2)
    clock.now = 1.0
    assert g.admit(0, 6) == (False, None)
    assert g.overdue() == []
    clock.now = 3.5
    assert g.overdue() == [(0, 2)]
    assert g.overdue() == []  # asked again just now
    assert g.admit(0, 2) == (True, None)
    clock.now = 10
    assert g.overdue() == []


def test_a_new_generation_forgets_positions():
    g = OffsetGuard()
    g.new_generation(1)
    feed(g, 0, [100, 101])
    g.new_generation(2)  # partition 0 went elsewhere and came back much later
    assert g.admit(0, 900) == (True, None)
    g.new_generation(2)  # same generation: positions kept
    assert g.admit(0, 905) == (False, 901)


def test_a_generation_starts_at_its_committed_offsets():
    g = OffsetGuard(clock=Clock())
    g.new_generation(3, committed={0: 1700, 1: 40})
    assert feed(g, 1, [40, 41]) == [(40, True, None), (41, True, None)]
    assert feed(g, 0, [6200]) == [(6200, False, 1700)]  # skipped from the start: read again
    assert feed(g, 2, [9]) == [(9, True, None)]  # never committed: the first offset is the start


def test_commits_are_clamped_at_a_hold_and_pass_once_it_is_released():
    """The clamp installed on Faust's offset filter (stream_app/transport/guarded.py), on a
    stand-in consumer: the filter's arithmetic is pure logic."""
    from types import SimpleNamespace

    from faust.types import TP

    from stream_app.transport.guarded import hold_commits_at_holes
    tp0, tp1 = TP("events", 0), TP("events", 1)
    consumer = SimpleNamespace(_committed_offset={tp0: 5, tp1: 5},
                               _filter_committable_offsets=lambda tps: {tp0: 40, tp1: 40})
    g = OffsetGuard()
    g.new_generation(1)
    hold_commits_at_holes(SimpleNamespace(consumer=consumer), g)
    g.rewind(0, 20, 29)
    assert consumer._filter_committable_offsets(None) == {tp0: 20, tp1: 40}
    consumer._committed_offset[tp0] = 20
    assert consumer._filter_committable_offsets(None) == {tp1: 40}  # nothing new to commit on 0
    g.admit(0, 20)
    g.processed(0, 29)
    assert consumer._filter_committable_offsets(None) == {tp0: 40, tp1: 40}
