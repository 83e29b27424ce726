"""One micro-batch, start to finish, with no Faust in sight (so it is unit-testable):
decode and validate, route bad messages, dedupe and append per user, refresh each
touched user's recommendations once, and say what the app must write and send.

Coalescing is the point: however many events a user has in a batch, the batch reads
and writes that user's state once (changelog volume is the measured bottleneck) and
publishes one recommendation reflecting the newest event.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from model.event_types import positive
from stream_app import metrics
from stream_app.config import Settings
from stream_app.pipeline.events import Event, InvalidEvent, decode_event
from model.rules import EMPTY, Rules
from stream_app.pipeline.latest import SCHEMA_VERSION, LatestStore
from stream_app.pipeline.trending import Trending
from stream_app.serving.recommender import Recommender, Refresh
from stream_app.pipeline.state import StateCache, UserState


@dataclass(frozen=True, slots=True)
class Message:
    """What the processor needs of a Kafka record."""
    key: bytes | None
    value: bytes | None
    timestamp: float  # record timestamp, epoch seconds
    partition: int = -1  # input partition (kept in state so the TTL sweep can address the user)
    offset: int = -1  # input offset (kept in state: redeliveries at or below it are dropped)
    rekeyed_from: float | None = None  # a re-published mis-keyed event: its original record time


@dataclass(frozen=True, slots=True)
class DeadLetter:
    index: int
    reason: str
    detail: str


@dataclass(slots=True)
class Outcome:
    dead: list[DeadLetter] = field(default_factory=list)
    rekeyed: list[tuple[int, str]] = field(default_factory=list)  # (index, user_id)
    forgets: dict[str, int] = field(default_factory=dict)  # user -> index of the forget event
    writes: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # user -> (index, encoded state)
    recommendations: list[tuple[str, dict]] = field(default_factory=list)  # (user_id, record)
    published: list[tuple[int, bytes]] = field(default_factory=list)  # per record: (partition, encoded)
    accepted: Counter = field(default_factory=Counter)  # by event type
    duplicates: int = 0
    expired: int = 0  # users erased by a TTL expiry (conditional forget)
    stale_after_forget: int = 0  # re-published mis-keyed events sent before their user's forget


class BatchProcessor:
    def __init__(self, settings: Settings, recommender: Recommender, clock: Callable[[], float] = time.time,
                 latest: LatestStore | None = None, rules: Rules = EMPTY, trending: Trending | None = None) -> None:
        """`rules`: the published surface's (stream_app/serving/surfaces.py, `for_you`)."""
        self.settings = settings
        self.rules = rules
        self.recommender = recommender  # swapped atomically between batches on model reload
        self.clock = clock
        self.latest = latest if latest is not None else LatestStore()
        self.trending = trending if trending is not None else Trending.of(settings)
        self.states = StateCache(int(settings.state_cache_mb * 2**20))
        self.forgotten = ForgetMarks()

    def process(self, messages: Sequence[Message], load: Callable[[str], bytes | dict | None]) -> Outcome:
        """`load(user_id)` reads the stored value; it is called only for users not cached."""
        out = Outcome()
        with metrics.stage("decode"):
            per_user = self._route(messages, out)
        with metrics.stage("state_read"):
            states = {user_id: self._load(user_id, load) for user_id in per_user}
        with metrics.stage("update"):
            refreshes, newest = self._update(per_user, states, messages, out)
        if refreshes:
            with metrics.stage("rank"):
                self._rank(refreshes, newest, messages, out)
        self._count(out)
        return out

    def _load(self, user_id: str, load: Callable[[str], bytes | dict | None]) -> UserState:
        state = self.states.get(user_id)
        if state is None:
            value = load(user_id)
            state = UserState.from_json(value)
            self.states.put(user_id, state, len(value) if isinstance(value, bytes) else 0)
        return state

    def _update(self, per_user: dict[str, list[tuple[int, Event]]], states: dict[str, UserState],
                messages: Sequence[Message], out: Outcome) -> tuple[list[Refresh], dict[str, tuple[int, Event]]]:
        """Dedupe and append each user's events; say what to write and whom to refresh."""
        refreshes: list[Refresh] = []
        newest: dict[str, tuple[int, Event]] = {}
        for user_id, items in per_user.items():
            items, state = self._state_for(user_id, items, states[user_id], messages, out)
            if not items:
                continue
            previous = state.items()
            newest_ts = state.history[-1][2] if state.history else float("-inf")
            fresh = [ev for i, ev in items if not replayed(messages[i], ev, state, newest_ts)]
            accepted, dups = state.apply(fresh, self.settings.history_max, self.settings.dedupe_window)
            dups += len(items) - len(fresh)
            out.duplicates += dups
            for ev in accepted:
                self.latest.score(ev)
                self.trending.observe(ev, messages[items[-1][0]])  # by the user's newest record time
                self.recommender.observe(previous, ev)
                out.accepted[ev.type] += 1
                if positive(ev.item_id, ev.type):  # as state.items() reads it: no dismiss
                    previous.append(ev.item_id)
            last_index, last_event = items[-1]
            last = messages[last_index]
            if accepted:  # the record's time, not this worker's clock (docs/design.md, "Idle by the stream's clock")
                state.touched = last.timestamp
                if last.partition != state.partition:  # a new user, or the partition count changed
                    state.partition, state.offset = last.partition, -1
            if last.partition == state.partition:
                state.offset = max(state.offset, last.offset)
            if accepted or dups:
                # a duplicate-only batch is written too: after a SIGKILL the local RocksDB
                # can hold writes whose changelog records were never sent, and the
                # redelivery that finds them "seen" is the only chance to send them.
                value = state.encode()
                out.writes[user_id] = (last_index, value)
                self.states.put(user_id, state, len(value))  # write-through
            # re-publish even for a duplicate-only batch: the crash that caused the
            # redelivery may have lost the recommendation but not the state.
            refreshes.append(Refresh(user_id, state, accepted))
            newest[user_id] = (last_index, last_event)
        return refreshes, newest

    def _state_for(self, user_id: str, items: list[tuple[int, Event]], state: UserState,
                   messages: Sequence[Message], out: Outcome) -> tuple[list[tuple[int, Event]], UserState]:
        """The user's state, unless the batch holds a forget: then everything before the
        last forget is erased (state, cache, latest recommendations) and only later
        events count, against empty state. A TTL expiry (forget with if_count) is
        dropped if the user was active after the sweep saw them idle."""
        items = [(i, ev) for n, (i, ev) in enumerate(items) if ev.if_count is None
                 or (ev.if_count == state.count and all(e.type == "forget" for _, e in items[:n]))]
        cut = max((n for n, (_, ev) in enumerate(items) if ev.type == "forget"), default=None)
        if cut is None:
            return items, state
        out.forgets[user_id] = items[cut][0]
        self.forgotten.mark(user_id, messages[items[cut][0]].timestamp)
        if items[cut][1].if_count is None:
            out.accepted["forget"] += 1
        else:
            out.expired += 1
        self.recommender.forget(user_id)
        self.latest.forget(user_id, messages[items[cut][0]].partition)
        self.states.drop(user_id)  # the table entry is deleted; later events start a new state
        later = [(i, ev) for i, ev in items[cut + 1:] if ev.type != "forget"]
        kept = [(i, ev) for i, ev in later  # re-published in the same batch as the forget, sent before it
                if messages[i].rekeyed_from is None or not self.forgotten.before(user_id, messages[i].rekeyed_from)]
        out.stale_after_forget += len(later) - len(kept)
        return kept, UserState()

    def _route(self, messages: Sequence[Message], out: Outcome) -> dict[str, list[tuple[int, Event]]]:
        per_user: dict[str, list[tuple[int, Event]]] = {}
        for i, msg in enumerate(messages):
            try:
                ev = decode_event(msg.value, self.settings.max_event_bytes)
            except InvalidEvent as exc:
                out.dead.append(DeadLetter(i, exc.reason, exc.detail))
                continue
            if msg.key != ev.user_id.encode():
                # State is partitioned by key; an event keyed otherwise would land in
                # the wrong partition's state. Re-publish it keyed by user instead.
                out.rekeyed.append((i, ev.user_id))
                continue
            if msg.rekeyed_from is not None and self.forgotten.before(ev.user_id, msg.rekeyed_from):
                out.stale_after_forget += 1  # sent before the user's forget, re-published after it
                continue
            per_user.setdefault(ev.user_id, []).append((i, ev))
        return per_user

    def _rank(self, refreshes: list[Refresh], newest: dict[str, tuple[int, Event]],
              messages: Sequence[Message], out: Outcome) -> None:
        ranked = self.recommender.recommend(refreshes, self.settings.top_k, self.rules)
        now = self.clock()
        metrics.BATCH_SIZE.observe(len(refreshes))
        for refresh, result in zip(refreshes, ranked):
            index, event = newest[refresh.user_id]
            latency = max(0.0, now - messages[index].timestamp)
            metrics.LATENCY.observe(latency)
            record = {
                "user_id": refresh.user_id,
                "event_id": event.event_id,
                "items": items_of(result),
                "model_version": result.model_version,
                "variant": result.variant,
                "generated_at": round(now, 3),
                "event_ts": event.ts,
                "latency_ms": round(latency * 1000, 2),
                "schema_version": SCHEMA_VERSION,
            }
            # to the partition of the user's events (docs/design.md, "Lookups survive restarts")
            partition = messages[index].partition
            out.published.append((partition, self.latest.put(refresh.user_id, record, partition)))
            out.recommendations.append((refresh.user_id, record))

    @staticmethod
    def _count(out: Outcome) -> None:
        for d in out.dead:
            metrics.INVALID.labels(d.reason).inc()
        for etype, n in out.accepted.items():
            metrics.EVENTS.labels(etype).inc(n)
        if out.duplicates:
            metrics.DUPLICATES.inc(out.duplicates)
        if out.rekeyed:
            metrics.REKEYED.inc(len(out.rekeyed))
        if out.stale_after_forget:
            metrics.STALE_AFTER_FORGET.inc(out.stale_after_forget)
        if out.expired:
            metrics.EXPIRED_USERS.inc(out.expired)
        metrics.RECOMMENDATIONS.inc(len(out.recommendations))


