"""Event contract: what is accepted, and the exact DLQ reason for everything else."""
import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from stream_app.pipeline.events import (
    CONTROL_TYPES, EVENT_TYPES, MAX_LEN, REASONS, TS_MAX, TS_MIN, Event, InvalidEvent, decode_event, encode_event,
    parse_ts,
)
from model import event_types, features
from stream_app.testing.hostile import CASES, malformed

GOOD = {"event_id": "e1", "user_id": "u1", "type": "click", "item_id": "i9", "ts": 1767225600}


def raw(obj) -> bytes:
    return json.dumps(obj).encode()


def test_valid_item_event_and_unknown_fields_ignored():
    ev = decode_event(raw({**GOOD, "extra": {"nested": [1, 2]}, "session_id": "s1"}))
    assert ev == Event("e1", "u1", "click", 1767225600.0, "i9", None, "s1")


def test_search_needs_query_not_item():
    ev = decode_event(raw({"event_id": "e2", "user_id": "u1", "type": "search", "query": "red shoes",
                           "ts": "2026-01-01T00:00:00Z"}))
    assert ev.item_id is None and ev.query == "red shoes" and ev.ts == 1767225600.0


def test_dismiss_names_its_item_and_keeps_the_type_codes():
    ev = decode_event(raw({**GOOD, "type": "dismiss"}))
    assert ev == Event("e1", "u1", "dismiss", 1767225600.0, "i9")
    for missing in ({k: v for k, v in GOOD.items() if k != "item_id"}, {**GOOD, "item_id": None}):
        with pytest.raises(InvalidEvent) as info:
            decode_event(raw({**missing, "type": "dismiss"}))
        assert (info.value.reason, info.value.detail) == ("missing_field", "item_id")
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw({**GOOD, "type": "dismiss", "item_id": " "}))
    assert info.value.reason == "empty_field"
    # one list for validation and the model, `dismiss` appended: the stored type codes and
    # the type-embedding rows of the older types hold
    assert EVENT_TYPES is event_types.EVENT_TYPES is features.EVENT_TYPES
    assert EVENT_TYPES[: event_types.FIRST_TYPES] == ("view", "click", "add_to_cart", "purchase", "search")
    assert EVENT_TYPES[event_types.FIRST_TYPES:] == ("dismiss",)
    assert [t for t in EVENT_TYPES if event_types.positive("i9", t)] == ["view", "click", "add_to_cart", "purchase"]


@pytest.mark.parametrize("value,expected", [
    (1767225600, 1767225600.0), (1767225600.5, 1767225600.5),
    ("2026-01-01T00:00:00+00:00", 1767225600.0), ("2026-01-01T01:00:00+01:00", 1767225600.0),
    ("2026-01-01 00:00:00", 1767225600.0),
])
def test_timestamps(value, expected):
    assert parse_ts(value) == expected


@pytest.mark.parametrize("index", range(len(CASES)))
def test_every_hostile_case_gets_its_reason(index):
    make, reason = CASES[index]
    with pytest.raises(InvalidEvent) as info:
        decode_event(make(random.Random(index), index))
    assert info.value.reason == reason


def test_none_value_is_rejected():
    with pytest.raises(InvalidEvent) as info:
        decode_event(None)
    assert info.value.reason == "missing_field"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_other_exceptions(data):
    try:
        decode_event(data)
    except InvalidEvent as exc:
        assert exc.reason in REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={k: json_values for k in GOOD}))
def test_arbitrary_objects_validate_or_get_a_reason(obj):
    try:
        ev = decode_event(raw(obj))
    except InvalidEvent as exc:
        assert exc.reason in REASONS
    else:
        assert isinstance(ev.user_id, str) and ev.user_id


# --- fuzzing: whatever arrives, the answer is a safe Event or an InvalidEvent with a known reason

def decode_or_reason(data: bytes) -> Event | None:
    """decode_event's result, checked to be safe to store and re-send; None if rejected."""
    try:
        ev = decode_event(data)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        exc.detail.encode()  # becomes a DLQ header
        return None
    # an accepted event must survive every later write: key, table, changelog, output
    for name in ("event_id", "user_id", "item_id", "query", "session_id"):
        value = getattr(ev, name)
        if value is not None:
            assert value and value == value.strip() and len(value) <= MAX_LEN[name], name
            value.encode()  # no lone surrogates
    assert TS_MIN <= ev.ts <= TS_MAX and ev.type in EVENT_TYPES + CONTROL_TYPES
    assert ev.type != "search" or ev.query is not None
    assert (ev.item_id is not None) == (ev.type in EVENT_TYPES and ev.type != "search")
    encode_event({"user_id": ev.user_id, "item_id": ev.item_id, "query": ev.query})
    return ev


@st.composite
def mutated(draw, base: bytes = encode_event({**GOOD, "session_id": "s1"})) -> bytes:
    """A valid event's bytes after a few byte flips, truncations, insertions and deletions."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b"\\ud800", b"\xc3", b"\x00", b"[", b"{", b'"', b"Infinity", b"NaN", b"1e999", b"9" * 400]))
        else:
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_mutated_events_validate_or_get_a_reason(data):
    decode_or_reason(data)


JSON_TOKENS = list('{}[]:,"0123456789.eE+- \\') + [
    '"event_id"', '"user_id"', '"type"', '"item_id"', '"query"', '"ts"', '"session_id"', '"view"', '"search"',
    '"forget"', "true", "false", "null", "NaN", "Infinity", "-Infinity", "1e999", "9" * 400, '"\\ud800"',
    '"\\udfff x"', '"2026-01-01T00:00:00Z"', "1767225600", '"u1"', '"i1"', "\x00", "\u00e9", "\ud83d\ude00",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(JSON_TOKENS), max_size=60).map("".join))
def test_json_ish_text_validates_or_gets_a_reason(text):
    decode_or_reason(text.encode("utf-8", "surrogatepass"))


any_text = st.text(st.characters(exclude_categories=()), max_size=140)  # lone surrogates included
near_valid = {
    "event_id": st.text(max_size=70) | any_text | json_values,
    "user_id": st.text(max_size=130) | any_text | json_values,
    "type": st.sampled_from(EVENT_TYPES + CONTROL_TYPES + ("View", "")) | json_values,
    "item_id": st.text(max_size=130) | any_text | json_values,
    "query": st.text(max_size=520) | any_text | json_values,
    "session_id": st.text(max_size=130) | any_text,
    "ts": (st.integers(-10**400, 10**400) | st.floats() | st.integers(int(TS_MIN) - 10, int(TS_MAX) + 10)
           | st.datetimes().map(lambda d: d.isoformat()) | any_text),
}


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional=near_valid))
def test_near_valid_objects_are_safe_or_get_a_reason(obj):
    """Fields of roughly the right type and size, so many events pass validation."""
    text = json.dumps(obj)  # NaN/Infinity become bare constants, lone surrogates \\uXXXX escapes
    decode_or_reason(text.encode())


def test_malformed_is_deterministic_per_seed():
    a = [malformed(random.Random(7), n) for n in range(20)]
    b = [malformed(random.Random(7), n) for n in range(20)]
    assert a == b
