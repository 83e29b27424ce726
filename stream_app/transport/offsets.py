"""In-order delivery per partition, even when Faust drops messages around a rebalance.

Measured (docs/design.md, "Idempotent replay", failed ~1 run in 2 of the rebalance test):
when a worker takes over partitions, faust-streaming 0.15 resumes the stream partitions
*before* it seeks them to their committed offsets, and a handful of messages fetched in
between never reach the agent (10 per partition in the run that showed it: offsets
138-147 went missing, 148 arrived next). Nothing is lost in Kafka; the missing events
came back at the next rebalance, appended *after* newer ones (a user's history in the
wrong order), or, where Faust had counted them as acked and committed past them, never.

The guard below sees every message the agent gets. The input topic has no compaction
and no transaction markers, so offsets of one partition arrive contiguous; a jump
forward is a hole. The guard then drops the messages past the hole (they will be read
again) and asks for a seek back to the first missing offset. Faust acks what is
dropped, so the app also holds the partition's commits at an open hole (`holes`) and
removes the hole from Faust's record of skipped offsets, which count as acked.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _Hole:
    start: int  # first offset that never arrived: where to seek
    trigger: int  # the offset that revealed the hole; anything at or below it is a re-read
    asked_at: float


@dataclass
class OffsetGuard:
    """Decides, per message, whether the agent may process it now.

    `retry_s`: if the re-read has not started this long after a seek, seek again (Faust's
    fetch loop can overwrite the read position with a batch it fetched before the seek;
    the app asks `overdue()` on a timer, since after a stream's end no message comes)."""

    retry_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    expected: dict[int, int] = field(default_factory=dict)
    holes: dict[int, _Hole] = field(default_factory=dict)
    # partition -> (offset commits are held at, offset whose processing releases the hold):
    # a hole's hold outlives the hole, which closes when its re-read *arrives*; Faust has
    # acked the dropped offsets already, so a commit between the re-read's arrival and its
    # processing would pass events a crash would then lose
    held: dict[int, tuple[int, int]] = field(default_factory=dict)
    generation: int | None = None

    def new_generation(self, generation: int, committed: dict[int, int] | None = None) -> None:
        """A rebalance moves partitions and rewinds each to its committed offset: what
        was expected before means nothing after it, and the committed offsets (where
        known) are where each partition must start. A first message past its committed
        offset is a hole like any other: one chaos run lost a partition's events from
        offset ~1,700 to ~6,200 that way, unseen by a guard that took the first offset
        it got as the start."""
        if generation != self.generation:
            self.expected = dict(committed or {})
            self.holes.clear()
            self.held.clear()
            self.generation = generation

    def admit(self, partition: int, offset: int) -> tuple[bool, int | None]:
        """(process this message?, offset to seek the partition back to, or None)."""
        hole = self.holes.get(partition)
        if hole is not None:
            if offset <= hole.trigger:  # the re-read has started (or the "hole" had no records)
                del self.holes[partition]
                self.expected[partition] = offset + 1
                return True, None
            return False, None
        want = self.expected.get(partition)
        if want is not None and offset > want:
            self._hold(partition, want, offset)
            return False, want
        # the first message of a generation, the next one, or a redelivery (offset < want)
        self.expected[partition] = offset + 1
        return True, None

    def rewind(self, partition: int, start: int, last: int) -> None:
        """Read `start..last` again (a batch that failed for an environmental reason,
        stream_app/pipeline/failures.py): a hole by another name, so what follows is
        dropped until the re-read arrives and commits are held at `start`."""
        self._hold(partition, start, last)

    def processed(self, partition: int, offset: int) -> None:
        """A batch that went up to `offset` on `partition` is written: a hold whose re-read
        it finished is released."""
        hold = self.held.get(partition)
        if hold is not None and partition not in self.holes and offset >= hold[1]:
            del self.held[partition]

    def _hold(self, partition: int, start: int, trigger: int) -> None:
        self.holes[partition] = _Hole(start, trigger, self.clock())
        held = self.held.get(partition)
        self.held[partition] = (min(start, held[0]) if held else start, max(trigger, held[1]) if held else trigger)

    def overdue(self) -> list[tuple[int, int]]:
        """(partition, offset) of holes whose re-read has not started within retry_s: seek again."""
        now, due = self.clock(), []
        for partition, hole in self.holes.items():
            if now - hole.asked_at >= self.retry_s:
                hole.asked_at = now
                due.append((partition, hole.start))
        return due
