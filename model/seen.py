"""The seen-items policy: which of a user's past items are never recommended back.

One function serves the worker (stream_app/serving) and `streamrec eval`, so the lists a
live worker publishes and the offline ranking exclude exactly the same items
(docs/model.md, "Seen items"). `interacted` suits catalogs where people rarely take the
same item twice (the Amazon 5-core sets: re-recommending what a user already reviewed
only wastes a slot); `purchased` keeps re-views recommendable; `none` is the plain model.
A window counts only the user's last W item events as seen.

Whatever the policy, an item the user dismissed is not shown again for `dismiss_ttl_s`,
measured from the dismiss to the user's newest event: the stream's own clock, so a live
worker and an offline replay of the same history agree and no worker's clock matters
(docs/design.md, "Idle by the stream's clock"). A later click, add_to_cart or purchase of
the item lifts its dismissal (the user changed their mind).
"""
from __future__ import annotations

from typing import Iterable

from model.event_types import ENGAGEMENT, POSITIVE

POLICIES = ("none", "purchased", "interacted")
DISMISS_TTL_S = 30 * 86_400.0  # the worker's default (stream_app/config.py, dismiss_ttl_s)


def excluded(events: Iterable[tuple[str | None, str, float]], policy: str, window: int = 0,
             dismiss_ttl_s: float = DISMISS_TTL_S) -> set[str]:
    """Items not to recommend, from a history of (item_id, event type, ts), oldest first.

    Searches (item_id None) never count, nor do dismisses as "seen". `window` > 0 counts
    only the last `window` item events; `dismiss_ttl_s` <= 0 ignores dismissals. (item_id,
    type) pairs are read as ts 0: their dismissals never age."""
    if policy not in POLICIES:
        raise ValueError(f"exclude_seen must be one of {', '.join(POLICIES)}, not {policy!r}")
    events = list(events)
    if events and len(events[0]) == 2:
        events = [(item, kind, 0.0) for item, kind in events]
    out = dismissed(events, dismiss_ttl_s)
    if policy == "none":
        return out
    items = [(item, kind) for item, kind, _ in events if item and kind in POSITIVE]
    if window > 0:
        items = items[-window:]
    if policy == "purchased":
        return out | {item for item, kind in items if kind == "purchase"}
    return out | {item for item, _ in items}


def dismissed(events: list[tuple[str | None, str, float]], ttl_s: float) -> set[str]:
    """Items whose latest dismiss is younger than `ttl_s` at the newest event's time and
    was not followed by engagement with the item."""
    if ttl_s <= 0:
        return set()
    active: dict[str, float] = {}
    newest = float("-inf")
    for item, kind, ts in events:
        newest = max(newest, ts)
        if kind == "dismiss" and item:
            active[item] = ts
        elif active and kind in ENGAGEMENT:
            active.pop(item, None)
    return {item for item, ts in active.items() if newest - ts < ttl_s}
