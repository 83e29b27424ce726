"""Item-to-item co-occurrence recommender, learned online.

One implementation serves two roles: the live worker's fallback (and the recommender
before a transformer checkpoint exists), and `streamrec eval --baseline cooccurrence`.
Counts are *directed* (p -> next item) and decay with distance in the sequence, because
"what comes next" is the signal a sequential recommender must beat. Memory is bounded
twice: each neighbour list is pruned to its strongest entries, and the total number of
entries has a budget, enforced by dropping the least recently updated item's list (a
live worker sees new items forever; without a total budget the fallback grew ~13 MB per
100k events). Popularity backfills users with no usable neighbours.
"""
from __future__ import annotations

import heapq
from collections import Counter
from typing import Iterable, Sequence


class CoOccurrence:
    def __init__(self, window: int = 5, max_neighbors: int = 200, popular_refresh: int = 1000,
                 max_entries: int = 1_000_000) -> None:
        self.window = window
        self.max_neighbors = max_neighbors
        self.max_entries = max(max_entries, 2 * max_neighbors)
        self.pairs: dict[str, Counter] = {}  # insertion order = least recently updated first
        self.entries = 0  # sum of len(row) over pairs
        self.popularity: Counter = Counter()
        self._popular: list[tuple[str, float]] = []
        self._popular_refresh = popular_refresh
        self._since_refresh = popular_refresh  # force a build on first use

    def observe(self, previous: Sequence[str], item: str) -> None:
        """Learn from one interaction with `item`, preceded by `previous` (oldest first)."""
        self.popularity[item] += 1
        self._since_refresh += 1
        if len(self.popularity) > self.max_entries:  # unknown item ids are valid events: bound them too
            self.popularity = Counter(dict(self.popularity.most_common(self.max_entries // 2)))
        recent = previous[-self.window :]
        for distance, prev in enumerate(reversed(recent), start=1):
            if prev == item:
                continue
            row = self.pairs.pop(prev, None)  # re-inserted below: now the most recently updated
            if row is None:
                row = Counter()
            before = len(row)
            row[item] += 1.0 / distance
            if len(row) > 2 * self.max_neighbors:
                row = Counter(dict(row.most_common(self.max_neighbors)))
            self.pairs[prev] = row
            self.entries += len(row) - before
        while self.entries > self.max_entries:
            oldest = next(iter(self.pairs))
            self.entries -= len(self.pairs.pop(oldest))

    def fit(self, sequences: Iterable[Sequence[str]]) -> "CoOccurrence":
        """Batch training for offline evaluation: replay each sequence in order."""
        for seq in sequences:
            for i, item in enumerate(seq):
                self.observe(seq[max(0, i - self.window) : i], item)
        return self

    def scores(self, recent: Sequence[str], sources: dict[str, tuple[float, str]] | None = None) -> dict[str, float]:
        """Neighbour scores of the user's recent items, newest weighted most. `sources`, if
        given, gets each item's strongest contributor (its share, that recent item): the
        reason of the recommendation (model/reasons.py)."""
        total: Counter = Counter()
        for distance, item in enumerate(reversed(recent[-self.window :]), start=1):
            row = self.pairs.get(item)
            if not row:
                continue
            norm = sum(row.values())
            for other, count in row.items():
                share = count / norm / distance
                total[other] += share
                if sources is not None and share > sources.get(other, (0.0, ""))[0]:
                    sources[other] = (share, item)
        return total

    def popular(self, n: int) -> list[tuple[str, float]]:
        if self._since_refresh >= self._popular_refresh or len(self._popular) < n:
            top = self.popularity.most_common(max(n, 100))
            total = sum(self.popularity.values()) or 1
            self._popular = [(item, count / total) for item, count in top]
            self._since_refresh = 0
        return self._popular

    def recommend(self, recent: Sequence[str], k: int, exclude: set[str] | frozenset = frozenset()) -> list[tuple[str, float]]:
        """Top-k (item, score): neighbours first, then popular items; never `exclude`d."""
        return [(item, score) for item, score, _ in self.recommend_explained(recent, k, exclude)]

    def recommend_explained(self, recent: Sequence[str], k: int,
                            exclude: set[str] | frozenset = frozenset()) -> list[tuple[str, float, str | None]]:
        """`recommend` with each item's source: the recent item it follows most, or None for
        popularity backfill."""
        sources: dict[str, tuple[float, str]] = {}
        cand = self.scores(recent, sources)
        best = heapq.nlargest(k + len(exclude), cand.items(), key=lambda kv: kv[1])
        out = [(item, float(score), sources[item][1]) for item, score in best if item not in exclude][:k]
        if len(out) < k:
            have = {item for item, _, _ in out} | set(exclude)
            # popularity scores are scaled below any neighbour score so backfill ranks last
            floor = min((s for _, s, _ in out), default=1.0)
            for item, share in self.popular(k + len(have)):
                if item not in have:
                    out.append((item, float(floor * share * 0.5), None))
                    if len(out) == k:
                        break
        return out
