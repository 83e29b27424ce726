"""Checkpoint directory = weights.safetensors + checkpoint.json. No pickle
(docs/design.md, "No unsafe deserialisation").

The JSON carries everything needed to rebuild the exact model: config, item vocabulary
(order = ID-embedding row), catalog content for content embeddings, plus provenance
(version id, data fingerprint, validation metrics) for the serving side and humans.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.features import ItemIndex
from model.transformer import SeqRec
from stream_app.errors import UserError

FORMAT = "streamrec-seqrec/1"
WEIGHTS, META, MANIFEST = "weights.safetensors", "checkpoint.json", "manifest.json"


def save(out_dir: str, model: SeqRec, meta: dict[str, Any] | None = None) -> str:
    """Write the checkpoint; returns its version id (UTC time + weights hash)."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}  # index tensors (the transition table) stay integers
    path = os.path.join(out_dir, WEIGHTS)
    save_file(state, path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:10]
    version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + digest
    items = model.items
    doc = {
        "format": FORMAT,
        "version": version,
        "created_at": time.time(),
        "config": model.cfg.to_dict(),
        "items": items.ids[1 : items.n_trained + 1],
        "catalog": items.meta,
        **(meta or {}),
    }
    tmp = os.path.join(out_dir, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, os.path.join(out_dir, META))
    return version


def publish(root: str, model: SeqRec, meta: dict[str, Any], manifest: dict[str, Any], keep: int = 0) -> str:
    """Write a checkpoint as `root/<version>`, atomically: it is written in full under a hidden
    temporary name, then renamed (docs/design.md, "Published checkpoints are whole"), so a
    reader never sees a half-written one. `manifest.json` records where it came from. With
    `keep`, only the newest `keep` directories that carry a manifest stay."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{uuid.uuid4().hex}")
    try:
        version = save(tmp, model, {**meta, "parent": manifest.get("parent")})
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"version": version, **manifest}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(root, version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        prune(root, keep)
    return version


def prune(root: str, keep: int) -> None:
    """Remove all but the newest `keep` manifest-carrying checkpoints (hand-made ones stay)."""
    made = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
            and os.path.isfile(os.path.join(e.path, MANIFEST))]
    made.sort(key=lambda e: os.stat(os.path.join(e.path, META)).st_mtime if os.path.isfile(
        os.path.join(e.path, META)) else 0.0)
    for e in made[: max(0, len(made) - keep)]:
        shutil.rmtree(e.path, ignore_errors=True)


def load(ckpt_dir: str, device: torch.device | str = "cpu") -> tuple[SeqRec, dict[str, Any]]:
    """Rebuild the model (eval mode) and return it with the checkpoint's JSON metadata."""
    meta_path, w_path = os.path.join(ckpt_dir or "", META), os.path.join(ckpt_dir or "", WEIGHTS)
    if not os.path.isfile(meta_path) or not os.path.isfile(w_path):
        raise UserError(f"{ckpt_dir!r} is not a checkpoint directory (needs {META} and {WEIGHTS}); "
                        "pass the --out DIR of `streamrec train`")
    with open(meta_path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise UserError(f"{meta_path} has format {doc.get('format')!r}, expected {FORMAT}; retrain with this version")
    cfg = ModelConfig.from_dict(doc["config"])
    items = ItemIndex(doc["items"], cfg, doc.get("catalog") or None)
    model = SeqRec(cfg, items)
    model.load_state_dict(load_file(w_path))
    return model.to(device).eval(), doc
