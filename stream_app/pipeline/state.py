"""Per-user state: the raw behaviour history and recent event ids (docs/design.md,
"History is state, caches are derived").

The value is rewritten to the changelog on every change, so it is kept compact: events
are short lists, not dicts, and event ids are stored as 8-byte hashes. Item ids stay
strings rather than model vocabulary indices because the vocabulary belongs to a model
version, and a model swap must never invalidate state.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import orjson

from model.event_types import POSITIVE
from model.seen import DISMISS_TTL_S, excluded
from stream_app.pipeline.events import EVENT_TYPES, Event

TYPE_CODE = {t: i for i, t in enumerate(EVENT_TYPES)}
POSITIVE_CODES = frozenset(TYPE_CODE[t] for t in POSITIVE)
FORMAT = 1


def event_key(event_id: str) -> str:
    """64-bit hash of an event id: collisions among a user's recent ids are ~2^-50."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).hexdigest()


@dataclass(slots=True)
class UserState:
    # each entry: (item_id or "", type code, ts (ms precision), query or ""); stored as a
    # JSON array. Tuples of strings and numbers drop out of Python's cyclic GC: as lists,
    # a worker's cached histories were ~1M tracked objects and full collections paused the
    # loop for 130-170 ms (docs/operations.md, "Where a worker's time goes")
    history: list[tuple] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # event_key()s, oldest first
    count: int = 0  # events ever accepted: the history position KV caches are tagged with
    # bookkeeping for the TTL sweep, not part of the behaviour (ignored by ==):
    touched: float = field(default=0.0, compare=False)  # Kafka record time of the last accepted event
    partition: int = field(default=-1, compare=False)  # input partition the user's events arrive on
    # the highest input offset on `partition` whose event this state reflects: a redelivery
    # at or below it is dropped however far back the crash rewound (docs/design.md,
    # "Idempotent replay"); the event-id window alone misses a hot user's redeliveries
    offset: int = field(default=-1, compare=False)

    @classmethod
    def from_json(cls, value: bytes | dict | None) -> "UserState":
        """Reads the stored value: JSON bytes (the table and changelog format) or its dict."""
        if not value:
            return cls()
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = orjson.loads(value)
        history = [tuple(e) for e in value.get("h", [])]
        touched = value.get("t") or (history[-1][2] if history else 0.0)  # older states: last event time
        return cls(history=history, seen=list(value.get("ids", [])), count=int(value.get("n", len(history))),
                   touched=float(touched), partition=int(value.get("p", -1)), offset=int(value.get("o", -1)))

    def to_json(self) -> dict:
        return {"v": FORMAT, "h": self.history, "ids": self.seen, "n": self.count, "t": round(self.touched, 1),
                "p": self.partition, "o": self.offset}

    def encode(self) -> bytes:
        """The stored value: compact JSON, encoded once for both RocksDB and the changelog
        (the table's value codec is raw bytes), never pickle (docs/design.md, "No unsafe
        deserialisation")."""
        return orjson.dumps(self.to_json())

    def apply(self, events: Iterable[Event], history_max: int, dedupe_window: int) -> tuple[list[Event], int]:
        """Append events not seen before; return (accepted, duplicates).

        Redelivery after a crash replays events whose effect may already be in the
        changelog; the event-id window makes that a no-op (docs/design.md, "Idempotent replay")."""
        accepted: list[Event] = []
        duplicates = 0
        seen = set(self.seen)
        for ev in events:
            key = event_key(ev.event_id)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            self.seen.append(key)
            self.history.append((ev.item_id or "", TYPE_CODE[ev.type], round(ev.ts, 3), ev.query or ""))
            self.count += 1
            accepted.append(ev)
        if len(self.history) > history_max:
            del self.history[: len(self.history) - history_max]
        if len(self.seen) > dedupe_window:
            del self.seen[: len(self.seen) - dedupe_window]
        return accepted, duplicates

    def items(self) -> list[str]:
        """Item ids of the events that took an item, oldest first: no search, no dismiss
        (model/event_types.py, POSITIVE), as model.features.item_ids reads a history."""
        return [e[0] for e in self.history if e[1] in POSITIVE_CODES]

    def seen_items(self, policy: str, window: int = 0, dismiss_ttl_s: float = DISMISS_TTL_S) -> set[str]:
        """Items never recommended back to this user: the seen-items policy and the user's
        dismissals (model/seen.py); the arguments are Settings.seen_policy."""
        return excluded(((e[0] or None, EVENT_TYPES[e[1]], e[2]) for e in self.history), policy, window,
                        dismiss_ttl_s)

    def raw_events(self, last: int | None = None) -> list:
        """History (or its `last` entries) as model.features.RawEvent, the model's input type.

        Built from the stored entries, never from the incoming events, so the streaming
        path and an offline replay of the table see identical inputs (rounded ts too)."""
        from model.features import RawEvent

        entries = self.history if last is None else self.history[max(0, len(self.history) - last):]
        return [RawEvent(e[0] or None, EVENT_TYPES[e[1]], float(e[2]), e[3] or None) for e in entries]


