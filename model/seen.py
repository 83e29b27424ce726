"""The seen-items policy: which of a user's past items are never recommended back.

One function serves the worker (stream_app/serving) and `streamrec eval`, so the lists a
live worker publishes and the offline ranking exclude exactly the same items
(docs/model.md, "Seen items"). `interacted` suits catalogs where people rarely take the
same item twice (the Amazon 5-core sets: re-recommending what a user already reviewed
only wastes a slot); `purchased` keeps re-views recommendable; `none` is the plain model.
A window counts only the user's last W item events as seen.
"""
from __future__ import annotations

from typing import Iterable

POLICIES = ("none", "purchased", "interacted")


def excluded(events: Iterable[tuple[str | None, str]], policy: str, window: int = 0) -> set[str]:
    """Items not to recommend, from a history of (item_id, event type), oldest first.

    Searches (item_id None) never count. `window` > 0 counts only the last `window` item events."""
    if policy == "none":
        return set()
    if policy not in POLICIES:
        raise ValueError(f"exclude_seen must be one of {', '.join(POLICIES)}, not {policy!r}")
    items = [(item, kind) for item, kind in events if item]
    if window > 0:
        items = items[-window:]
    if policy == "purchased":
        return {item for item, kind in items if kind == "purchase"}
    return {item for item, _ in items}
