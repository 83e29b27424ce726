"""What the fault matrix's rows share (stream_app/bench/faults.py): a row's result, the
context rows run in, sending events, judging a run against an offline replay, waiting."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stream_app.testing.consistency import check
from stream_app.testing.harness import WorkerProcess, isolated_settings


@dataclass
class Row:
    fault: str
    injected: str
    sent: int = 0
    lost: int = 0
    duplicated: int = 0
    differ: int = 0
    stale: int = 0
    good_dead_lettered: int = 0
    crashes: int = 0
    recover_s: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)  # row-specific targets, by name
    fenced_batches: int = 0  # batches a stalled worker did not write (paused_worker)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.differ or self.stale or self.good_dead_lettered
                    or self.crashes) and all(self.checks.values()) and (self.recover_s or 0) <= 30


@dataclass
class Ctx:
    bootstrap: str
    workdir: Path
    events: int
    say: Callable[[str], None]

    def settings(self, name: str, **overrides):
        return isolated_settings(self.bootstrap, f"faults-{name}", self.workdir,
                                 **{"partitions": 2, "batch_wait_ms": 20, **overrides})

    def worker(self, settings, name: str, env: dict | None = None) -> WorkerProcess:
        return WorkerProcess(settings, self.workdir / f"{name}.log", env).start().wait_ready(120)


def send(settings, messages, rate: float | None = None) -> int:
    from stream_app.clients.produce import EventProducer
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic, {"max_request_size": 4 << 20})
    sent = producer.paced(messages, rate)
    producer.close()
    producer.check()
    return sent


def as_messages(events: list[dict]):
    return ((json.dumps(e).encode(), e["user_id"].encode()) for e in events)


def judged(row: Row, settings, events: list[dict], fault_end: float, worker: WorkerProcess) -> Row:
    """Fill in the replay verdict, crashes and recovery time of a row whose fault has ended."""
    verdict = check(settings, events, timeout=120)
    row.sent += len(events)
    row.lost, row.duplicated, row.differ, row.stale = verdict.lost, verdict.duplicated, verdict.differ, verdict.stale
    row.crashes += int(not worker.alive())
    if worker.alive():
        worker.wait_ready(60)
        row.good_dead_lettered += int(worker.metrics().get('streamrec_invalid_events_total{reason="processing_error"}', 0))
    row.recover_s = round(time.monotonic() - fault_end, 1)
    return row


def wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False
