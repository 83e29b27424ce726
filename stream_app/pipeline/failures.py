"""What a batch that raises means, and what the worker does about it.

Faust acknowledges a batch whatever happens to it (`take_events` acks in a `finally`),
and an agent that raises is restarted in the same process, so before this policy a
batch that raised was committed with nothing written: lost. Now no exception leaves the
agent (docs/design.md, "Poison is isolated"):

- **Environment** (a full disk, an I/O error, out of memory on the host or the GPU): the
  batch is not at fault and no event of it may be dropped. Its partitions are rewound to
  the batch's first offsets, their commits are held there (the offset guard's hole), and
  it is read again after a backoff that doubles up to `MAX_BACKOFF_S`, for as long as
  the fault lasts. `/readyz` answers 503 meanwhile.
- **Data** (any other exception: a bug that one record triggers): the batch is retried
  one event at a time; an event that still raises alone goes to the dead-letter topic
  with reason `processing_error` and the exception's type, and the rest are processed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

MAX_BACKOFF_S = 30.0
FIRST_BACKOFF_S = 0.5
# RocksDB reports a failed write as an exception whose text starts like this (rocksdict
# raises a plain Exception carrying RocksDB's status string)
_ROCKSDB_ENVIRONMENT = ("IO error", "No space left", "Resource busy", "Corruption: ")


def is_environment(exc: BaseException) -> bool:
    """True for failures of the machine rather than of the data: retrying the same events
    later can succeed, and dead-lettering them would lose good data."""
    if isinstance(exc, (MemoryError, OSError)):
        return True
    name = type(exc).__name__
    if name in ("OutOfMemoryError", "AcceleratorError"):  # torch.cuda.OutOfMemoryError and device faults
        return True
    text = str(exc)
    return name in ("Exception", "RocksDBError", "DbClosedError") and text.startswith(_ROCKSDB_ENVIRONMENT)


def describe(exc: BaseException) -> str:
    """The dead-letter detail: the exception's type and the start of its message."""
    return f"{type(exc).__name__}: {exc}"[:200]


@dataclass
class Backoff:
    """Delay before re-reading a batch that failed for an environmental reason."""

    clock: Callable[[], float] = time.monotonic
    delay: float = 0.0
    failing_since: float | None = None
    failures: int = 0
    last_error: str = ""

    def failed(self, exc: BaseException) -> float:
        """Record one failure; returns how long to wait before the re-read."""
        self.failures += 1
        self.last_error = describe(exc)
        if self.failing_since is None:
            self.failing_since = self.clock()
        self.delay = min(MAX_BACKOFF_S, self.delay * 2 if self.delay else FIRST_BACKOFF_S)
        return self.delay

    def succeeded(self) -> None:
        self.delay, self.failing_since = 0.0, None

    @property
    def failing(self) -> bool:
        return self.failing_since is not None


@dataclass
class Rewind:
    """Per partition, the batch's first offset (where to re-read from) and its last one."""

    spans: dict[int, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, offsets: list[tuple[int, int]]) -> "Rewind":
        """`offsets`: (partition, offset) of every event of the batch, in delivery order."""
        spans: dict[int, tuple[int, int]] = {}
        for partition, offset in offsets:
            first, last = spans.get(partition, (offset, offset))
            spans[partition] = (min(first, offset), max(last, offset))
        return cls(spans)
