"""The generation fence: a worker that was frozen longer than its session timeout writes
nothing until it knows whether it still owns its partitions (docs/design.md, "Paused
workers are fenced").

Without transactions (the embedded broker has none) Kafka fences a worker's offset
commits, not its writes: a worker SIGSTOPped, swapped out or stalled past the session
timeout has been evicted from the group and its partitions given to another worker, yet
when it resumes it would finish its batch and write changelog and output records for
users another worker now owns. A ticker in the event loop notices the gap; a batch that
sees one is not written and is read again once the group's generation has changed (the
partitions went elsewhere and may come back), or after `settle_s` if it has not (the
member survived: only the event loop had stalled while the consumer thread heartbeat).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


class Fenced(Exception):
    """Raised before a batch's writes by a worker that may have lost its partitions."""


@dataclass
class Fence:
    limit_s: float  # the group session timeout: a longer gap means the member was evicted
    settle_s: float  # how long to wait for a rebalance before deciding the member survived
    clock: Callable[[], float] = time.monotonic
    last_tick: float | None = None
    fenced_at: float | None = None
    generation: int | None = None  # the generation that was current when the gap was seen
    gaps: list[float] = field(default_factory=list)
    reported: int = 0  # gaps already handed out by `unreported`

    def unreported(self) -> list[float]:
        """Gaps noticed since the last call, whoever noticed them (a tick, or a batch's
        `check` that ran first after the stall): each is counted and logged once."""
        new, self.reported = self.gaps[self.reported:], len(self.gaps)
        return new

    def tick(self, generation: int | None) -> None:
        """Called every fraction of a second from the event loop."""
        now = self.clock()
        self._notice(now, generation)
        self.last_tick = now

    def check(self, generation: int | None) -> None:
        """Before a batch's writes: raise Fenced while this worker may not own its partitions."""
        self._notice(self.clock(), generation)
        if self.fenced(generation):
            raise Fenced(f"the event loop stalled {self.gaps[-1]:.1f}s (> session timeout {self.limit_s:.0f}s): "
                         "partitions may be owned elsewhere")

    def fenced(self, generation: int | None) -> bool:
        if self.fenced_at is None:
            return False
        if generation != self.generation or self.clock() - self.fenced_at >= self.settle_s:
            self.fenced_at = self.generation = None  # rebalanced (fresh start), or the member survived
            return False
        return True

    def _notice(self, now: float, generation: int | None) -> None:
        if self.last_tick is not None and now - self.last_tick > self.limit_s:
            self.gaps.append(now - self.last_tick)
            self.fenced_at, self.generation = now, generation
            self.last_tick = now  # one gap is noticed once, by whichever runs first after it
