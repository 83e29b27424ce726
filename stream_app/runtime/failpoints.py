"""Named places where the worker fails on purpose, for `streamrec bench faults` and the
fault tests: the fault they inject goes through the same code a real one would.

Off unless `STREAMREC_FAILPOINTS` is set, e.g. `batch=raise@20` (every 20th batch raises
a plain error, as a bug or a poison record would) or `batch=enospc@20` (every 20th batch
raises ENOSPC, as a full disk would) or `publish_renamed=kill@1` (the learner SIGKILLs itself
right after its first publish's rename). Several are separated by commas. A failpoint that
is not set costs one dictionary lookup.
"""
from __future__ import annotations

import errno
import os

from stream_app.errors import UserError

ACTIONS = ("raise", "enospc", "kill")


class InjectedFault(RuntimeError):
    """The error `raise` injects: a data-class failure (docs/design.md, "Poison is isolated")."""


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """`name=action@every,...` -> {name: (action, every)}; a malformed entry is a one-line error."""
    points: dict[str, tuple[str, int]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        try:
            name, rest = entry.split("=", 1)
            action, every = rest.split("@", 1)
            points[name.strip()] = (action.strip(), int(every))
        except ValueError:
            raise ValueError(f"STREAMREC_FAILPOINTS entry {entry!r}: write name=action@N, e.g. batch=raise@20")
        if action.strip() not in ACTIONS or int(every) < 1:
            raise ValueError(f"STREAMREC_FAILPOINTS entry {entry!r}: action is one of {', '.join(ACTIONS)}, N >= 1")
    return points


_POINTS: dict[str, tuple[str, int]] | None = None
_HITS: dict[str, int] = {}


def points() -> dict[str, tuple[str, int]]:
    """The failpoints set in the environment, read once (the worker calls this at start, so
    a typo is a one-line error there and not a traceback mid-stream)."""
    global _POINTS
    if _POINTS is None:
        try:
            _POINTS = parse(os.environ.get("STREAMREC_FAILPOINTS", ""))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return _POINTS


def hit(name: str) -> None:
    """Pass through the failpoint `name`: raises on every Nth pass if it is set."""
    point = points().get(name)
    if point is None:
        return
    _HITS[name] = count = _HITS.get(name, 0) + 1
    action, every = point
    if count % every:
        return
    if action == "kill":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"failpoint {name}: no space left on device (injected)")
    raise InjectedFault(f"failpoint {name}: injected failure #{count // every}")