def items_of(ranked) -> list[dict]:
    """A Ranked's items as the recommendation record carries them (docs/contracts.md)."""
    if ranked.reasons is None:
        return [{"item_id": item, "score": round(score, 6)} for item, score in ranked.items]
    return [{"item_id": item, "score": round(score, 6), "reason": why}
            for (item, score), why in zip(ranked.items, ranked.reasons)]


class ForgetMarks:
    """When each recently forgotten user was forgotten (the forget's record time), so that a
    mis-keyed event the user's producer sent *before* the forget, re-published keyed by
    user only after the forget was processed, does not bring the user back (docs/design.md,
    "Forget wins over mis-keyed events"). Bounded: at most `capacity` users, each for
    `keep_s` (a re-publication takes milliseconds to seconds). Per worker and in memory:
    a restart inside that window loses the marks."""

    def __init__(self, capacity: int = 100_000, keep_s: float = 3600.0) -> None:
        self.capacity, self.keep_s = capacity, keep_s
        self.marks: OrderedDict[str, float] = OrderedDict()

    def mark(self, user_id: str, forgot_at: float) -> None:
        self.marks.pop(user_id, None)
        self.marks[user_id] = forgot_at
        while len(self.marks) > self.capacity:
            self.marks.popitem(last=False)

    def before(self, user_id: str, sent_at: float) -> bool:
        """True if `user_id` was forgotten after `sent_at` (and within `keep_s` of it)."""
        forgot_at = self.marks.get(user_id)
        return forgot_at is not None and sent_at <= forgot_at < sent_at + self.keep_s


def replayed(msg: Message, ev: Event, state: UserState, newest_ts: float) -> bool:
    """A redelivery of a message this state already reflects: at or below the offset it was
    last written at, on the same partition, and no newer than the newest stored event. The
    event-id window (`dedupe_window` ids) misses a hot user's redeliveries: 500 events/s
    times a few seconds between commits is more than it holds. The time test keeps a
    recreated input topic, whose offsets restart at 0, from passing new events off as
    redeliveries. A user's events all arrive on one partition while the partition count
    stays; after a change only the event-id window applies."""
    return (0 <= msg.offset <= state.offset and msg.partition == state.partition
            and round(ev.ts, 3) <= newest_ts)

