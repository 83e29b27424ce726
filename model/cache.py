"""Serving-side state: a slot-based KV-cache pool and top-K scoring.

The stream processor owns the user -> slot LRU map and the memory budget (it sizes the
pool with `bytes_per_slot()`); this module only does tensor work on whole batches of
slots, so the hot path has no per-user Python loop beyond building index lists.

Layout per layer: K and V as [n_slots, heads, W, head_dim] ring buffers. Event number n
(0-based since the slot's last rebuild) lives at ring position n % W; a key's distance
from the newest query is (write_pos - ring_pos) mod W, valid while it is < events seen.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model.features import ItemIndex, encode, with_room
from model.retrieval import ANNIndex
from model.transformer import SeqRec


def pick_device(flag: str | None = None) -> torch.device:
    """`auto` (or None) -> CUDA when present, else CPU."""
    if flag in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(flag)


class KVCachePool:
    """Fixed pool of per-user KV caches. Runs `model` on the pool's device/dtype (moves it)."""

    def __init__(self, model: SeqRec, n_slots: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        cfg = model.cfg
        self.cfg, self.n_slots, self.W = cfg, n_slots, cfg.window
        shape = (n_slots, cfg.n_heads, cfg.window, cfg.dim // cfg.n_heads)
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = torch.zeros(n_slots, dtype=torch.long, device=self.device)  # events since rebuild
        self.last_ts: list[float | None] = [None] * n_slots
        self._ring = torch.arange(cfg.window, device=self.device)

    def bytes_per_slot(self) -> int:
        return self.slot_bytes(self.cfg, self.dtype)

    @staticmethod
    def slot_bytes(cfg, dtype: torch.dtype = torch.float32) -> int:
        """Memory of one slot (K and V for every layer, plus length and last ts), so a
        caller can size the pool from a budget before creating it."""
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.n_layers * cfg.dim * cfg.window * elem + 8 + 8

    def reset(self, slots: torch.Tensor) -> None:
        """Forget slots (eviction); they must be rebuilt before the next step."""
        self.length[slots.to(self.device)] = 0
        for s in slots.tolist():
            self.last_ts[s] = None

    @torch.inference_mode()
    def rebuild(self, slots: torch.Tensor, histories: Sequence[Sequence[Any]]) -> torch.Tensor:
        """Fill slots from stored raw histories (any lengths, one batched forward) -> [B, D].

        Only the last receptive_field events are run; that is exact (see transformer.py).
        """
        slots = slots.to(self.device)
        R, W = self.cfg.receptive_field, self.W
        b = encode(histories, self.model.items, R).to(self.device)
        h, kvs = self.model(b, return_kv=True)
        B, T = b.valid.shape
        n = b.valid.sum(1)                                     # events actually run, <= R
        j = (n - 1)[:, None] - ((n - 1)[:, None] - self._ring[None]) % W   # event held by ring slot r
        col = (T - n)[:, None] + j.clamp(min=0)                 # its column in the left-padded batch
        for layer, (k, v) in enumerate(kvs):
            idx = col[:, None, :, None].expand(B, k.shape[1], W, k.shape[3])
            self.k[layer][slots] = k.gather(2, idx).to(self.dtype)
            self.v[layer][slots] = v.gather(2, idx).to(self.dtype)
        self.length[slots] = n
        for s, hist in zip(slots.tolist(), histories):
            self.last_ts[s] = _ts(hist[-1]) if len(hist) else None
        return torch.where((n > 0)[:, None], h[:, -1], torch.zeros_like(h[:, -1]))

    @torch.inference_mode()
    def step(self, slots: torch.Tensor, new_events: Sequence[Any]) -> torch.Tensor:
        """Append one event to each (distinct) slot and return the new user vectors [B, D].

        The one-new-event path, the common case of a live stream, written out per layer
        rather than through `Block.forward` and a cache hook: one query per user needs no
        causal mask among new tokens, so the attention is a single fused
        `scaled_dot_product_attention` over the ring with the distance bias as an additive
        mask, and q, k, v come from one unbind. It computes the same function as `append`
        with one event (docs/design.md, "Exact incremental inference").
        """
        slots = slots.to(self.device)
        if len(set(slots.tolist())) != len(slots):
            raise ValueError("step(): one new event per slot per call (coalesce or split the batch)")
        W, H = self.W, self.cfg.n_heads
        prev = [self.last_ts[s] for s in slots.tolist()]
        b = encode([[e] for e in new_events], self.model.items, 1, prev_ts=prev).to(self.device)
        length = self.length[slots]
        pos = length % W                                        # ring position of the new event
        dist = (pos[:, None] - self._ring[None]) % W            # [B, W]
        exists = dist <= length[:, None]                        # entries written since the rebuild
        x = self.model.embed(b)                                 # [B, 1, D]
        B, _, D = x.shape
        for layer, blk in enumerate(self.model.blocks):
            attn, kc, vc = blk.attn, self.k[layer], self.v[layer]
            q, k, v = attn.qkv(blk.ln1(x)).view(B, 3, H, D // H).unbind(1)      # [B, H, hd] each
            kc[slots, :, pos], vc[slots, :, pos] = k.to(kc.dtype), v.to(vc.dtype)
            bias = attn.rel_bias[:, dist].transpose(0, 1).to(kc.dtype)          # [B, H, W]
            bias = bias.masked_fill(~exists[:, None, :], float("-inf"))
            y = F.scaled_dot_product_attention(q[:, :, None].to(kc.dtype), kc.index_select(0, slots),
                                               vc.index_select(0, slots), attn_mask=bias[:, :, None])  # [B,H,1,hd]
            x = x + attn.proj(y.reshape(B, 1, D).to(x.dtype))
            x = x + blk.mlp(blk.ln2(x))
        self.length[slots] = length + 1
        for s, e in zip(slots.tolist(), new_events):
            self.last_ts[s] = _ts(e)
        return self.model.ln_f(x)[:, 0]

    @torch.inference_mode()
    def append(self, slots: torch.Tensor, new_events: Sequence[Sequence[Any]]) -> torch.Tensor:
        """Append 1..W events to each (distinct) slot in one pass -> user vectors after the last.

        Cost is one token per new event and a single forward for the whole batch, where
        `step` would need one call per event. Each new token attends over the old ring (W
        keys, read before it is overwritten) plus the new tokens before it, with distances
        from absolute positions, so the result equals stepping the events one by one.
        """
        slots = slots.to(self.device)
        if len(set(slots.tolist())) != len(slots):
            raise ValueError("append(): each slot at most once per call")
        W = self.W
        n = torch.tensor([len(e) for e in new_events], device=self.device)
        if int(n.min()) < 1 or int(n.max()) > W:
            raise ValueError(f"append(): 1..{W} events per slot")
        B, T = len(new_events), int(n.max())
        prev = [self.last_ts[s] for s in slots.tolist()]
        b = encode(new_events, self.model.items, None, prev_ts=prev).to(self.device)  # left-padded [B, T]
        length = self.length[slots]                                   # events before this call
        j = torch.arange(T, device=self.device)[None] - (T - n)[:, None]   # chunk index per column, <0 = pad
        qpos = length[:, None] + j                                    # absolute position per column
        back = (length[:, None] - 1 - self._ring[None]) % W           # ring entry r is this far behind the newest
        rpos = length[:, None] - 1 - back                             # absolute position held by ring entry r
        ring_ok = back < length[:, None]                              # filled entries
        d_ring = qpos[:, :, None] - rpos[:, None, :]                  # [B, T, W]
        d_new = j[:, :, None] - j[:, None, :]                         # [B, T, T]
        dist = torch.cat([d_ring, d_new], 2)
        key_ok = torch.cat([ring_ok[:, None, :].expand(B, T, W), (j >= 0)[:, None, :].expand(B, T, T)], 2)
        mask = key_ok & (dist >= 0) & (dist < W)
        mask[:, :, W:] |= torch.eye(T, dtype=torch.bool, device=self.device)[None]  # pad rows stay finite
        dist = dist.clamp(0, W - 1)
        bi, ci = (j >= 0).nonzero(as_tuple=True)                      # real new tokens
        write_slot, write_pos = slots[bi], qpos[bi, ci] % W
        x = self.model.embed(b)
        for layer, blk in enumerate(self.model.blocks):
            kc, vc = self.k[layer], self.v[layer]

            def hook(k: torch.Tensor, v: torch.Tensor, kc=kc, vc=vc):
                old_k, old_v = kc[slots], vc[slots]                   # copies, read before writing
                kc[write_slot, :, write_pos] = k[bi, :, ci]
                vc[write_slot, :, write_pos] = v[bi, :, ci]
                return torch.cat([old_k, k.to(old_k.dtype)], 2), torch.cat([old_v, v.to(old_v.dtype)], 2)

            x, _, _ = blk(x, mask, dist, hook)
        self.length[slots] = length + n
        for s, evs in zip(slots.tolist(), new_events):
            self.last_ts[s] = _ts(evs[-1])
        return self.model.ln_f(x)[:, -1]


def _ts(e: Any) -> float:
    from model.features import RawEvent
    return RawEvent.coerce(e).ts


def topk(user_vectors: torch.Tensor, item_matrix: torch.Tensor, k: int,
         exclude: Sequence[Sequence[int]] | None = None,
         blocked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k item indices by dot product (the transformer alone); see `masked_topk`."""
    return masked_topk(user_vectors.to(item_matrix.dtype) @ item_matrix.T, k, exclude, blocked)


def masked_topk(scores: torch.Tensor, k: int, exclude: Sequence[Sequence[int]] | None = None,
                blocked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `scores` [B, N] (changed in place); row 0 (OOV), each user's `exclude` and the
    global `blocked` indices (e.g. unavailable items) are never returned (their score is -inf)."""
    scores[:, 0] = float("-inf")
    if blocked is not None and len(blocked):
        scores[:, blocked.to(scores.device)] = float("-inf")
    if exclude:  # one scatter for the batch: with exclude_seen=interacted a user may bring ~100 items
        cols = torch.tensor(list(itertools.chain.from_iterable(exclude)), dtype=torch.long)
        if len(cols):
            rows = torch.repeat_interleave(torch.arange(len(exclude)), torch.tensor([len(ex) for ex in exclude]))
            scores[rows.to(scores.device), cols.to(scores.device)] = float("-inf")
    k = min(k, scores.shape[1] - 1)
    return torch.topk(scores, k, dim=1)


MAX_REFRESHES = 20  # checkpoint swaps that keep the old links before the graph is built anew


class ItemScorer:
    """Caches the item matrix and patches only the rows of items added or updated since (the
    ItemIndex logs them), so a catalog upsert is recommendable at once, without retraining,
    restart, or recomputing a million-item matrix. With an `ANNIndex` (model/retrieval.py)
    it ranks in two stages: graph candidates, then the served score on those alone."""

    def __init__(self, model: SeqRec, dtype: torch.dtype | None = None, ann: dict | None = None,
                 previous: tuple[ANNIndex, list[str]] | None = None) -> None:
        """`ann`: ANNIndex options plus `candidates` (C, graph results per user before the
        filters); None = exact scoring of every item. `previous`: the served model's graph
        and its item ids, whose links a new checkpoint keeps (`ANNIndex.refreshed`)."""
        self.model, self.dtype = model, dtype
        self._version = -1
        self._matrix: torch.Tensor | None = None
        self.ann = dict(ann) if ann is not None else None
        self.candidates = self.ann.pop("candidates", 100) if self.ann is not None else 0
        self.index: ANNIndex | None = None
        self.previous = previous
        self.exact_fallbacks = 0  # users the candidates could not fill K for (scored exactly)

    @property
    def items(self) -> ItemIndex:
        return self.model.items

    @torch.inference_mode()
    def matrix(self) -> torch.Tensor:
        items, m = self.items, self._matrix
        if m is not None and self._version == items.version:
            return m
        changed = None if m is None else items.changed_since(self._version)
        if changed is None or len(changed) > len(items) // 4:
            m = self._vectors(None)
            if self.ann is not None:
                self.index = self._graph(m)
        else:
            m = with_room(m, len(items))[: len(items)]
            idx = torch.tensor(sorted(set(changed)), device=m.device)
            m[idx] = self._vectors(idx)
            if self.index is not None:
                self.index.add(idx.cpu().numpy(), m[idx])
        self._matrix, self._version = m, items.version
        return m

    def _graph(self, m: torch.Tensor) -> ANNIndex:
        """The previous model's links with this matrix where it is compatible, else a build."""
        prev, self.previous = self.previous, None
        if prev is not None:
            index, old_ids = prev
            if (index.graph.d == m.shape[1] and index.refreshes < MAX_REFRESHES
                    and index.threads == self.ann.get("threads", 1)):
                rows = self.items.index
                return index.refreshed(m, np.array([rows.get(i, 0) for i in old_ids], dtype=np.int64))
        return ANNIndex.build(m, **self.ann)

    def _vectors(self, idx: torch.Tensor | None) -> torch.Tensor:
        v = self.model.item_matrix(idx)
        return v.to(self.dtype) if self.dtype is not None else v

    def topk(self, user_vectors: torch.Tensor, k: int, exclude: Sequence[Sequence[int]] | None = None,
             blocked: torch.Tensor | None = None,
             recent: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k by the model's served score (the hybrid when the checkpoint has a transition
        table; `recent` = each user's last item indices), never excluded or blocked items."""
        with torch.inference_mode():
            M = self.matrix()
            if self.index is None:
                return masked_topk(self.model.scores(user_vectors, recent, M), k, exclude, blocked)
            scores, idx = self._two_stage(user_vectors, M, k, exclude, blocked, recent)
            short = (~torch.isfinite(scores)).any(1).nonzero().flatten().tolist()
            if short:  # exclusions or filters ate the candidates: those users are scored exactly
                self.exact_fallbacks += len(short)
                sub = [exclude[i] for i in short] if exclude else None
                subr = [recent[i] for i in short] if recent is not None else None
                s2, i2 = masked_topk(self.model.scores(user_vectors[short], subr, M), k, sub, blocked)
                scores, idx = scores.clone(), idx.clone()
                scores[short, : s2.shape[1]], idx[short, : i2.shape[1]] = s2, i2
            return scores, idx

    def _two_stage(self, u: torch.Tensor, M: torch.Tensor, k: int, exclude, blocked, recent):
        """Candidates: the graph's C (plus room for each user's exclusions) and the
        transition term's non-zero columns; each scored exactly as `SeqRec.scores` would."""
        B, n, cfg = len(u), len(M), self.model.cfg
        widest = max((len(e) for e in exclude), default=0) if exclude else 0
        cand = self.index.search(u, max(self.candidates, k) + widest, blocked).to(M.device)
        key = torch.zeros(0, dtype=torch.long)
        if recent is not None and cfg.trans_weight > 0:
            key, bonus = self.model.transition.bonus(recent, cfg.trans_window, cfg.trans_weight, cfg.trans_eps, n)
            key, bonus = key.to(M.device), bonus.to(M.device)
        if len(key):
            rows, per_row = key // n, torch.bincount(key // n, minlength=B)
            extra = torch.zeros(B, int(per_row.max()), dtype=torch.long, device=M.device)
            extra[rows, torch.arange(len(key), device=M.device) - (torch.cumsum(per_row, 0) - per_row)[rows]] = key % n
            cand = torch.cat([cand, extra], 1)
        cand = cand.sort(1).values
        cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = 0  # duplicates (stale copies, transition columns)
        s = torch.bmm(M[cand], u.to(M.dtype)[:, :, None]).squeeze(2)
        ck = torch.arange(B, device=M.device)[:, None] * n + cand
        if len(key):
            pos = torch.searchsorted(key, ck).clamp(max=len(key) - 1)
            s += torch.where(key[pos] == ck, bonus[pos].to(s.dtype), torch.zeros((), dtype=s.dtype, device=s.device))
        invalid = cand == 0
        if blocked is not None and len(blocked):
            invalid |= torch.isin(cand, blocked.to(M.device))
        if exclude and any(exclude):
            ex = torch.tensor([b * n + i for b, row in enumerate(exclude) for i in row], device=M.device)
            invalid |= torch.isin(ck, ex)
        s[invalid] = float("-inf")
        top_s, top_i = torch.topk(s, min(k, n - 1, s.shape[1]), dim=1)
        return top_s, cand.gather(1, top_i)

    def item_ids(self, indices: torch.Tensor) -> list[list[str]]:
        ids = self.items.ids
        return [[ids[i] for i in row] for row in indices.tolist()]
