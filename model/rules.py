"""Business rules on a ranked candidate list: filters, diversity, boosts.

Why after scoring and on candidates: a rule is the shop's, not the model's, so it must
not change what the model learned or how it scores; it only decides which of the model's
best candidates are shown, and in what order. One function, `apply`, serves the worker's
published lists, the lookup API's surfaces and `streamrec eval`, so a rule costs offline
exactly what it costs live (docs/design.md, "Rules are applied after scoring").

An item's attributes come from the catalog (`meta[item_id]`: `category`, `price`,
`attributes`). Filters fail closed: an item the catalog says nothing about has no
category and no price, so a category or price filter drops it. Categories are paths
(`Beauty > Skin Care > Face`, parts split on `>`, `/` or `|`, compared case-insensitively);
a rule's category matches an item whose category equals it or lies under it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Sequence

Meta = Mapping[str, Mapping[str, Any]]
MAX_BOOST_WEIGHT = 10.0
_SEP = re.compile(r"[>/|]")


@lru_cache(maxsize=65_536)
def category_path(category: str) -> tuple[str, ...]:
    """`"Beauty > Skin Care"` -> ("beauty", "skin care"); cached: a catalog has few categories
    and the hot path asks for the same ones again and again."""
    return tuple(p.strip().casefold() for p in _SEP.split(category) if p.strip())


def under(category: Any, rule: tuple[str, ...]) -> bool:
    """True if `category` (an item's) equals the rule's path or lies under it."""
    if not isinstance(category, str) or not category:
        return False
    path = category_path(category)
    return path[: len(rule)] == rule


@dataclass(frozen=True, slots=True)
class Boost:
    """Add `weight` x the candidate list's score range to items whose `attribute` is `value`
    (`category` matches by path). Scale-free: weight 1 lifts a matching item above every
    non-matching candidate, -1 (a bury) sinks it below all of them, 0.2 moves it a fifth."""

    attribute: str
    value: str | float | bool
    weight: float
    _folded: str = field(default="", init=False, repr=False, compare=False)  # the value, compared as text

    def __post_init__(self) -> None:
        object.__setattr__(self, "_folded", str(self.value).casefold())

    def matches(self, item: Mapping[str, Any]) -> bool:
        """Called for every candidate of every list with a boost: the common case (a text
        attribute against a text value) is one dict lookup and one casefold."""
        if self.attribute == "category":
            return under(item.get("category"), category_path(str(self.value)))
        if self.attribute == "price":
            have = item.get("price")
        else:
            attributes = item.get("attributes")
            have = attributes.get(self.attribute) if attributes else None
        if have is None:
            return False
        if type(have) is str and type(self.value) is str:
            return have.casefold() == self._folded
        if isinstance(self.value, bool) or isinstance(have, bool):
            return have is self.value or (isinstance(have, str) and have.casefold() == self._folded)
        if isinstance(have, (int, float)) and isinstance(self.value, (int, float)):
            return float(have) == float(self.value)
        return str(have).casefold() == self._folded


@dataclass(frozen=True, slots=True)
class Rules:
    """What a list may hold. The empty Rules() changes nothing (and costs nothing)."""

    categories: tuple[str, ...] = ()          # include: the item's category is one of these, or under one
    exclude_categories: tuple[str, ...] = ()  # drop items in (or under) any of these
    price_min: float | None = None            # inclusive; items without a price are dropped
    price_max: float | None = None
    exclude: frozenset[str] = frozenset()     # item ids never shown
    max_per_category: int = 0                 # diversity: at most this many items per category (0 = no limit)
    boost: tuple[Boost, ...] = ()
    also: tuple["Rules", ...] = ()            # more include-category filters that must pass too (from `&`)
    _paths: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # price_min > price_max is allowed: two sets of rules combined by `&` may pass nothing
        if self.max_per_category < 0:
            raise ValueError("max_per_category must be >= 0")
        for b in self.boost:
            if not (math.isfinite(b.weight) and abs(b.weight) <= MAX_BOOST_WEIGHT):
                raise ValueError(f"boost weight {b.weight} must be finite and within ±{MAX_BOOST_WEIGHT:g}")
        object.__setattr__(self, "_paths", (tuple(category_path(c) for c in self.categories if category_path(c)),
                                            tuple(category_path(c) for c in self.exclude_categories
                                                  if category_path(c))))

    @property
    def empty(self) -> bool:
        return self == EMPTY

    @property
    def item_filters(self) -> bool:
        """True if some item may fail `allows` (diversity and boosts never drop one alone)."""
        return bool(self.categories or self.exclude_categories or self.exclude or self.also
                    or self.price_min is not None or self.price_max is not None)

    @property
    def filters(self) -> bool:
        """True if the rules can drop items (so more candidates than k are needed)."""
        return self.item_filters or bool(self.max_per_category)

    def __and__(self, other: "Rules") -> "Rules":
        """Both sets of rules at once (a surface's and a request's): filters intersect, the
        tighter bounds and diversity limit win, boosts add up."""
        if other.empty:
            return self
        if self.empty:
            return other
        caps = [c for c in (self.max_per_category, other.max_per_category) if c]
        both = self.categories and other.categories  # in one of mine AND in one of theirs
        return Rules(categories=self.categories or other.categories,
                     also=self.also + other.also + ((Rules(categories=other.categories),) if both else ()),
                     exclude_categories=self.exclude_categories + other.exclude_categories,
                     price_min=_tighter(self.price_min, other.price_min, max),
                     price_max=_tighter(self.price_max, other.price_max, min),
                     exclude=self.exclude | other.exclude, max_per_category=min(caps) if caps else 0,
                     boost=self.boost + other.boost)

    def allows(self, item_id: str, item: Mapping[str, Any]) -> bool:
        """The filters alone (no diversity, no boost) for one item with its catalog entry."""
        if item_id in self.exclude:
            return False
        include, exclude = self._paths
        category = item.get("category")
        if include and not any(under(category, p) for p in include):
            return False
        if self.also and not all(r.allows(item_id, item) for r in self.also):
            return False
        if exclude and any(under(category, p) for p in exclude):
            return False
        if self.price_min is not None or self.price_max is not None:
            price = item.get("price")
            if not isinstance(price, (int, float)) or isinstance(price, bool):
                return False
            if (self.price_min is not None and price < self.price_min) or \
                    (self.price_max is not None and price > self.price_max):
                return False
        return True


def _tighter(a: float | None, b: float | None, pick) -> float | None:
    return b if a is None else a if b is None else pick(a, b)


EMPTY = Rules()
NO_META: Mapping[str, Any] = {}


def pool_size(k: int, rules: Rules, pool: int) -> int:
    """Candidates scored before the rules: k where nothing can drop or move an item,
    else `pool` (the `rules_pool` setting), the same offline and live."""
    return max(k, pool) if rules.filters or rules.boost else k


def apply(ranked: Sequence[tuple[str, float]], rules: Rules, meta: Meta, k: int) -> list[tuple[str, float]]:
    """The first `k` of `ranked` (best first, (item_id, score)) that the rules allow, boosts
    re-ordering them and the diversity limit applied in that order. Scores returned are the
    boosted ones, so the list is ordered by its own scores."""
    if rules.empty:
        return list(ranked[:k])
    kept = [(i, s) for i, s in ranked if rules.allows(i, meta.get(i) or NO_META)] if rules.item_filters \
        else list(ranked)
    if rules.boost and kept:
        finite = [s for _, s in kept if math.isfinite(s)]
        spread = (max(finite) - min(finite)) if finite else 0.0
        spread = spread * (1 + 1e-6) + 1e-9 if spread > 0 else 1.0  # a hair more: weight 1 is strictly above
        boosts = rules.boost
        boosted = []
        for i, s in kept:
            item, extra = meta.get(i) or NO_META, 0.0
            for b in boosts:  # a plain loop: a generator per candidate cost more than the matching
                if b.matches(item):
                    extra += b.weight
            boosted.append((i, s + spread * extra))
        kept = sorted(boosted, key=lambda x: -x[1])  # stable: ties keep the model's order
    if rules.max_per_category:
        kept = _diverse(kept, rules.max_per_category, meta, k)
    return kept[:k]


def _diverse(kept: list[tuple[str, float]], cap: int, meta: Meta, k: int) -> list[tuple[str, float]]:
    """Greedy in score order: an item whose category already has `cap` items is skipped.
    Items without a category are not limited (nothing says they are alike)."""
    out, per = [], {}
    for item_id, score in kept:
        category = (meta.get(item_id) or NO_META).get("category")
        if isinstance(category, str) and category:
            key = category_path(category)
            if per.get(key, 0) >= cap:
                continue
            per[key] = per.get(key, 0) + 1
        out.append((item_id, score))
        if len(out) == k:
            break
    return out


def violations(items: Sequence[str], rules: Rules, meta: Meta) -> list[str]:
    """Every way `items` breaks `rules`, checked independently of `apply` (for tests and the
    replay benchmark: a rule must never be broken, whatever the candidates)."""
    found = []
    include = [[category_path(c) for c in r.categories if category_path(c)] for r in (rules, *rules.also)]
    exclude = [category_path(c) for c in rules.exclude_categories if category_path(c)]
    for item_id in items:
        item = meta.get(item_id) or NO_META
        if item_id in rules.exclude:
            found.append(f"{item_id}: excluded by id")
        category = item.get("category")
        if any(paths and not any(under(category, p) for p in paths) for paths in include):
            found.append(f"{item_id}: category {category!r} not among the included ones")
        if any(under(category, p) for p in exclude):
            found.append(f"{item_id}: category {category!r} excluded")
        price = item.get("price")
        if rules.price_min is not None and not (isinstance(price, (int, float)) and price >= rules.price_min):
            found.append(f"{item_id}: price {price!r} below {rules.price_min}")
        if rules.price_max is not None and not (isinstance(price, (int, float)) and price <= rules.price_max):
            found.append(f"{item_id}: price {price!r} above {rules.price_max}")
    if rules.max_per_category:
        counts: dict[tuple[str, ...], int] = {}
        for item_id in items:
            category = (meta.get(item_id) or NO_META).get("category")
            if isinstance(category, str) and category_path(category):
                counts[category_path(category)] = counts.get(category_path(category), 0) + 1
        found += [f"category {'>'.join(c)}: {n} items > {rules.max_per_category}"
                  for c, n in counts.items() if n > rules.max_per_category]
    if len(set(items)) != len(items):
        found.append("an item appears twice")
    return found
