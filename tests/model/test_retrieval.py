"""docs/design.md, "Two-stage retrieval is exact on its candidates": graph candidates re-scored
by the served score give the exact ranking wherever the graph found the items, never a
filtered item, always K items when the catalog has them, and follow catalog upserts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.cache import ItemScorer
from model.config import ModelConfig
from model.features import ItemIndex
from model.retrieval import ANNIndex, use_ann
from model.transformer import SeqRec
from model.transition import Transition

N_ITEMS = 3000


def hybrid_model(seed: int = 0) -> SeqRec:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=N_ITEMS, dim=16, n_layers=1, n_heads=2, window=4, trans_weight=1.0)
    catalog = {f"i{i}": {"title": f"widget {i % 13}", "category": f"c{i % 9}"} for i in range(N_ITEMS)}
    model = SeqRec(cfg, ItemIndex(list(catalog), cfg, catalog))
    with torch.no_grad():
        model.id_emb.weight.normal_(0, 1.0)
    rng = np.random.default_rng(seed)
    src = np.repeat(np.arange(1, N_ITEMS + 1), 20)
    model.transition = Transition.from_pairs(src, rng.integers(1, N_ITEMS + 1, len(src)), rng.random(len(src)),
                                             N_ITEMS + 1, 20)
    return model.eval()


def users(model: SeqRec, n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        M = model.item_matrix()
    picks = torch.randint(1, len(M), (n,), generator=g)
    return M[picks] + 0.3 * torch.randn(n, M.shape[1], generator=g)


def recall(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a.tolist(), b.tolist())]))


def test_two_stage_matches_exact_hybrid_ranking() -> None:
    model = hybrid_model()
    exact, ann = ItemScorer(model), ItemScorer(model, ann={"candidates": 100, "ef_search": 128})
    u = users(model)
    recent = [[int(i) for i in np.random.default_rng(b).integers(1, N_ITEMS, 3)] for b in range(len(u))]
    s_exact, i_exact = exact.topk(u, 10, None, None, recent)
    s_ann, i_ann = ann.topk(u, 10, None, None, recent)
    assert recall(i_ann, i_exact) >= 0.98
    # every returned item carries its exact served score (graph ids re-scored, transition included)
    with torch.inference_mode():
        full = model.scores(u, recent, exact.matrix())
    assert torch.allclose(s_ann, full.gather(1, i_ann), atol=1e-4)
    same = (i_ann == i_exact).all(1)
    assert same.float().mean() > 0.8 and torch.allclose(s_ann[same], s_exact[same], atol=1e-4)


def test_filters_hold_and_k_is_filled_with_many_exclusions() -> None:
    model = hybrid_model()
    ann = ItemScorer(model, ann={"candidates": 20})
    u = users(model, n=8)
    greedy = ann.topk(u, 10)[1]
    exclude = [list(range(1, 800)) + greedy[b].tolist() for b in range(len(u))]   # 800 seen items
    blocked = torch.arange(800, 1600)                                                # unavailable
    s, idx = ann.topk(u, 10, exclude, blocked)
    assert torch.isfinite(s).all() and idx.shape == (8, 10)
    for b, row in enumerate(idx.tolist()):
        assert not set(row) & set(exclude[b]) and not set(row) & set(blocked.tolist()) and 0 not in row
        assert len(set(row)) == 10


def test_exhausted_candidates_fall_back_to_exact() -> None:
    model = hybrid_model()
    ann = ItemScorer(model, ann={"candidates": 10, "ef_search": 10})
    u = users(model, n=4)
    blocked = torch.arange(1, N_ITEMS - 5)   # 6 items left in the catalog (5 + the last row)
    s, idx = ann.topk(u, 10, None, blocked)
    assert ann.exact_fallbacks == 4
    left = set(range(N_ITEMS - 5, N_ITEMS + 1))
    for row, srow in zip(idx.tolist(), s.tolist()):
        got = {i for i, x in zip(row, srow) if np.isfinite(x)}
        assert got == left


def test_index_follows_catalog_upserts() -> None:
    model = hybrid_model()
    ann = ItemScorer(model, ann={"candidates": 50})
    ann.matrix()
    target = users(model, n=1)
    new = model.items.add("fresh", {"title": "widget 2", "category": "c1"})
    with torch.no_grad():  # a new item that the user's vector points straight at
        v = model.item_vectors(torch.tensor([new]))[0]
    u = target * 0 + v * 50
    _, idx = ann.topk(u, 5)
    assert new in idx[0].tolist() and ann.index.rows == new + 1
    model.items.add("i7", {"title": "lamp", "category": "garden"})   # a content change: re-added under its id
    ann.matrix()
    assert ann.index.copies == 1
    _, idx = ann.topk(u, 50)
    assert len(set(idx[0].tolist())) == 50


def test_index_build_and_modes() -> None:
    m = torch.randn(101, 8)
    index = ANNIndex.build(m, degree=8)
    assert index.rows == 101 and index.graph.ntotal == 100 and index.nbytes() > 100 * 8 * 4
    found = index.search(m[5:6], 3, blocked=torch.tensor([5]))
    assert 5 not in found[0].tolist() and 0 not in found[0].tolist()
    assert use_ann("ann", 10, 1000) and not use_ann("exact", 10**7, 1000)
    assert use_ann("auto", 1000, 1000) and not use_ann("auto", 999, 1000)
    with pytest.raises(ValueError):
        use_ann("fast", 1, 1)


def test_a_new_checkpoint_keeps_the_old_links_with_its_own_vectors() -> None:
    """The learner's next checkpoint: each item's vector drifts a little, rows move, items
    leave and new ones arrive."""
    old = hybrid_model(seed=0)
    old_scorer = ItemScorer(old, ann={"candidates": 100})
    old_scorer.matrix()
    new = hybrid_model(seed=0)
    ids = list(old.items.ids[1:])
    order = np.random.default_rng(5).permutation(len(ids) - 10)              # rows move; the last 10 leave
    kept = [ids[i] for i in order]
    new_ids = kept + [f"grown-{i}" for i in range(10)]
    new.items = ItemIndex(new_ids, new.cfg, {i: old.items.meta.get(i, {"title": "widget 1", "category": "c2"})
                                             for i in new_ids})
    with torch.no_grad():  # each kept item keeps its vector under its new row, plus a fine-tune's drift
        w = old.id_emb.weight
        new.id_emb.weight[1:len(kept) + 1] = w[torch.from_numpy(order) + 1] + 0.05 * torch.randn(len(kept), w.shape[1])
    scorer = ItemScorer(new, ann={"candidates": 100}, previous=(old_scorer.index, list(old.items.ids)))
    M = scorer.matrix()
    assert scorer.index.refreshes == 1 and scorer.index.graph.ntotal == old_scorer.index.graph.ntotal + 10
    stored = scorer.index.graph.storage.reconstruct_n(0, 5)
    rows = [new.items.lookup(old.items.ids[r]) for r in range(1, 6)]
    assert np.allclose(stored, M[rows].numpy(), atol=1e-6)                 # the new vectors, under new rows
    u = users(new)
    exact = ItemScorer(new)
    assert recall(scorer.topk(u, 10)[1], exact.topk(u, 10)[1]) >= 0.97
    gone = set(ids[-10:])
    found = {new.items.ids[i] for i in scorer.index.search(u, 100).flatten().tolist() if i}
    assert not gone & found


def test_reattaching_an_unchanged_catalog_changes_nothing() -> None:
    """A swap attaches the whole catalog to the new model's items: identical records must not
    mark every row changed (a million-row re-score and graph build in the event loop)."""
    model = hybrid_model()
    scorer = ItemScorer(model, ann={"candidates": 20})
    m, version = scorer.matrix(), model.items.version
    for iid, meta in list(model.items.meta.items()):
        model.items.add(iid, meta)
    assert model.items.version == version and scorer.matrix() is m
    model.items.add("i5", {"title": "lamp", "category": "garden"})
    assert model.items.version == version + 1 and model.items.changed_since(version) == [model.items.lookup("i5")]
