"""Reasons (model/reasons.py): each recommended item names the recent item it follows most
(the transition term), else the recent item its vector is closest to, a matching search
first, `popular` when the history holds nothing; checked against plain-Python references."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.features import ItemIndex
from model.reasons import LIKE_WINDOW, explain, reason, search_match, words
from model.transformer import SeqRec
from model.transition import Transition
from tests.model.test_transition import N_ROWS, reference_counts, sequences


def tiny(trans_weight: float = 1.0) -> SeqRec:
    cfg = ModelConfig(n_items=N_ROWS - 1, dim=8, n_heads=2, trans_window=3, trans_weight=trans_weight)
    catalog = {str(i): {"title": f"item {i} {'wireless mouse' if i % 5 == 0 else 'desk lamp'}", "category": "x"}
               for i in range(1, N_ROWS)}
    model = SeqRec(cfg, ItemIndex([str(i) for i in range(1, N_ROWS)], cfg, catalog))
    model.transition = Transition.fit(sequences(), N_ROWS, neighbors=1000, window=3)
    return model.eval()


def test_share_of_is_the_tables_probability():
    model = tiny()
    ref = reference_counts(sequences(), 3)
    totals = {r: sum(v for (a, _), v in ref.items() if a == r) for r in range(N_ROWS)}
    rows = torch.tensor([r for r in range(N_ROWS) for _ in range(N_ROWS)] + [0, 99, -1])
    cols = torch.tensor([c for _ in range(N_ROWS) for c in range(N_ROWS)] + [3, 3, 3])
    got = model.transition.share_of(rows, cols)
    for r, c, g in zip(rows.tolist(), cols.tolist(), got.tolist()):
        want = ref.get((r, c), 0.0) / totals[r] if 0 < r < N_ROWS and totals.get(r) else 0.0
        assert abs(g - want) < 1e-6, (r, c)


def test_follows_is_the_strongest_distance_weighted_source_else_like():
    model = tiny()
    with torch.no_grad():
        M = model.item_matrix().float()
    recent = [[1, 2, 3, 4, 7], [9], []]
    picked = [list(range(10, 20)), [1, 2, 3], [5, 6]]
    got = explain(model, M, recent, picked)
    t, w = model.transition, model.cfg.trans_window
    for b, row in enumerate(got):
        assert len(row) == len(picked[b])
        for item, why in zip(picked[b], row):
            window = recent[b][-w:]
            shares = {src: t.share_of(torch.tensor([src]), torch.tensor([item])).item() / d
                      for d, src in enumerate(reversed(window), start=1)}
            best = max(shares, key=shares.get, default=None)
            if best is not None and shares[best] > 0:
                assert why == reason("follows", str(best))
            elif recent[b]:
                sims = {src: float(M[item] @ M[src]) for src in recent[b][-LIKE_WINDOW:]}
                assert why == reason("like", str(max(sims, key=sims.get)))
            else:
                assert why == "popular"
    kinds = {why.split(":")[0] for row in got for why in row}
    assert kinds == {"follows", "like", "popular"}  # the data exercises every branch


def test_without_the_transition_term_reasons_come_from_vectors():
    model = tiny(trans_weight=0.0)
    got = explain(model, model.item_matrix().float(), [[1, 2]], [[3, 4]])
    assert all(r.startswith("like:") for r in got[0])


def test_a_matching_search_comes_first():
    model = tiny()
    got = explain(model, model.item_matrix().float(), [[1, 2], []], [[5, 6], [10, 11]],
                  searches=["Wireless mice", "wireless"])
    assert got[0][0] == "search:Wireless mice" and not got[0][1].startswith("search")  # 6: a desk lamp
    assert got[1] == ["search:wireless", "search:wireless"]  # nothing else to cite
    assert words("A wireless-Mouse, 2.4GHz") == {"wireless", "mouse", "4ghz"}
    assert not search_match(words("lamp"), None) and search_match(words("LAMP"), {"title": "Desk lamp"})


def test_empty_lists_and_users():
    model = tiny()
    assert explain(model, model.item_matrix(), [[1], []], [[], []]) == [[], []]
    assert explain(model, model.item_matrix(), [], []) == []
