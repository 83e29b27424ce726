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
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.event_types import EVENT_TYPES, FIRST_TYPES
from model.features import ItemIndex
from model.transformer import SeqRec
from stream_app.errors import UserError

FORMAT = "streamrec-seqrec/1"
WEIGHTS, META, MANIFEST = "weights.safetensors", "checkpoint.json", "manifest.json"
# checkpoint.json holds the vocabulary and the catalog, so it grows with them (~100 bytes per
# item); the cap only keeps a stray multi-GB file from being read into memory. A manifest is small.
MAX_META_BYTES, MAX_MANIFEST_BYTES = 1 << 30, 1 << 20
REJECT_REASONS = ("incomplete", "corrupt", "oversized", "format", "config", "shape")


class BadCheckpoint(UserError):
    """A directory that cannot be served, and why: `reason` is one of REJECT_REASONS (a metric
    label). The server skips it for an older one instead of failing (docs/design.md,
    "Published checkpoints are whole")."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(" ".join(message.split()))  # one line, whatever an exception said
        self.reason = reason


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


def publish(root: str, model: SeqRec, meta: dict[str, Any], manifest: dict[str, Any], keep: int = 0,
            step: Callable[[str], None] | None = None) -> str:
    """Write a checkpoint as `root/<version>`, crash-safe: it is written in full under a hidden
    temporary name, every file and the directory are fsynced, then it is renamed and the
    parent fsynced (docs/design.md, "Published checkpoints are whole"), so neither a reader
    nor a power loss ever leaves a visible half-written one. `manifest.json` records where
    it came from, plus the publish `sequence` (one more than any in `root`) and `after`
    (the newest hand-placed checkpoint its lineage descends from) that order checkpoints
    without trusting clocks (`ordered`). With `keep`, only the newest `keep` directories
    that carry a manifest stay. `step(name)` is called after each step ("written", "synced",
    "renamed", "pruned"): where a fault test kills the publisher."""
    step = step or (lambda name: None)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{uuid.uuid4().hex}")
    try:
        seen = _scan(root)
        sequence = 1 + max((e.sequence for e in seen if e.sequence is not None), default=0)
        version = save(tmp, model, {**meta, "parent": manifest.get("parent")})
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"version": version, **manifest, "sequence": sequence,
                       "after": _lineage(seen, manifest.get("parent"))}, f, indent=1)
        step("written")
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        _fsync(tmp)
        step("synced")
        os.rename(tmp, os.path.join(root, version))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    step("renamed")
    _fsync(root)  # the rename itself survives a power loss
    if keep:
        prune(root, keep)
    step("pruned")
    return version


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: str, keep: int) -> None:
    """Remove all but the newest `keep` manifest-carrying checkpoints (hand-made ones stay)."""
    made = [p for p in ordered(root) if (p / MANIFEST).is_file()]
    for p in made[keep:]:
        shutil.rmtree(p, ignore_errors=True)


# ---- ordering: newest first, by publish sequence, not by clocks ----------------------------
class _Entry(NamedTuple):
    path: Path
    mtime: float            # of checkpoint.json: only for checkpoints without a sequence
    sequence: int | None    # from manifest.json (`publish`); None: hand-placed or older
    after: tuple[float, str] | None  # (mtime, name) of the hand-placed checkpoint it supersedes
    version: str | None     # from manifest.json


def _scan(root: str | Path) -> list[_Entry]:
    """Visible checkpoint directories of `root`. Hidden ones are still being written."""
    out = []
    try:
        dirs = [Path(e.path) for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    except OSError:
        return out
    for p in dirs:
        try:
            mtime = (p / META).stat().st_mtime
        except OSError:
            continue
        m = _read_json(p / MANIFEST, MAX_MANIFEST_BYTES) if (p / MANIFEST).is_file() else None
        m = m if isinstance(m, dict) else {}
        seq, after = m.get("sequence"), m.get("after")
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else None
        ok = (isinstance(after, list) and len(after) == 2 and isinstance(after[0], (int, float))
              and isinstance(after[1], str))
        version = m.get("version") if isinstance(m.get("version"), str) else None
        out.append(_Entry(p, mtime, seq, (float(after[0]), after[1]) if ok else None, version))
    return out


def _read_json(path: Path, cap: int) -> Any:
    """The parsed file, or None if it is missing, unreadable or over `cap` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
        return json.loads(data) if len(data) <= cap else None
    except (OSError, ValueError):
        return None


