"""The seen-items policy (model/seen.py), dismissals with their TTL, and the full protocol
that applies them."""
from __future__ import annotations

import numpy as np
import pytest

from model.data import Split
from model.evaluate import evaluate
from model.features import RawEvent
from model.seen import excluded

T0 = 1_767_225_600.0
HISTORY = [("a", "view", T0), ("b", "purchase", T0 + 1), (None, "search", T0 + 2), ("c", "click", T0 + 3),
           ("a", "add_to_cart", T0 + 4)]
DAY = 86_400.0


@pytest.mark.parametrize("policy,window,want", [
    ("none", 0, set()),
    ("purchased", 0, {"b"}),
    ("interacted", 0, {"a", "b", "c"}),
    ("interacted", 2, {"a", "c"}),   # the last two item events; the search does not count
    ("purchased", 2, set()),         # the purchase is older than the window
])
def test_policies(policy, window, want):
    assert excluded(HISTORY, policy, window) == want


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="none, purchased, interacted"):
        excluded(HISTORY, "viewed")


def test_full_protocol_excludes_per_policy_and_misses_an_excluded_target():
    items = ["a", "b", "c", "d"]
    scores = np.array([[4.0, 3.0, 2.0, 1.0]])  # a > b > c > d for every user
    score = lambda ctx, cand: np.repeat(scores, len(ctx), 0)  # noqa: E731
    ctx = [RawEvent("a", "click"), RawEvent("b", "purchase")]
    to_c = [Split(0, ctx, "c", {"a", "b", "c"})]
    # none: a and b outrank c (rank 3); purchased: only a does (rank 2); interacted: c is first
    ranks = {p: evaluate(score, to_c, items, "full", k=1, seen_policy=(p, 0))["mrr"]
             for p in ("none", "purchased", "interacted")}
    assert ranks == pytest.approx({"none": 1 / 3, "purchased": 1 / 2, "interacted": 1.0})
    to_a = [Split(0, ctx, "a", {"a", "b"})]  # a repeat of a seen item: never shown under interacted
    assert evaluate(score, to_a, items, "full", k=4, seen_policy=("interacted", 0))["hr"] == 0.0
    assert evaluate(score, to_a, items, "full", k=4, seen_policy=("purchased", 0))["hr"] == 1.0


def history(*events: tuple[str | None, str, float]) -> list[tuple[str | None, str, float]]:
    return [(item, kind, T0 + ts) for item, kind, ts in events]


@pytest.mark.parametrize("policy", ["none", "purchased", "interacted"])
def test_a_dismissed_item_is_excluded_under_every_policy_until_the_ttl(policy):
    ttl = 30 * DAY
    dismissed = history(("x", "view", 0), ("y", "dismiss", 10), ("z", "view", 20))
    assert "y" in excluded(dismissed, policy, 0, ttl)
    # the TTL runs on the user's own events: 29 days later still hidden, 30 days later back
    assert "y" in excluded(dismissed + history(("z", "view", 10 + 29 * DAY)), policy, 0, ttl)
    back = excluded(dismissed + history(("z", "view", 10 + ttl)), policy, 0, ttl)
    assert "y" not in back and ("x" in back) == (policy == "interacted")
    assert "y" not in excluded(dismissed, policy, 0, 0)  # 0: dismissals exclude nothing


def test_engagement_after_a_dismiss_lifts_it_and_a_new_dismiss_sets_it_again():
    changed_mind = history(("y", "dismiss", 0), ("y", "click", 5))
    assert excluded(changed_mind, "none", 0, DAY) == set()
    assert excluded(changed_mind + history(("y", "dismiss", 9)), "none", 0, DAY) == {"y"}
    # a view is no change of mind (the list may show it again), nor is an earlier purchase
    assert excluded(history(("y", "dismiss", 0), ("y", "view", 5)), "none", 0, DAY) == {"y"}
    assert excluded(history(("y", "purchase", 0), ("y", "dismiss", 5)), "none", 0, DAY) == {"y"}
    # lifted under `none`; under `purchased` the later purchase itself keeps it out
    bought = history(("y", "dismiss", 0), ("y", "purchase", 5))
    assert excluded(bought, "none", 0, DAY) == set() and excluded(bought, "purchased", 0, DAY) == {"y"}


def test_a_dismiss_is_not_seen_and_not_in_the_window():
    events = history(("a", "view", 0), ("d", "dismiss", 1), ("b", "view", 2))
    # the dismiss is no item event of the window: the last one is b, and d is out only for its TTL
    assert excluded(events, "interacted", 1, DAY) == {"b", "d"}
    assert excluded(events + history(("b", "view", 2 + DAY)), "interacted", 0, DAY) == {"a", "b"}


def test_pairs_without_times_are_read_as_time_zero():
    assert excluded([("a", "view"), ("d", "dismiss")], "none") == {"d"}
    assert excluded([("a", "view"), ("d", "dismiss")], "interacted", 0, 0) == {"a"}


def test_the_full_protocol_hides_a_dismissed_item_as_the_worker_does():
    items = ["a", "b", "c"]
    scores = np.array([[3.0, 2.0, 1.0]])
    score = lambda ctx, cand: np.repeat(scores, len(ctx), 0)  # noqa: E731
    ctx = [RawEvent("b", "view", T0), RawEvent("a", "dismiss", T0 + 1)]
    to_b = [Split(0, ctx, "b", {"b"})]  # a, dismissed, no longer outranks b
    assert evaluate(score, to_b, items, "full", k=1, seen_policy=("none", 0, DAY))["mrr"] == 1.0
    assert evaluate(score, to_b, items, "full", k=1, seen_policy=("none", 0, 0))["mrr"] == 0.5
