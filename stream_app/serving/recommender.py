"""What the pipeline asks of a recommender: learn from accepted events, then refresh the
top-K of a batch of users at once (batched so a neural model can run one forward)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from model.cooccurrence import CoOccurrence
from stream_app.pipeline.events import Event
from stream_app.pipeline.state import UserState


@dataclass(frozen=True, slots=True)
class Refresh:
    """One user to refresh: state after this batch and the events the batch added."""
    user_id: str
    state: UserState
    new_events: Sequence[Event]


@dataclass(frozen=True, slots=True)
class Ranked:
    items: list[tuple[str, float]]
    model_version: str
    variant: str


class Recommender(Protocol):
    def observe(self, previous_items: Sequence[str], event: Event) -> None:
        """Learn from one accepted event; `previous_items` is the user's item history before it."""
        ...

    def recommend(self, batch: Sequence[Refresh], k: int) -> list[Ranked]: ...

    def forget(self, user_id: str) -> None:
        """Drop anything derived from the user (caches)."""
        ...


class CoOccurrenceRecommender:
    """The baseline: online item-to-item co-occurrence, popularity backfill, seen items excluded."""

    version = "cooccurrence-v1"

    def __init__(self, variant: str = "default", window: int = 5, max_entries: int = 1_000_000,
                 seen_policy: tuple[str, int] = ("purchased", 0)) -> None:
        """`seen_policy`: (exclude_seen, exclude_seen_window), as Settings.seen_policy gives them."""
        self.model = CoOccurrence(window=window, max_entries=max_entries)
        self.variant = variant
        self.seen_policy = seen_policy
        self.catalog = None  # set by Lifecycle: unavailable items are never recommended

    def observe(self, previous_items: Sequence[str], event: Event) -> None:
        if event.item_id is not None:
            self.model.observe(previous_items, event.item_id)

    def forget(self, user_id: str) -> None:
        pass  # keeps no per-user data; item counts are aggregates

    def recommend(self, batch: Sequence[Refresh], k: int) -> list[Ranked]:
        blocked = self.catalog.unavailable if self.catalog is not None else frozenset()
        return [
            Ranked(self.model.recommend(r.state.items(), k, exclude=r.state.seen_items(*self.seen_policy) | blocked),
                   self.version, self.variant)
            for r in batch
        ]