class StateCache:
    """Decoded states of recently active users, so a user's next batch skips the read and
    JSON decode (docs/design.md, "History is state, caches are derived").

    Write-through: the processor puts every state it writes, so an entry always equals
    the table's value. The worker clears it at every new consumer generation (a partition
    may have been owned and written elsewhere meanwhile) and when a batch fails between
    changing a state and writing it; forgets drop the entry.
    Bounded by an estimate of the decoded size: OVERHEAD x the encoded length."""

    OVERHEAD = 5  # decoded lists and strings vs. compact JSON bytes (pympler, 200-event histories)

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[str, tuple[UserState, int]] = OrderedDict()
        self.generation: int | None = None

    def get(self, user_id: str) -> UserState | None:
        entry = self.entries.get(user_id)
        if entry is None:
            return None
        self.entries.move_to_end(user_id)
        return entry[0]

    def put(self, user_id: str, state: UserState, encoded_len: int) -> None:
        size = encoded_len * self.OVERHEAD
        old = self.entries.pop(user_id, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return
        self.entries[user_id] = (state, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped

    def drop(self, user_id: str) -> None:
        old = self.entries.pop(user_id, None)
        if old is not None:
            self.bytes -= old[1]

    def on_generation(self, generation: int) -> None:
        """Forget everything when the consumer group generation changes."""
        if generation != self.generation:
            self.clear()
            self.generation = generation

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)


def expiry_event(user_id: str, state: UserState, now: float) -> dict:
    """The control event the TTL sweep sends for an idle user. It travels through the
    input topic, on the user's partition, so it is ordered with the user's own events
    and erases state, changelog, caches and latest recommendations the way a forget does;
    `if_count` makes it a no-op if the user was active in the meantime."""
    return {"type": "forget", "user_id": user_id, "event_id": f"ttl-{event_key(user_id)}-{state.count}",
            "ts": round(now, 3), "if_count": state.count}


SWEEP_SLACK_S = 3600.0
FUTURE_SKEW_S = 300.0


@dataclass
class StreamClock:
    """The newest record time this worker processed; a record stamped far in the future
    (a producer's broken clock) moves it at most FUTURE_SKEW_S past the worker's own clock."""

    newest: float | None = None

    def saw(self, record_time: float, wall: float) -> None:
        t = min(record_time, wall + FUTURE_SKEW_S)
        self.newest = t if self.newest is None else max(self.newest, t)


def sweep_clock(wall: float, stream_time: float | None) -> float | None:
    """The time the TTL sweep measures idleness against: the worker's clock, but never more
    than SWEEP_SLACK_S past the newest record time it has processed. Idleness is the
    difference of two record times (the producers' clocks), so a worker whose own clock
    jumps 100 days ahead expires nobody early (at most SWEEP_SLACK_S); one whose clock lags
    only expires late. None (no sweep) before this worker has processed a record."""
    if stream_time is None:
        return None
    return min(wall, stream_time + SWEEP_SLACK_S)


def idle_state(value: bytes | dict | None, cutoff: float) -> UserState | None:
    """The user's state if their last accepted event is older than `cutoff` (record time)."""
    if not value:
        return None
    state = UserState.from_json(value)
    return state if state.touched < cutoff else None
