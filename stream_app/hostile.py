"""Malformed messages, each paired with the DLQ reason the worker must give it.

Shared by the demo (a trickle of bad input), the integration tests and the hostile
benchmark, so all three agree on what "bad" means and can check reasons exactly."""
from __future__ import annotations

import json
import pickle
import random
from typing import Callable

Maker = Callable[[random.Random, int], bytes]


def _valid(rng: random.Random, n: int) -> dict:
    return {"event_id": f"bad-{n}", "user_id": f"u{rng.randrange(1000)}", "type": "view",
            "item_id": f"i{rng.randrange(1000)}", "ts": 1_767_225_600 + n}


def _with(**changes) -> Maker:
    def make(rng: random.Random, n: int) -> bytes:
        obj = _valid(rng, n)
        for key, value in changes.items():
            if value is _DROP:
                obj.pop(key, None)
            else:
                obj[key] = value(rng) if callable(value) else value
        return json.dumps(obj).encode()
    return make


_DROP = object()

# (maker, reason) — one entry per kind of damage
CASES: list[tuple[Maker, str]] = [
    (lambda rng, n: bytes([0x80, 0xFF]) + rng.randbytes(rng.randrange(1, 64)), "pickle"),
    (lambda rng, n: b"\xc3\x28" + rng.randbytes(rng.randrange(0, 32)).replace(b"\x80", b""), "invalid_utf8"),
    (lambda rng, n: b'{"event_id": "x", "user_id": ', "invalid_json"),
    (lambda rng, n: b"[" * 5000 + b"]" * 5000, "invalid_json"),
    (lambda rng, n: json.dumps([_valid(rng, n)]).encode(), "not_object"),
    (lambda rng, n: json.dumps(_valid(rng, n)).replace(str(1_767_225_600 + n), "NaN").encode(), "invalid_json"),
    (lambda rng, n: pickle.dumps(_valid(rng, n), protocol=4), "pickle"),
    (lambda rng, n: json.dumps({**_valid(rng, n), "pad": "x" * 17_000}).encode(), "too_large"),
    (_with(user_id=_DROP), "missing_field"),
    (_with(event_id=_DROP), "missing_field"),
    (_with(ts=_DROP), "missing_field"),
    (_with(item_id=_DROP), "missing_field"),
    (_with(type="search", query=_DROP), "missing_field"),
    (_with(user_id=12345), "wrong_type"),
    (_with(item_id=["i1"]), "wrong_type"),
    (_with(user_id="   "), "empty_field"),
    (_with(event_id="e" * 65), "field_too_long"),
    (_with(item_id="i" * 129), "field_too_long"),
    (_with(type="teleport"), "unknown_type"),
    (_with(type=None), "missing_field"),
    (_with(ts=1_767_225_600_000), "invalid_timestamp"),
    (_with(ts=-5), "invalid_timestamp"),
    (_with(ts="yesterday"), "invalid_timestamp"),
    (_with(ts=True), "invalid_timestamp"),
]


def malformed(rng: random.Random, n: int) -> tuple[bytes, str]:
    """The n-th bad message of a run: (payload, expected DLQ reason)."""
    make, reason = CASES[rng.randrange(len(CASES))]
    return make(rng, n), reason
