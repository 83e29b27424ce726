"""Causal band-attention transformer over a user's raw event sequence.

Why band attention with a learned *relative* bias: a query at step t sees only keys at
t-W+1..t, weighted by a bias indexed by distance t-j. Cached keys/values therefore never
change when a new event arrives, and the newest output depends only on the last
`receptive_field` events, so the streaming KV-cache path (model/cache.py) and the offline
forward over any stored history agree to float rounding (docs/design.md, "Exact incremental inference"). The same
mask is used in training, so there is no train/serve skew.

Scores are dot products with the same item representations used as inputs (tied), plus
the item-transition term of model/transition.py when the checkpoint carries one (the hybrid).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from model.config import ModelConfig
from model.features import EVENT_TYPES, Batch, ItemIndex, encode
from model.transition import Transition

KVHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
NEG = float("-inf")


def _bag_mean(emb: nn.Embedding, tok: torch.Tensor) -> torch.Tensor:
    """Mean of non-padding token embeddings (padding masked explicitly, not trusted to be 0)."""
    keep = (tok > 0).unsqueeze(-1).to(emb.weight.dtype)
    return (emb(tok) * keep).sum(-2) / keep.sum(-2).clamp(min=1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.rel_bias = nn.Parameter(torch.zeros(cfg.n_heads, cfg.window))  # by distance 0..W-1
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, dist: torch.Tensor, kv: KVHook | None = None):
        """x [B,T,D]; dist [B|1,T,S] distance index into rel_bias; mask [B|1,T,S] True = may attend.

        Without `kv`, keys are x itself (S = T). With `kv` (serving), the hook stores the new
        keys/values in the cache and returns the whole window (S = W).
        """
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        new_k, new_v = k, v
        if kv is not None:
            k, v = kv(k, v)
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        bias = self.rel_bias[:, dist].permute(1, 0, 2, 3).to(att.dtype)  # [B|1,H,T,S]
        att = (att + bias).masked_fill(~mask[:, None], NEG)
        att = self.drop(torch.softmax(att.float(), dim=-1).to(v.dtype))
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.drop(self.proj(y)), new_k, new_v


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_mult * cfg.dim), nn.GELU(),
            nn.Linear(cfg.mlp_mult * cfg.dim, cfg.dim), nn.Dropout(cfg.dropout),
        )

    def forward(self, x, mask, dist, kv: KVHook | None = None):
        a, k, v = self.attn(self.ln1(x), mask, dist, kv)
        x = x + a
        return x + self.mlp(self.ln2(x)), k, v


class SeqRec(nn.Module):
    def __init__(self, cfg: ModelConfig, items: ItemIndex | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = items if items is not None else ItemIndex([str(i) for i in range(1, cfg.n_items + 1)], cfg)
        D = cfg.dim
        self.id_emb = nn.Embedding(cfg.n_items + 1, D, padding_idx=0)
        self.content_emb = nn.Embedding(cfg.content_buckets, D, padding_idx=0)
        self.query_emb = nn.Embedding(cfg.query_buckets, D, padding_idx=0)
        self.type_emb = nn.Embedding(len(EVENT_TYPES), D)
        self.gap_emb = nn.Embedding(cfg.gap_buckets, D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D)
        self.transition = Transition()  # filled by `streamrec train`; empty = transformer alone
        for emb in (self.id_emb, self.content_emb, self.query_emb, self.type_emb, self.gap_emb):
            nn.init.normal_(emb.weight, std=0.02)
            if emb.padding_idx is not None:
                with torch.no_grad():
                    emb.weight[emb.padding_idx].zero_()
        self._item_cache: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.id_emb.weight.device

    # ---- item side -------------------------------------------------------------------
    def _item_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ItemIndex tensors on the model's device, re-copied only when the index changed."""
        id_row, content = self.items.tensors()
        c = self._item_cache
        if c.get("version") != self.items.version or c.get("device") != self.device:
            self._item_cache = c = {"version": self.items.version, "device": self.device,
                                    "t": (id_row.to(self.device), content.to(self.device))}
        return c["t"]

    def item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """ID embedding (zero for OOV/new items) + mean of hashed content-token embeddings."""
        id_row, content = self._item_tables()
        out = self.id_emb(id_row[idx])
        if self.items.has_content:
            out = out + _bag_mean(self.content_emb, content[idx])
        return out

    def item_matrix(self, idx: torch.Tensor | None = None, chunk: int = 65_536) -> torch.Tensor:
        """[N, D] representations of every ItemIndex entry (row 0 = OOV), or of `idx`; in
        chunks, so a million-item catalog needs no [N, tokens, D] intermediate at once."""
        if idx is None:
            idx = torch.arange(len(self.items), device=self.device)
        return torch.cat([self.item_vectors(idx[i : i + chunk]) for i in range(0, len(idx), chunk)])

    def scores(self, user_vectors: torch.Tensor, recent: Sequence[Sequence[int]] | None = None,
               matrix: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] served score of every ItemIndex entry: u · M, plus the transition term over each
        user's `recent` item indices (newest last). The one scoring function of training's
        validation, `eval`, the learner's gate and the worker (docs/design.md, "Live equals offline")."""
        M = self.item_matrix() if matrix is None else matrix
        s = user_vectors.to(M.dtype) @ M.T
        if recent is not None and self.cfg.trans_weight > 0:
            self.transition.add_to(s, recent, self.cfg.trans_window, self.cfg.trans_weight, self.cfg.trans_eps)
        return s

    def recent_items(self, item_ids: Sequence[Sequence[str]]) -> list[list[int]]:
        """Each user's last trans_window item indices (oldest first) from their item ids."""
        look, w = self.items.lookup, self.cfg.trans_window
        return [[look(i) for i in ids[-w:]] for ids in item_ids]

    # ---- sequence side ---------------------------------------------------------------
    def embed(self, b: Batch) -> torch.Tensor:
        x = self.item_vectors(b.item) + self.type_emb(b.etype) + self.gap_emb(b.gap)
        if b.qtok.shape[0] > 1:
            x = x + _bag_mean(self.query_emb, b.qtok[b.qidx])
        return self.drop(x)

    def band(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Band-causal mask [B,T,T] and distance index [1,T,T]. Padding keys are masked; every
        query may see itself so padded rows stay finite (their outputs are never used)."""
        T = valid.shape[1]
        pos = torch.arange(T, device=valid.device)
        rel = pos[:, None] - pos[None, :]
        inband = (rel >= 0) & (rel < self.cfg.window)
        mask = (inband[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device)[None]
        return mask, rel.clamp(0, self.cfg.window - 1)[None]

    def forward(self, b: Batch, return_kv: bool = False):
        """Hidden states [B,T,D] for every position (training uses all of them)."""
        x = self.embed(b)
        mask, dist = self.band(b.valid)
        kvs = []
        for blk in self.blocks:
            x, k, v = blk(x, mask, dist)
            if return_kv:
                kvs.append((k, v))
        x = self.ln_f(x)
        return (x, kvs) if return_kv else x

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[Sequence[Any]], truncate: bool = True) -> torch.Tensor:
        """Offline reference: output at each history's last event. With `truncate` only the last
        receptive_field events are run, which is exact, not an approximation."""
        was = self.training
        self.eval()
        b = encode(histories, self.items, self.cfg.receptive_field if truncate else None).to(self.device)
        out = self(b)[:, -1]
        self.train(was)
        return out
