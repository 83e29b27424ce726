"""What the surfaces and the rules cost in quality, for `streamrec bench quality`.

- **Rules.** HR@k / NDCG@k of the published list with each rule set, beside no rules: the
  same candidates, the same `model.rules.apply` as the worker (model/evaluate.py
  `evaluate_lists`), plus one rule set drawn at random per test user (the replay of a
  public dataset with random rules per request), each list checked for violations.
- **Similar items.** "Next item given the last one": the similar-items surface (the served
  score of a one-event history), its terms alone, and co-occurrence fitted on the same
  training data, each ranking every item.

The public datasets carry no catalog, so a stand-in one is drawn: categories are clusters
of the trained model's item vectors (two levels, `g2 > c07`, so path matching is
exercised and a diversity cap binds on items that really are alike), prices log-normal
and two attributes, all seeded.
"""
from __future__ import annotations

import random
import zlib
from typing import Callable

import numpy as np
import torch

from model.rules import Boost, Rules

GROUPS, PER_GROUP = 5, 4  # 20 leaf categories


def cluster_catalog(model, item_ids: list[str], seed: int = 0, iters: int = 15) -> dict[str, dict]:
    """Stand-in catalog metadata: k-means (cosine) categories of the item vectors, seeded
    prices and attributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rows = torch.tensor([model.items.lookup(i) for i in item_ids])
        X = torch.nn.functional.normalize(model.item_matrix().float()[rows], dim=1)
    n = GROUPS * PER_GROUP
    centres = X[torch.randperm(len(X), generator=g)[:n]].clone()
    for _ in range(iters):
        label = (X @ centres.T).argmax(1)
        for c in range(n):
            members = X[label == c]
            if len(members):
                centres[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
    label = (X @ centres.T).argmax(1).tolist()
    out = {}
    for item, c in zip(item_ids, label):
        h = zlib.crc32(f"{seed}:{item}".encode())
        price = float(np.exp(3.0 + 0.8 * np.random.default_rng(h).standard_normal()))
        out[item] = {"category": f"g{c // PER_GROUP} > c{c:02d}", "price": round(price, 2),
                     "attributes": {"brand": f"b{h % 30}", "eco": h % 4 == 0}}
    return out


def random_rules(rng: random.Random, categories: list[str], meta_ids: list[str]) -> Rules:
    """One request's rules, drawn the way tests/pipeline/test_surfaces_page.py draws them."""
    pick = lambda: rng.choice(categories)  # noqa: E731
    low = rng.uniform(0, 60) if rng.random() < 0.4 else None
    return Rules(categories=tuple(pick() for _ in range(rng.choice((1, 2)))) if rng.random() < 0.5 else (),
                 exclude_categories=(pick(),) if rng.random() < 0.4 else (),
                 price_min=low, price_max=None if low is None else low + rng.uniform(5, 200),
                 max_per_category=rng.randint(1, 3) if rng.random() < 0.5 else 0,
                 exclude=frozenset(rng.sample(meta_ids, 5)) if rng.random() < 0.3 else frozenset(),
                 boost=(Boost("eco", True, rng.uniform(-1, 1)),) if rng.random() < 0.3 else ())


def rule_sets(meta: dict[str, dict], median_price: float) -> dict[str, Callable[[int], Rules]]:
    """The table's rows: a fixed rule set each, or one drawn per user."""
    categories = sorted({m["category"] for m in meta.values()})
    ids = sorted(meta)
    fixed = {
        "none": Rules(),
        "max 3 per category": Rules(max_per_category=3),
        "max 2 per category": Rules(max_per_category=2),
        "max 1 per category": Rules(max_per_category=1),
        f"price <= median ({median_price:.0f})": Rules(price_max=median_price),
        "exclude one category group": Rules(exclude_categories=("g0",)),
        "boost eco 0.2": Rules(boost=(Boost("eco", True, 0.2),)),
        "bury eco -0.2": Rules(boost=(Boost("eco", True, -0.2),)),
    }
    out: dict[str, Callable[[int], Rules]] = {name: (lambda i, r=r: r) for name, r in fixed.items()}
    drawn: dict[int, Rules] = {}

    def per_user(i: int) -> Rules:
        if i not in drawn:
            drawn[i] = random_rules(random.Random(i), categories, ids)
        return drawn[i]
    out["random rules per user"] = per_user
    return out


def rules_quality(ds, model, test: list, k: int, pool: int, policy: tuple, say=print) -> dict:
    """Each rule set's HR/NDCG and violations on the test split (served hybrid)."""
    from model.evaluate import evaluate_lists, model_scorer

    meta = cluster_catalog(model, ds.items)
    median = float(np.median([m["price"] for m in meta.values()]))
    score = model_scorer(model, ds.items, ds.catalog)
    rows = {}
    for name, rules_of in rule_sets(meta, median).items():
        say(f"rules: {name}")
        rows[name] = evaluate_lists(score, test, ds.items, k, rules_of, meta, pool, policy)
    return {"pool": pool, "catalog": f"{GROUPS * PER_GROUP} k-means categories of the item vectors in "
            f"{GROUPS} groups, log-normal prices (median {median:.2f}), seeded attributes", "rows": rows}


def similar_quality(ds, model, test: list, k: int) -> dict:
    """Next item given the last one: the similar surface and co-occurrence, full ranking."""
    from model.evaluate import baseline_fit_data, baseline_scorer, evaluate, last_item_splits, model_scorer

    splits = last_item_splits(test)
    scorers = {"similar (served)": model_scorer(model, ds.items, ds.catalog),
               "transformer alone": model_scorer(model, ds.items, ds.catalog, "transformer"),
               "transition alone": model_scorer(model, ds.items, ds.catalog, "transition"),
               "cooccurrence": baseline_scorer("cooccurrence", baseline_fit_data(ds), ds.items)}
    # only the page's own item is excluded: an item page knows no user
    return {who: evaluate(score, splits, ds.items, "full", k, seen_policy=("interacted", 0))
            for who, score in scorers.items()}
