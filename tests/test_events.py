"""Event contract: what is accepted, and the exact DLQ reason for everything else."""
import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from stream_app.events import REASONS, Event, InvalidEvent, decode_event, parse_ts
from stream_app.hostile import CASES, malformed

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


def test_malformed_is_deterministic_per_seed():
    a = [malformed(random.Random(7), n) for n in range(20)]
    b = [malformed(random.Random(7), n) for n in range(20)]
    assert a == b
