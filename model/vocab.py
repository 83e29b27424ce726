"""Vocabulary growth: new items get ID-embedding rows without a full retrain.

A grown model computes the same function as its parent for every old item and every
history of old items: old rows are copied, new rows appended (docs/model.md, "Continual
learning"). A new item with catalog content starts from a zero ID row, so its
representation is exactly its content vector, the one it already had as a content-only
item; without content it starts from the mean ID row of the items it co-occurs with, so
it ranks next to them before any gradient step.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Iterable, Sequence

import torch

from model.features import ItemIndex, RawEvent, item_ids
from model.transformer import SeqRec


def untrained(model: SeqRec, item: str) -> bool:
    """The item has no ID row of its own in `model` (unknown, or known only by its content)."""
    return model.items.index.get(item, model.items.n_trained + 1) > model.items.n_trained


def neighbours(histories: Iterable[Sequence[RawEvent]], wanted: set[str], span: int = 2) -> dict[str, Counter]:
    """For each wanted item, how often each other item occurs within `span` item events of it
    (events that took an item: a dismissed item is no neighbour)."""
    out: dict[str, Counter] = {i: Counter() for i in wanted}
    for h in histories:
        items = item_ids(h)
        for p, item in enumerate(items):
            if item in out:
                near = items[max(0, p - span): p] + items[p + 1: p + 1 + span]
                out[item].update(x for x in near if x != item)
    return out


def grow(model: SeqRec, new_items: Sequence[str], near: dict[str, Counter] | None = None) -> SeqRec:
    """A copy of `model` whose trained vocabulary also holds `new_items` (appended, in order).

    Items already trained are ignored. Catalog items known only by content keep their content."""
    old = model.items
    add = [i for i in dict.fromkeys(new_items) if untrained(model, i)]
    ids = old.ids[1: old.n_trained + 1] + add
    cfg = replace(model.cfg, n_items=len(ids))
    grown = SeqRec(cfg, ItemIndex(ids, cfg, old.meta or None)).to(model.device)
    state = {k: v for k, v in model.state_dict().items() if k != "id_emb.weight"}
    w_old = model.id_emb.weight.detach()
    w = torch.zeros(cfg.n_items + 1, cfg.dim, device=w_old.device, dtype=w_old.dtype)
    w[: old.n_trained + 1] = w_old
    for r, item in enumerate(add, start=old.n_trained + 1):
        if item in old.meta:
            continue  # content carries it: zero ID row keeps its current vector
        rows = [(old.index[x], c) for x, c in (near or {}).get(item, Counter()).items()
                if 0 < old.index.get(x, 0) <= old.n_trained]
        if rows:
            idx = torch.tensor([i for i, _ in rows], device=w.device)
            wt = torch.tensor([float(c) for _, c in rows], device=w.device, dtype=w.dtype)
            w[r] = (w_old[idx] * wt[:, None]).sum(0) / wt.sum()
    state["id_emb.weight"] = w
    grown.load_state_dict(state)
    return grown.train(model.training)