def _key(e: _Entry) -> tuple[float, str]:
    return e.mtime, e.path.name


def _lineage(seen: list[_Entry], parent: str | None) -> list | None:
    """`after` for a checkpoint whose parent is `parent` (a version or a directory name): the
    parent's own `after` if it was published, the parent itself if it was placed by hand. A
    parent not in `root` (removed, or another root's): every hand-placed one visible now."""
    if parent is not None:
        for e in seen:
            if e.sequence is not None and parent in (e.version, e.path.name):
                return list(e.after) if e.after else None
    plain = sorted((e for e in seen if e.sequence is None), key=_key, reverse=True)
    for e in plain if parent is not None else ():
        version = e.version
        if version is None and e.path.name != parent:
            doc = _read_json(e.path / META, MAX_META_BYTES)
            version = doc.get("version") if isinstance(doc, dict) else None
        if parent in (version, e.path.name):
            return list(_key(e))
    return list(_key(plain[0])) if plain else None


def ordered(root: str | Path) -> list[Path]:
    """The visible checkpoints of `root`, newest first. Published ones go by sequence; ones
    without (`streamrec train --out`, copied in, or older) by checkpoint.json's mtime, then
    name; a published one is newer than a hand-placed one iff its lineage descends from it
    or from a newer one. So a learner host's slow clock never hides what it publishes, and
    a full retrain dropped in is served until the learner publishes a descendant of it."""
    entries = _scan(root)
    seq = sorted((e for e in entries if e.sequence is not None), key=lambda e: (e.sequence, e.path.name),
                 reverse=True)
    plain = sorted((e for e in entries if e.sequence is None), key=_key, reverse=True)
    out: list[Path] = []
    i = j = 0
    while i < len(seq) or j < len(plain):
        take_plain = j < len(plain) and (i == len(seq) or seq[i].after is None or _key(plain[j]) > seq[i].after)
        if take_plain:
            out.append(plain[j].path)
            j += 1
        else:
            out.append(seq[i].path)
            i += 1
    return out


# ---- loading: every check before anything is allocated -------------------------------------
def load(ckpt_dir: str, device: torch.device | str = "cpu") -> tuple[SeqRec, dict[str, Any]]:
    """Rebuild the model (eval mode) and return it with the checkpoint's JSON metadata.
    Raises BadCheckpoint (one line, with a reason) for a missing file, unreadable weights or
    JSON, another format, an out-of-bounds config, or weights whose shapes the config does
    not predict; all checked before the model is allocated."""
    where = ckpt_dir or ""
    meta_path, w_path = os.path.join(where, META), os.path.join(where, WEIGHTS)
    missing = [n for n in (META, WEIGHTS) if not os.path.isfile(os.path.join(where, n))]
    if missing:
        raise BadCheckpoint("incomplete", f"{ckpt_dir!r} is not a checkpoint directory (needs {META} and "
                            f"{WEIGHTS}; missing {', '.join(missing)}); pass the --out DIR of `streamrec train`")
    shapes = _weight_shapes(w_path)
    doc = _read_meta(meta_path)
    if doc.get("format") != FORMAT:
        raise BadCheckpoint("format", f"{meta_path} has format {doc.get('format')!r}, expected {FORMAT}; "
                            "retrain with this version")
    try:
        cfg = ModelConfig.from_dict(doc.get("config"))
    except (TypeError, ValueError) as exc:
        raise BadCheckpoint("config", f"{meta_path}: bad config ({exc}); re-publish or retrain it") from None
    items = _items(doc, cfg, meta_path)
    _check_shapes(cfg, items, shapes, w_path)
    model = SeqRec(cfg, items)
    try:
        model.load_state_dict(with_all_types(load_file(w_path)))
    except (SafetensorError, OSError, RuntimeError) as exc:  # e.g. rewritten since its header was read
        raise BadCheckpoint("corrupt", f"{w_path} does not load ({exc}); re-copy or re-publish it") from None
    return model.to(device).eval(), doc


