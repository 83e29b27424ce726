"""Why each recommended item is there: one short string per item, cheap enough for every
published list (docs/contracts.md, "Reasons").

A reason is `kind` or `kind:ref`, where the ref is an item id, a search query or a
category (split at the first colon):

| kind | meaning |
|---|---|
| `search:<query>` | it matches the user's latest search (a query word in its title or category) |
| `follows:<item_id>` | shoppers go to it next from an item the user just had (the transition term, or co-occurrence) |
| `like:<item_id>` | its vector is closest to that item's among the user's recent items (the transformer's view) |
| `similar:<item_id>` | on an item page: shown because it is like that item |
| `trending` / `trending:<category>` | it trends now (in that category) |
| `popular` | popularity backfill: nothing in the history pointed at it |
| `fallback` | the answer for a user without a list: the most popular items |

For the model the order of precedence is search, follows, like: a matched search is what
the user asked for; the transition term is the strongest, most concrete signal where it
is non-zero; the closest recent item says what the transformer's vector resembles.
All of it is a handful of batched tensor ops per batch plus string formatting per item.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from model.transformer import SeqRec

QUERY_SHOWN = 64  # characters of a query a reason carries
LIKE_WINDOW = 10  # recent item events the `like` reason looks at
_WORD = re.compile(r"[a-z0-9]{3,}")


def reason(kind: str, ref: str | None = None) -> str:
    return f"{kind}:{ref}" if ref else kind


def words(text: str | None) -> frozenset[str]:
    """Lower-case words of three letters or more: what a search and a title share."""
    return frozenset(_WORD.findall(text.lower())) if text else frozenset()


def search_match(query_words: frozenset[str], meta: Mapping[str, object] | None) -> bool:
    if not query_words or not meta:
        return False
    return bool(query_words & (words(str(meta.get("title") or "")) | words(str(meta.get("category") or ""))))


@torch.inference_mode()
def explain(model: SeqRec, matrix: torch.Tensor, recent: Sequence[Sequence[int]],
            picked: Sequence[Sequence[int]], searches: Sequence[str | None] | None = None) -> list[list[str]]:
    """Reasons for each user's `picked` item indices. `recent`: each user's item indices,
    oldest first (LIKE_WINDOW or more of them); `searches`: each user's latest search query
    within their last `trans_window` events, or None."""
    B = len(picked)
    K = max((len(p) for p in picked), default=0)
    if not B or not K:
        return [[] for _ in range(B)]
    dev = matrix.device
    P = _padded(picked, K, dev, left=False)                              # [B, K]
    R = _padded([list(r)[-LIKE_WINDOW:] for r in recent], LIKE_WINDOW, dev)  # [B, L], newest last
    sim = torch.bmm(matrix[P].float(), matrix[R].float().transpose(1, 2))     # [B, K, L]
    sim = sim.masked_fill((R == 0)[:, None, :], float("-inf"))
    like = R.gather(1, sim.argmax(2)).masked_fill(torch.isinf(sim.max(2).values), 0)  # [B, K]
    follows = _follows(model, R, P)
    follows = follows.tolist() if follows is not None else [[0] * K] * B  # one transfer: no tensor indexing per item
    like = like.tolist()
    ids, meta = model.items.ids, model.items.meta
    out = []
    for b in range(B):
        query = searches[b] if searches is not None else None
        qw = words(query)
        row = []
        for j, item in enumerate(picked[b]):
            if qw and search_match(qw, meta.get(ids[item])):
                row.append(reason("search", query[:QUERY_SHOWN]))
            elif follows[b][j]:
                row.append(reason("follows", ids[follows[b][j]]))
            elif like[b][j]:
                row.append(reason("like", ids[like[b][j]]))
            elif query:
                row.append(reason("search", query[:QUERY_SHOWN]))
            else:
                row.append(reason("popular"))
        out.append(row)
    return out


def _follows(model: SeqRec, R: torch.Tensor, P: torch.Tensor) -> torch.Tensor | None:
    """[B, K] the recent item with the largest distance-weighted share P(item | recent) / d
    over the hybrid's window (0: none), or None where the model has no transition term."""
    cfg, t = model.cfg, model.transition
    if cfg.trans_weight <= 0 or not t.entries:
        return None
    w = min(cfg.trans_window, R.shape[1])
    src = R[:, -w:]                                                      # newest last: distance w..1
    dist = torch.arange(w, 0, -1, device=R.device, dtype=torch.float32)
    rows = src[:, None, :].expand(-1, P.shape[1], -1)
    cols = P[:, :, None].expand(-1, -1, w)
    share = t.share_of(rows.reshape(-1), cols.reshape(-1)).view(rows.shape) / dist
    best, arg = share.max(2)
    return torch.where(best > 0, src.gather(1, arg), torch.zeros_like(arg))


def _padded(rows: Sequence[Sequence[int]], width: int, device: torch.device, left: bool = True) -> torch.Tensor:
    """Padded with 0 (the OOV row) to `width`: on the left keeping each row's newest entries
    (histories, newest last), or on the right (lists, best first)."""
    data = []
    for r in rows:
        r = list(r)[-width:] if left else list(r)[:width]
        pad = [0] * (width - len(r))
        data.append(pad + r if left else r + pad)
    return torch.tensor(data, dtype=torch.long, device=device)
