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


def _spliced(field: str, text: Callable[[random.Random], str]) -> Maker:
    """A valid event whose `field` is raw JSON text that json.dumps would refuse to write
    (Infinity, 5,000-digit integers, nesting deeper than the encoder recurses)."""
    def make(rng: random.Random, n: int) -> bytes:
        obj = {**_valid(rng, n), field: None}
        return json.dumps(obj).replace(f'"{field}": null', f'"{field}": {text(rng)}', 1).encode()
    return make


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth

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
    (_with(type="dismiss", item_id=_DROP), "missing_field"),  # a dismiss names what the user said no to
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
    # random bytes: a leading 0xFF is never valid UTF-8 (and is not pickle's 0x80), so the
    # reason is fixed; random ASCII after "~" is valid UTF-8 but can never start JSON
    (lambda rng, n: b"\xff" + rng.randbytes(rng.randrange(0, 512)), "invalid_utf8"),
    (lambda rng, n: b"~" + bytes(rng.randrange(32, 127) for _ in range(rng.randrange(0, 256))), "invalid_json"),
    (lambda rng, n: json.dumps(_valid(rng, n)).encode("utf-16"), "invalid_utf8"),
    (lambda rng, n: b"", "invalid_json"),
    (lambda rng, n: b"\xef\xbb\xbf" + json.dumps(_valid(rng, n)).encode(), "invalid_json"),  # BOM
    (lambda rng, n: json.dumps(_valid(rng, n)).replace('"view"', '"vi\new"').encode(), "invalid_json"),  # raw newline
    (_with(user_id="u\ud800"), "invalid_utf8"),  # lone surrogate escape: valid JSON, not UTF-8-encodable
    # non-finite and unrepresentable numbers
    (_spliced("ts", lambda rng: "Infinity"), "invalid_json"),
    (_spliced("ts", lambda rng: "-Infinity"), "invalid_json"),
    (_spliced("ts", lambda rng: "1e999"), "invalid_timestamp"),  # parses as float inf
    (_spliced("ts", lambda rng: "9" * rng.randrange(310, 4000)), "invalid_timestamp"),  # no float holds it
    (_spliced("x", lambda rng: "9" * 4400), "invalid_json"),  # past Python's int digit limit
    # deep nesting inside an otherwise valid object (recursion limit), and huge JSON
    (_spliced("x", lambda rng: _nested(rng.randrange(5_000, 8_000))), "invalid_json"),
    (_spliced("item_id", lambda rng: _nested(200)), "wrong_type"),
    (_spliced("type", lambda rng: f'{{"k": {_nested(200)}}}'), "unknown_type"),
    (lambda rng, n: json.dumps([_valid(rng, n)] * rng.randrange(700, 1000)).encode(), "too_large"),  # 70-100 KB
    # oversized fields (each under the message cap)
    (_with(user_id="u" * 129), "field_too_long"),
    (_with(type="search", query=lambda rng: "q" * rng.randrange(513, 15_000)), "field_too_long"),
    (_with(session_id="s" * 129), "field_too_long"),
    # absurd timestamps
    (_with(ts=32_503_680_000), "invalid_timestamp"),  # year 3000
    (_with(ts="1900-01-01T00:00:00Z"), "invalid_timestamp"),
    (_with(ts="+99999-01-01"), "invalid_timestamp"),
    (_with(ts=[1_767_225_600]), "invalid_timestamp"),
    (_with(ts=None), "invalid_timestamp"),
    # wrong types and missing keys
    (_with(event_id=lambda rng: {"id": rng.randrange(100)}), "wrong_type"),
    (_with(type="search", query=7), "wrong_type"),
    (_with(session_id=False), "wrong_type"),
    (_with(type=3), "unknown_type"),
    (_with(type=_DROP), "missing_field"),
    (_with(user_id=None), "missing_field"),
    (lambda rng, n: b"null", "not_object"),
    (lambda rng, n: json.dumps(f"bad-{n}").encode(), "not_object"),
]


def malformed(rng: random.Random, n: int) -> tuple[bytes, str]:
    """The n-th bad message of a run: (payload, expected DLQ reason)."""
    make, reason = CASES[rng.randrange(len(CASES))]
    return make(rng, n), reason
