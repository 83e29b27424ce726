"""The C allocator the worker runs on, chosen before it starts: jemalloc where installed.

Under glibc's malloc a worker's RSS kept growing at a steady rate while everything it held
stayed flat: in a 35-minute soak at 2,000 events/s, 80% of the growth was memory glibc had
freed but kept. The worker frees hundreds of 64 KiB-64 MiB tensors a second, of varying
sizes, between longer-lived RocksDB blocks; glibc serves them from its heaps once its
dynamic mmap threshold has risen, and the holes they leave stay resident. Fixing the mmap
threshold stops that but made batched inference 3-5x slower per event (every large
tensor then costs fresh page faults). jemalloc keeps size classes apart and returns
unused pages to the OS after a decay time: the fix Cloudflare (Quicksilver, with tcmalloc)
and LinkedIn (Venice) report for the same RocksDB fragmentation.

An allocator has to be in place before the process's first malloc, so `ensure` re-executes
the worker once with jemalloc preloaded (`LD_PRELOAD`). The process keeps its PID, so
supervisors and the test harness see one process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from pathlib import Path

from stream_app.errors import UserError

log = logging.getLogger(__name__)

JEMALLOC_CONF = "background_thread:true"  # purge freed pages on a timer, not only when the worker allocates
_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
               "/usr/lib64/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
_REEXEC_MARK = "STREAMREC_ALLOCATOR_REEXEC"  # set across the exec: never exec twice, even if the preload failed


def find_jemalloc() -> str | None:
    """Path (or soname, which LD_PRELOAD also takes) of an installed libjemalloc on Linux
    (Debian/Ubuntu: `apt-get install libjemalloc2`)."""
    for path in _CANDIDATES:
        if Path(path).exists():
            return path
    return ctypes.util.find_library("jemalloc") if sys.platform.startswith("linux") else None


@functools.cache
def mallctl():
    """jemalloc's control function where jemalloc is this process's allocator, else None.

    Looked up once: a process's allocator cannot change after it starts (a re-exec is a
    new process), and the heap gauge asks every few seconds."""
    try:
        control = ctypes.CDLL(None).mallctl
    except AttributeError:
        return None
    control.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                        ctypes.c_size_t]
    return control


def active() -> str:
    """'jemalloc' when it is in the process (preloaded or linked), else 'glibc'."""
    return "glibc" if mallctl() is None else "jemalloc"


def of_process(pid: int) -> str:
    """The allocator another process (a worker) runs on, from its memory map (Linux)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def ensure(choice: str) -> str:
    """Make the process run on the allocator `choice` asks for; returns the one it runs on.

    'glibc' and an already-preloaded jemalloc return at once; otherwise this re-executes the
    interpreter with the same arguments and jemalloc preloaded, and does not return. 'auto'
    falls back to glibc (with a warning) where jemalloc is not installed; 'jemalloc' refuses
    to start without it."""
    current, reexecuted = active(), os.environ.pop(_REEXEC_MARK, None)
    if choice == "glibc" or current == "jemalloc":
        return current
    path = find_jemalloc()
    if path is None or reexecuted:
        if choice == "jemalloc":
            raise UserError("allocator=jemalloc but libjemalloc.so.2 is not installed (or did not load); "
                            "run `apt-get install libjemalloc2` or set STREAMREC_ALLOCATOR=glibc")
        log.warning("jemalloc not installed (apt-get install libjemalloc2): running on glibc malloc, "
                    "whose RSS grows with fragmentation over long runs")
        return current
    preload = [path, *[p for p in os.environ.get("LD_PRELOAD", "").split() if p != path]]
    env = {**os.environ, _REEXEC_MARK: "1", "LD_PRELOAD": " ".join(preload),
           "MALLOC_CONF": os.environ.get("MALLOC_CONF", JEMALLOC_CONF)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
    raise AssertionError("unreachable")  # pragma: no cover
