"""The worker entry point, in process: a configured but unreachable cluster is a bounded
one-line UserError (the CLI prints it), never a hang or a traceback."""
from __future__ import annotations

import time

import pytest

from stream_app.config import Settings
from stream_app.errors import UserError
from stream_app.runtime.worker import run_worker


def test_unreachable_cluster_fails_within_the_connect_timeout():
    settings = Settings(bootstrap_servers="127.0.0.1:1", broker_connect_timeout_s=1, allocator="glibc")
    start = time.monotonic()
    with pytest.raises(UserError, match="cannot reach Kafka at 127.0.0.1:1"):
        run_worker(settings)
    assert time.monotonic() - start < 30
