"""The input event contract (docs/contracts.md) and its validation.

Validation is hand-written rather than pydantic because it runs once per message on the
hot path and must map every failure to a small, closed set of reasons: the reason is a
Prometheus label and a DLQ header, so its cardinality must stay bounded.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

# Behaviour types, one list with the model's (model/event_types.py): a dismiss, like a
# click, names its item (required), the item the user said no to.
from model.event_types import EVENT_TYPES
# Control events: not behaviour, never stored. "forget" erases a user (right to be forgotten);
# with "if_count" only if the user has exactly that many events (the TTL sweep's expiry).
CONTROL_TYPES = ("forget",)

# Closed set of DLQ reasons (metric label values).
REASONS = (
    "too_large",
    "pickle",
    "invalid_utf8",
    "invalid_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "empty_field",
    "field_too_long",
    "unknown_type",
    "invalid_timestamp",
    "processing_error",  # valid, but processing it raised even alone (stream_app/pipeline/failures.py)
)

MAX_LEN = {"event_id": 64, "user_id": 128, "item_id": 128, "query": 512, "session_id": 128}
# Plausible business time: 2000-01-01 .. 2100-01-01 (catches ms-instead-of-s and garbage).
TS_MIN, TS_MAX = 946_684_800.0, 4_102_444_800.0


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    user_id: str
    type: str
    ts: float
    item_id: str | None = None
    query: str | None = None
    session_id: str | None = None
    if_count: int | None = None  # forget only: erase only if the user has exactly this many events (TTL)


class InvalidEvent(Exception):
    """Raised with a reason from REASONS and a human-readable detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        # the detail becomes a DLQ header (UTF-8): never let a lone surrogate through
        detail = detail[:200].encode("utf-8", "backslashreplace").decode()
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _reject_constant(name: str) -> Any:
    raise InvalidEvent("invalid_json", f"non-finite number {name}")


def _decode(raw: bytes, max_bytes: int) -> dict:
    if len(raw) > max_bytes:
        raise InvalidEvent("too_large", f"{len(raw)} bytes > {max_bytes}")
    if raw[:1] == b"\x80":  # pickle protocol >= 2 opcode PROTO: never unpickled
        raise InvalidEvent("pickle", "pickled payloads are not accepted; send JSON")
    try:  # fast path: what orjson accepts, the stdlib reads the same way (~1 us vs ~7 us)
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:  # the stdlib path below names the reason (or accepts:
        pass  # lone-surrogate escapes and 100-digit integers are JSON that orjson refuses)
    else:
        if not isinstance(obj, dict):
            raise InvalidEvent("not_object", f"top-level JSON is {type(obj).__name__}")
        return obj
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("invalid_utf8", str(exc)) from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except InvalidEvent:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent("invalid_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"top-level JSON is {type(obj).__name__}")
    return obj


def _string(obj: dict, field: str, required: bool) -> str | None:
    value = obj.get(field)
    if value is None:
        if required:
            raise InvalidEvent("missing_field", field)
        return None
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    if not value.isascii():
        try:  # JSON may escape a lone surrogate ("\\ud800"): valid JSON, but no UTF-8 can
            value.encode()  # carry it, so it would crash the first key, header or changelog write
        except UnicodeEncodeError:
            raise InvalidEvent("invalid_utf8", f"{field} holds a lone surrogate escape") from None
    value = value.strip()
    if not value:
        raise InvalidEvent("empty_field", field)
    if len(value) > MAX_LEN[field]:
        raise InvalidEvent("field_too_long", f"{field} longer than {MAX_LEN[field]}")
    return value


def parse_ts(value: Any) -> float:
    """Epoch seconds (int/float) or an ISO-8601 string; naive ISO times are taken as UTC."""
    if isinstance(value, bool) or value is None:
        raise InvalidEvent("invalid_timestamp", f"ts must be epoch seconds or ISO-8601, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            ts = float(value)
        except OverflowError:  # a JSON integer of hundreds of digits: valid JSON, no float holds it
            raise InvalidEvent("invalid_timestamp", f"ts integer of {value.bit_length()} bits") from None
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            ts = dt.timestamp()
        except (ValueError, OverflowError):
            raise InvalidEvent("invalid_timestamp", f"unparseable ts {value[:40]!r}") from None
    else:
        raise InvalidEvent("invalid_timestamp", f"ts has type {type(value).__name__}")
    if not math.isfinite(ts) or not TS_MIN <= ts <= TS_MAX:
        raise InvalidEvent("invalid_timestamp", f"ts {ts!r} outside 2000..2100 (milliseconds?)")
    return ts


def validate(obj: dict) -> Event:
    """Check a decoded JSON object against the contract; unknown fields are ignored."""
    event_id = _string(obj, "event_id", True)
    user_id = _string(obj, "user_id", True)
    etype = obj.get("type")
    if etype is None:
        raise InvalidEvent("missing_field", "type")
    if etype not in EVENT_TYPES and etype not in CONTROL_TYPES:
        shown = repr(etype[:40]) if isinstance(etype, str) else type(etype).__name__  # never repr a deep structure
        raise InvalidEvent("unknown_type", f"type {shown} not in {EVENT_TYPES + CONTROL_TYPES}")
    if "ts" not in obj:
        raise InvalidEvent("missing_field", "ts")
    ts = parse_ts(obj["ts"])
    is_search = etype == "search"
    item_id = _string(obj, "item_id", etype in EVENT_TYPES and not is_search)
    query = _string(obj, "query", is_search)
    session_id = _string(obj, "session_id", False)
    if etype in CONTROL_TYPES:
        if_count = obj.get("if_count")
        if if_count is not None and (isinstance(if_count, bool) or not isinstance(if_count, int) or if_count < 0):
            raise InvalidEvent("wrong_type", "if_count must be a non-negative integer")
        return Event(event_id, user_id, etype, ts, session_id=session_id, if_count=if_count)
    return Event(event_id, user_id, etype, ts, item_id if not is_search else None, query, session_id)


def decode_event(raw: bytes | None, max_bytes: int = 16_384) -> Event:
    """Bytes off the wire -> a valid Event, or InvalidEvent(reason). Never anything else."""
    if raw is None:
        raise InvalidEvent("missing_field", "message has no value")
    return validate(_decode(raw, max_bytes))


def encode_event(event: dict) -> bytes:
    """Producer-side serialisation (compact JSON, UTF-8)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
