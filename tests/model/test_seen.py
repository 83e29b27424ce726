"""The seen-items policy (model/seen.py) and the full protocol that applies it."""
from __future__ import annotations

import numpy as np
import pytest

from model.data import Split
from model.evaluate import evaluate
from model.features import RawEvent
from model.seen import excluded

HISTORY = [("a", "view"), ("b", "purchase"), (None, "search"), ("c", "click"), ("a", "add_to_cart")]


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
