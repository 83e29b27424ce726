"""The worker's allocator choice (stream_app/runtime/allocator.py): a real re-exec onto the real
jemalloc where it is installed, and the fallbacks where it is not."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from pydantic import ValidationError

from stream_app.runtime import allocator
from stream_app.config import Settings
from stream_app.errors import UserError

needs_jemalloc = pytest.mark.skipif(allocator.find_jemalloc() is None or not sys.platform.startswith("linux"),
                                    reason="jemalloc not installed (apt-get install libjemalloc2)")

_PROBE = """
import os, sys
from stream_app.runtime import allocator
from stream_app.runtime import memory
print(allocator.ensure(sys.argv[1]), os.environ.get("STREAMREC_ALLOCATOR_REEXEC"), flush=True)
before = memory.malloc_heap()["in_use"]
blocks = [bytearray(50_000) for _ in range(2_000)]  # ~100 MB
print(memory.malloc_heap()["in_use"] - before > 50 * 2**20)
"""


def _probe(choice: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin"}  # no LD_PRELOAD or MALLOC_CONF from the calling shell
    out = subprocess.run([sys.executable, "-c", _PROBE, choice], capture_output=True, text=True, check=True, env=env)
    return out.stdout.split()


@needs_jemalloc
def test_auto_reexecutes_onto_jemalloc_once_and_reads_its_heap_stats():
    """The process comes back on jemalloc (same arguments), the re-exec mark is gone so a
    child would decide for itself, and the heap gauge reads jemalloc's own statistics."""
    assert _probe("auto") == ["jemalloc", "None", "True"]


def test_glibc_is_kept_when_asked_for():
    assert _probe("glibc") == ["glibc", "None", "True"]


def test_without_jemalloc_auto_warns_and_jemalloc_refuses(monkeypatch, caplog):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    monkeypatch.setattr(allocator, "active", lambda: "glibc")
    with caplog.at_level(logging.WARNING, logger="stream_app.runtime.allocator"):
        assert allocator.ensure("auto") == "glibc"
    assert "apt-get install libjemalloc2" in caplog.text
    with pytest.raises(UserError, match="STREAMREC_ALLOCATOR=glibc"):
        allocator.ensure("jemalloc")


def test_a_failed_preload_does_not_loop(monkeypatch):
    """After the re-exec, a jemalloc that did not load is reported, not exec'd again."""
    monkeypatch.setattr(allocator, "active", lambda: "glibc")
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/nonexistent/libjemalloc.so.2")
    monkeypatch.setenv("STREAMREC_ALLOCATOR_REEXEC", "1")
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("exec'd twice"))
    assert allocator.ensure("auto") == "glibc"


def test_allocator_setting_is_validated(monkeypatch):
    monkeypatch.delenv("STREAMREC_ALLOCATOR", raising=False)
    assert Settings().allocator == "auto"
    with pytest.raises(ValidationError):
        Settings(allocator="tcmalloc")