def _weight_shapes(w_path: str) -> dict[str, list[int]]:
    """Tensor shapes from the safetensors header alone (it also checks the file covers them)."""
    try:
        with safe_open(w_path, framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise BadCheckpoint("corrupt", f"{w_path} is unreadable ({exc}); re-copy or re-publish it") from None


def _read_meta(meta_path: str) -> dict[str, Any]:
    try:
        with open(meta_path, "rb") as f:
            too_big = os.fstat(f.fileno()).st_size > MAX_META_BYTES
            data = b"" if too_big else f.read(MAX_META_BYTES + 1)  # it may grow while read
    except OSError as exc:
        raise BadCheckpoint("incomplete", f"{meta_path} is unreadable ({exc})") from None
    if too_big or len(data) > MAX_META_BYTES:
        raise BadCheckpoint("oversized", f"{meta_path} is over {MAX_META_BYTES >> 20} MiB; not a checkpoint's JSON")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise BadCheckpoint("corrupt", f"{meta_path} is not JSON ({exc}); re-copy or re-publish it") from None
    if not isinstance(doc, dict):
        raise BadCheckpoint("corrupt", f"{meta_path} is not a JSON object; re-copy or re-publish it")
    return doc


def _items(doc: dict[str, Any], cfg: ModelConfig, meta_path: str) -> ItemIndex:
    ids, catalog = doc.get("items"), doc.get("catalog") or None
    if not isinstance(ids, list) or len(ids) != cfg.n_items or not all(isinstance(i, str) for i in ids) \
            or len(set(ids)) != len(ids):
        raise BadCheckpoint("config", f"{meta_path}: items must be {cfg.n_items} distinct strings (config "
                            "n_items); re-publish or retrain it")
    if catalog is not None and not (isinstance(catalog, dict) and all(isinstance(m, dict) for m in catalog.values())):
        raise BadCheckpoint("config", f"{meta_path}: catalog must map item ids to objects; re-publish or retrain it")
    return ItemIndex(ids, cfg, catalog)


TYPE_EMB = "type_emb.weight"


def with_all_types(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint trained before an event type existed (`dismiss`: 5 rows) gets a zero row
    for each type it never saw, so it keeps serving: it reads such an event as its item
    with no type signal, until a retrain or the continual learner learns the row
    (docs/model.md, "Dismissals"). Types are only appended (model/event_types.py)."""
    emb = state.get(TYPE_EMB)
    if emb is not None and emb.shape[0] < len(EVENT_TYPES):
        state[TYPE_EMB] = torch.cat([emb, emb.new_zeros(len(EVENT_TYPES) - emb.shape[0], *emb.shape[1:])])
    return state


def _check_shapes(cfg: ModelConfig, items: ItemIndex, shapes: dict[str, list[int]], w_path: str) -> None:
    """The weights must be exactly the tensors this config builds (the model is built on the
    meta device: shapes, no memory); the transition table's size is data, only consistent."""
    with torch.device("meta"):
        want = {k: list(v.shape) for k, v in SeqRec(cfg, items).state_dict().items()
                if not k.startswith("transition.")}
    got = {k: v for k, v in shapes.items() if not k.startswith("transition.")}
    old = got.get(TYPE_EMB)
    if old and FIRST_TYPES <= old[0] < len(EVENT_TYPES) and old[1:] == want[TYPE_EMB][1:]:
        got[TYPE_EMB] = want[TYPE_EMB]  # trained before the newer event types: padded on load
    table = {k.removeprefix("transition."): v for k, v in shapes.items() if k.startswith("transition.")}
    bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    if bad:
        k = bad[0]
        raise BadCheckpoint("shape", f"{w_path}: {k} has shape {got.get(k)}, the config needs {want.get(k)} "
                            f"({len(bad)} tensor(s) differ); re-publish or retrain it")
    if table and not (set(table) == {"indptr", "cols", "counts", "totals"}
                      and all(len(s) == 1 for s in table.values())
                      and table["indptr"][0] == table["totals"][0] + 1 and table["counts"] == table["cols"]):
        raise BadCheckpoint("shape", f"{w_path}: the transition table's tensors are inconsistent ({table}); "
                            "re-publish or retrain it")
