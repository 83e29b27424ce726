"""Shared fixtures for integration tests: one real embedded broker per session, and
workers as real subprocesses, each with its own consumer group, topics and state dir."""
from __future__ import annotations

import itertools

import pytest

from stream_app.transport.broker import EmbeddedBroker
from stream_app.config import Settings
from stream_app.testing.harness import WorkerProcess, isolated_settings

_ids = itertools.count()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """(events, catalog rows, checkpoint dir) of a small synthetic world and a tiny model."""
    from stream_app.testing.synth import generate
    from tests.helpers import train_tiny

    # 5,100 events: ~2% are dismisses; the others reach 101 of the 120 users
    events, catalog = generate(users=120, items=200, events=5100, seed=21)
    ckpt = train_tiny(tmp_path_factory.mktemp("ckpt") / "v1", events, catalog)
    return events, catalog, ckpt


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def make_settings(broker, tmp_path):
    """Settings for an isolated pipeline on the shared broker (unique app id and topics)."""
    def make(**overrides) -> Settings:
        return isolated_settings(broker.bootstrap, f"t{next(_ids)}", tmp_path,
                                 **{"partitions": 2, "batch_wait_ms": 20, **overrides})
    return make


@pytest.fixture
def start_worker(tmp_path):
    workers: list[WorkerProcess] = []

    def start(settings: Settings, name: str = "worker") -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"{name}.log").start()
        workers.append(w)
        return w.wait_ready()

    yield start
    for w in workers:
        w.stop()
