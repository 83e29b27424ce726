"""What the pipeline and the lookup API ask of a recommender: learn from accepted events,
refresh the top-K of a batch of users at once (batched so a neural model can run one
forward), and answer the surfaces that are not a user's own list (similar items, the list
after a search). Every answer goes through the same rules (model/rules.py) and says why
each item is there (model/reasons.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from model.cooccurrence import CoOccurrence
from model.event_types import positive
from model.reasons import QUERY_SHOWN, reason, search_match, words
from model.rules import EMPTY, Rules, apply, pool_size
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
    reasons: list[str] | None = None  # one per item (model/reasons.py); None where reasons are off


class Recommender(Protocol):
    def observe(self, previous_items: Sequence[str], event: Event) -> None:
        """Learn from one accepted event; `previous_items` is the user's item history before it."""
        ...

    def recommend(self, batch: Sequence[Refresh], k: int, rules: Rules = EMPTY) -> list[Ranked]: ...

    def similar(self, item_id: str, k: int, rules: Rules = EMPTY) -> Ranked:
        """Items to show on `item_id`'s page: what comes next after it, never itself."""
        ...

    def after_search(self, refresh: Refresh, query: str, ts: float, k: int, rules: Rules = EMPTY) -> Ranked:
        """The user's list as it would be right after searching `query` (nothing is stored)."""
        ...

    def forget(self, user_id: str) -> None:
        """Drop anything derived from the user (caches)."""
        ...


def latest_search(state: UserState, within: int) -> str | None:
    """The newest search query among the user's last `within` events (a reason may cite it)."""
    for entry in reversed(state.history[-within:]):
        if entry[3]:
            return entry[3]
    return None


class CoOccurrenceRecommender:
    """The baseline: online item-to-item co-occurrence, popularity backfill, seen items excluded."""

    version = "cooccurrence-v1"

    def __init__(self, variant: str = "default", window: int = 5, max_entries: int = 1_000_000,
                 seen_policy: tuple = ("purchased", 0), rules_pool: int = 100, reasons: bool = True) -> None:
        """`seen_policy`: the arguments of model.seen.excluded, as Settings.seen_policy gives them."""
        self.model = CoOccurrence(window=window, max_entries=max_entries)
        self.variant = variant
        self.seen_policy = seen_policy
        self.rules_pool, self.reasons = rules_pool, reasons
        self.catalog = None  # set by Lifecycle: unavailable items are never recommended

    def observe(self, previous_items: Sequence[str], event: Event) -> None:
        if positive(event.item_id, event.type):  # a dismiss teaches co-occurrence and popularity nothing
            self.model.observe(previous_items, event.item_id)

    def forget(self, user_id: str) -> None:
        pass  # keeps no per-user data; item counts are aggregates

    def recommend(self, batch: Sequence[Refresh], k: int, rules: Rules = EMPTY) -> list[Ranked]:
        blocked = self._blocked()
        return [self._ranked(r.state.items(), k, rules, r.state.seen_items(*self.seen_policy) | blocked,
                             latest_search(r.state, self.model.window)) for r in batch]

    def similar(self, item_id: str, k: int, rules: Rules = EMPTY) -> Ranked:
        return self._ranked([item_id], k, rules, {item_id} | self._blocked(), None)

    def after_search(self, refresh: Refresh, query: str, ts: float, k: int, rules: Rules = EMPTY) -> Ranked:
        """Co-occurrence reads no queries: the user's own list, with search reasons where it matches."""
        state = refresh.state
        return self._ranked(state.items(), k, rules, state.seen_items(*self.seen_policy) | self._blocked(), query)

    def _blocked(self) -> set[str] | frozenset:
        return self.catalog.unavailable if self.catalog is not None else frozenset()

    def _meta(self) -> Mapping[str, Mapping]:
        return self.catalog.meta if self.catalog is not None else {}

    def _ranked(self, recent: Sequence[str], k: int, rules: Rules, exclude, query: str | None) -> Ranked:
        found = self.model.recommend_explained(recent, pool_size(k, rules, self.rules_pool), exclude)
        ranked = apply([(i, s) for i, s, _ in found], rules, self._meta(), k)
        reasons = None
        if self.reasons:
            source, meta, qw = {i: src for i, _, src in found}, self._meta(), words(query)
            reasons = [reason("search", query[:QUERY_SHOWN]) if qw and search_match(qw, meta.get(i))
                       else reason("follows", source[i]) if source.get(i) else reason("popular")
                       for i, _ in ranked]
        return Ranked(ranked, self.version, self.variant, reasons)
