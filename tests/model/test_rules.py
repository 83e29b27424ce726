"""Business rules on candidate lists (model/rules.py): filters fail closed, categories
match by path, diversity caps each category, boosts move items by the list's own score
range, and whatever the candidates and rules, `apply` never returns an item the rules
forbid (checked by the independent `violations`)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.rules import EMPTY, Boost, Rules, apply, category_path, violations

META = {
    "a": {"category": "Beauty > Skin Care > Face", "price": 12.0, "attributes": {"brand": "acme", "eco": True}},
    "b": {"category": "beauty > skin care", "price": 30.0, "attributes": {"brand": "zen"}},
    "c": {"category": "Beauty / Hair", "price": 5.0, "attributes": {"brand": "acme", "size": 2.0}},
    "d": {"category": "Sports", "price": None, "attributes": {}},
    "e": {"category": "", "price": 8.0},
}
RANKED = [("a", 5.0), ("b", 4.0), ("c", 3.0), ("d", 2.0), ("e", 1.0), ("unknown", 0.5)]


def ids(items):
    return [i for i, _ in items]


def test_empty_rules_are_the_top_k():
    assert apply(RANKED, EMPTY, META, 3) == RANKED[:3] and EMPTY.empty and not EMPTY.filters


def test_categories_match_by_path_case_insensitively():
    assert category_path("Beauty > Skin Care|Face") == ("beauty", "skin care", "face")
    assert ids(apply(RANKED, Rules(categories=("BEAUTY",)), META, 10)) == ["a", "b", "c"]
    assert ids(apply(RANKED, Rules(categories=("beauty > skin care",)), META, 10)) == ["a", "b"]
    assert ids(apply(RANKED, Rules(categories=("Skin Care",)), META, 10)) == []  # a path, not a word
    assert ids(apply(RANKED, Rules(exclude_categories=("beauty/skin care",)), META, 10)) == ["c", "d", "e", "unknown"]


def test_price_filters_fail_closed():
    assert ids(apply(RANKED, Rules(price_min=6, price_max=20), META, 10)) == ["a", "e"]  # d, unknown: no price
    assert ids(apply(RANKED, Rules(price_max=5), META, 10)) == ["c"]


def test_excluded_ids_and_diversity():
    assert ids(apply(RANKED, Rules(exclude=frozenset({"a", "zzz"})), META, 2)) == ["b", "c"]
    # a and b are different categories (one is under the other): the cap is per category
    diverse = apply(RANKED + [("f", 0.1)], Rules(max_per_category=1), {**META, "f": {"category": "SPORTS"}}, 10)
    assert ids(diverse) == ["a", "b", "c", "d", "e", "unknown"]  # f: Sports is full; no category: unlimited


def test_boosts_move_by_the_lists_score_range():
    up = apply(RANKED, Rules(boost=(Boost("brand", "ACME", 1.0),)), META, 6)
    assert ids(up)[:2] == ["a", "c"] and up[0][1] == pytest.approx(5.0 + 4.5, rel=1e-5)  # range 5.0 - 0.5
    down = apply(RANKED, Rules(boost=(Boost("category", "beauty", -1.0),)), META, 6)
    assert ids(down) == ["d", "e", "unknown", "a", "b", "c"]
    small = apply(RANKED, Rules(boost=(Boost("eco", True, 0.1),)), META, 3)
    assert ids(small) == ["a", "b", "c"]
    assert ids(apply(RANKED, Rules(boost=(Boost("size", 2, 1.0),)), META, 1)) == ["c"]  # numbers compare as numbers
    assert ids(apply(RANKED, Rules(boost=(Boost("price", 30, 1.0),)), META, 1)) == ["b"]


def test_combined_rules_keep_both_sides():
    both = Rules(categories=("beauty",)) & Rules(categories=("sports", "beauty > hair"), price_max=10)
    assert ids(apply(RANKED, both, META, 10)) == ["c"]
    assert (Rules(max_per_category=3) & Rules(max_per_category=1)).max_per_category == 1
    assert (Rules(price_min=1) & Rules(price_min=3)).price_min == 3 and (EMPTY & EMPTY).empty
    assert not violations(["c"], both, META) and violations(["a"], both, META)


def test_contradicting_rules_pass_nothing():
    assert apply(RANKED, Rules(price_min=20) & Rules(price_max=10), META, 5) == []


@pytest.mark.parametrize("bad", [dict(max_per_category=-1),
                                 dict(boost=(Boost("b", "x", math.inf),)), dict(boost=(Boost("b", "x", 11),))])
def test_nonsense_rules_are_refused(bad):
    with pytest.raises(ValueError):
        Rules(**bad)


CATEGORIES = ["A", "A > x", "A > y", "B", "B > x", "C", ""]
catalog = st.dictionaries(
    st.sampled_from([f"i{n}" for n in range(40)]),
    st.fixed_dictionaries({"category": st.sampled_from(CATEGORIES),
                           "price": st.one_of(st.none(), st.floats(0, 100)),
                           "attributes": st.fixed_dictionaries({"brand": st.sampled_from(["p", "q", "r"])})}),
    max_size=40)
rules = st.builds(
    lambda inc, exc, lo, span, ex, cap, boosts: Rules(
        categories=tuple(inc), exclude_categories=tuple(exc), price_min=lo,
        price_max=None if lo is None or span is None else lo + span, exclude=frozenset(ex), max_per_category=cap,
        boost=tuple(Boost("brand", b, w) for b, w in boosts)),
    st.lists(st.sampled_from(CATEGORIES[:-1]), max_size=2), st.lists(st.sampled_from(CATEGORIES[:-1]), max_size=2),
    st.one_of(st.none(), st.floats(0, 60)), st.one_of(st.none(), st.floats(0, 60)),
    st.lists(st.sampled_from([f"i{n}" for n in range(40)]), max_size=5), st.integers(0, 3),
    st.lists(st.tuples(st.sampled_from(["p", "q"]), st.floats(-2, 2)), max_size=2))


@settings(max_examples=300, deadline=None)
@given(catalog, rules, rules, st.integers(1, 12), st.randoms(use_true_random=False))
def test_no_rule_is_ever_broken(meta, surface, request_rules, k, rnd):
    ranked = [(f"i{n}", rnd.uniform(-5, 5)) for n in rnd.sample(range(40), 30)]
    ranked.sort(key=lambda x: -x[1])
    for r in (surface, surface & request_rules):
        out = apply(ranked, r, meta, k)
        assert len(out) <= k and not violations(ids(out), r, meta)
        assert set(ids(out)) <= set(ids(ranked))
        assert [s for _, s in out] == sorted((s for _, s in out), reverse=True)
        if not r.filters:  # nothing can drop an item: the list is full
            assert len(out) == min(k, len(ranked))
