"""Is the worker's durable state what the accepted events say it must be?

The reference is an offline replay of the events (docs/design.md, "Idempotent replay"); the durable
state is the table's changelog topic (what any worker recovers from); the user-visible
result is the newest record per user on the recommendations topic. The crash test, the
rebalance test and `streamrec bench chaos` all judge a run with `check()`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

from stream_app.config import Settings
from stream_app.testing.harness import TopicReader
from stream_app.pipeline.state import UserState


def replay(events: Iterable[dict], history_max: int, dedupe_window: int = 10_000) -> dict[str, UserState]:
    """What the state table must hold after `events`, in order; invalid ones are skipped."""
    from stream_app.pipeline.events import InvalidEvent, validate

    states: dict[str, UserState] = {}
    for e in events:
        try:
            ev = validate(e)
        except InvalidEvent:
            continue
        if ev.type == "forget":
            states.pop(ev.user_id, None)
            continue
        states.setdefault(ev.user_id, UserState()).apply([ev], history_max, dedupe_window)
    return states


def changelog_topic(settings: Settings) -> str:
    return f"{settings.app_id}-users-changelog"


def read_changelog(settings: Settings) -> dict[str, UserState]:
    """The last value per user on the changelog up to its current end (tombstones drop the user)."""
    reader = TopicReader(settings.bootstrap_servers, changelog_topic(settings))
    table: dict[str, UserState] = {}
    try:
        for r in reader.read_to_end():
            user = json.loads(r.key)
            if r.value:
                table[user] = UserState.from_json(json.loads(r.value))
            else:
                table.pop(user, None)
    finally:
        reader.close()
    return table


def wait_for_newest(settings: Settings, newest: dict[str, str], timeout: float) -> dict[str, str]:
    """Read the recommendations topic until every user's latest record answers their
    newest event id (or timeout); returns user -> event id of their latest record."""
    reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
    latest: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for r in reader.poll(200):
                if r.value:
                    rec = json.loads(r.value)
                    latest[rec["user_id"]] = rec["event_id"]
            if all(latest.get(u) == e for u, e in newest.items()):
                break
    finally:
        reader.close()
    return latest


@dataclass
class Verdict:
    users: int
    lost: int  # users whose stored history misses accepted events
    duplicated: int  # users whose stored history holds an event twice
    differ: int  # users whose history has the right length but other content
    stale: int  # users whose latest recommendation does not answer their newest event
    stored_events: int  # events ever accepted, summed over the users on the changelog
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.differ or self.stale)

    def to_dict(self) -> dict:
        return asdict(self)


def first_difference(user: str, got: list, want: list) -> str:
    """Where two equal-length histories part, and whether it is an order or a content
    difference: a failed run should say what went wrong, not only that it did."""
    i = next(n for n, (g, w) in enumerate(zip(got, want)) if g != w)
    kind = "reordered" if sorted(map(json.dumps, got)) == sorted(map(json.dumps, want)) else "replaced"
    return f"{user}@{i}/{len(want)} {kind}: got {got[i:i + 3]} want {want[i:i + 3]}"


def check(settings: Settings, events: list[dict], timeout: float = 120.0) -> Verdict:
    """Judge a finished run: wait for the newest recommendations, then compare the
    changelog with the replay. A history is compared entry by entry."""
    newest = {e["user_id"]: e["event_id"] for e in events}
    latest = wait_for_newest(settings, newest, timeout)
    table = read_changelog(settings)
    want = replay(events, settings.history_max)
    lost, duplicated, differ = [], [], []
    for user, state in want.items():
        got = table.get(user, UserState())
        if len(got.history) < len(state.history):
            lost.append(user)
        elif len(got.history) > len(state.history) or got.count > state.count:
            duplicated.append(user)
        elif got.history != state.history:
            differ.append(first_difference(user, got.history, state.history))
    stale = sorted(u for u in newest if latest.get(u) != newest[u])
    return Verdict(len(want), len(lost), len(duplicated), len(differ), len(stale),
                   sum(s.count for s in table.values()),
                   {"lost": lost[:5], "duplicated": duplicated[:5], "differ": differ[:5], "stale": stale[:5]})
