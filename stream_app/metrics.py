"""Prometheus metrics of a worker. One module so dashboards, alert rules and tests can
import the names instead of repeating strings. Label values come from closed sets
(event types, DLQ reasons) so cardinality stays bounded."""
from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from importlib import metadata
from typing import Iterable, Iterator

from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

from stream_app.pipeline.events import CONTROL_TYPES, EVENT_TYPES, REASONS

REGISTRY = CollectorRegistry(auto_describe=True)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def _runtime(registry: CollectorRegistry) -> None:
    """process_* (RSS, CPU, fds), python_info, python_gc_* and streamrec_build_info on a
    process's own registry: the default registry, which carries them, is not served."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    Gauge("streamrec_build_info", "Versions this process runs (value 1).", ["version", "python", "torch"],
          registry=registry).labels(_version("streamrec"), platform.python_version(), _version("torch")).set(1)


_runtime(REGISTRY)

EVENTS = Counter("streamrec_events_total", "Valid events accepted, by type.", ["type"], registry=REGISTRY)
INVALID = Counter(
    "streamrec_invalid_events_total", "Messages sent to the dead-letter topic, by reason.", ["reason"],
    registry=REGISTRY,
)
BATCH_FAILURES = Counter(
    "streamrec_batch_failures_total", "Batches that raised, by kind: environment (read again after a backoff) "
    "or data (retried one event at a time; events that still fail are dead-lettered).", ["kind"],
    registry=REGISTRY,
)
FENCED_BATCHES = Counter(
    "streamrec_fenced_batches_total", "Batches not written because the worker had stalled past its session "
    "timeout and may no longer own their partitions (read again after the group settled).", registry=REGISTRY,
)
STALLS = Counter(
    "streamrec_stalls_total", "Event-loop gaps longer than the session timeout (SIGSTOP, a VM pause, a stalled "
    "loop): each fences the worker's writes until the group settles.", registry=REGISTRY,
)
DUPLICATES = Counter(
    "streamrec_duplicate_events_total", "Redelivered events (same event_id) ignored.", registry=REGISTRY
)
REKEYED = Counter(
    "streamrec_events_rekeyed_total",
    "Valid events whose Kafka key was not their user_id, re-published keyed by user_id.",
    registry=REGISTRY,
)
STALE_AFTER_FORGET = Counter(
    "streamrec_stale_after_forget_total", "Re-published mis-keyed events dropped because their user was forgotten "
    "after they were sent.", registry=REGISTRY,
)
RECOMMENDATIONS = Counter(
    "streamrec_recommendations_total", "Recommendation records published.", registry=REGISTRY
)
LATENCY = Histogram(
    "streamrec_event_to_recommendation_seconds",
    "Kafka record timestamp of the newest event -> recommendation published.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "streamrec_inference_batch_size",
    "Users refreshed per micro-batch (after coalescing).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=REGISTRY,
)
USERS = Gauge("streamrec_users_in_state", "Users held in this worker's state table.", registry=REGISTRY)
FALLBACK_ENTRIES = Gauge("streamrec_fallback_entries",
                         "Item-pair entries in the co-occurrence fallback (bounded by fallback_max_entries).",
                         registry=REGISTRY)
OFFSET_HOLES = Counter(
    "streamrec_offset_holes_total",
    "Input offsets skipped by the consumer (seen around rebalances) and read again, by partition.",
    ["partition"], registry=REGISTRY)
ROCKSDB_MEMORY = Gauge("streamrec_rocksdb_memory_bytes", "RocksDB memory over the owned partitions' DBs, by kind.",
                       ["kind"], registry=REGISTRY)
ALLOCATOR = Gauge("streamrec_allocator_info", "C allocator of this worker (value 1): jemalloc, or glibc "
                  "whose RSS grows over long runs.", ["allocator"], registry=REGISTRY)
HEAP = Gauge("streamrec_heap_bytes",
             "C heap (jemalloc or glibc malloc) bytes: in use, and free but not returned to the OS.",
             ["state"], registry=REGISTRY)

# --- model serving (transformer engine) -------------------------------------------
CACHE_HITS = Counter("streamrec_cache_hits_total", "Refreshes served from a user's KV cache.", registry=REGISTRY)
CACHE_MISSES = Counter("streamrec_cache_misses_total", "Refreshes that needed a rebuild.", registry=REGISTRY)
CACHE_EVICTIONS = Counter("streamrec_cache_evictions_total", "KV caches evicted (LRU).", registry=REGISTRY)
CACHE_SLOTS = Gauge("streamrec_cache_slots", "KV cache slots in use / capacity.", ["state"], registry=REGISTRY)
REBUILD_BATCH = Histogram(
    "streamrec_rebuild_batch_size", "Users rebuilt per batched rebuild.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "streamrec_inference_seconds", "Inference time per batch, by path (step, rebuild, score, and the list's "
    "rules and reasons).", ["path"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=REGISTRY,
)
CATALOG_ITEMS = Gauge("streamrec_catalog_items", "Items known to the scorer, by availability.", ["state"],
                      registry=REGISTRY)
CATALOG_REJECTED = Counter("streamrec_catalog_rejected_total",
                           "Catalog records rejected (their item withdrawn), by reason; label values are "
                           "stream_app.pipeline.catalog.REASONS, exported there.", ["reason"], registry=REGISTRY)
TRENDING_ITEMS = Gauge("streamrec_trending_items", "Items trending holds, by kind: live (counts of the owned "
                       "input partitions) or snapshot (the newest snapshot of every partition, which answer).",
                       ["kind"], registry=REGISTRY)
TRENDING_AS_OF = Gauge("streamrec_trending_as_of_timestamp_seconds", "Stream time the trending answer is decayed "
                       "to: the newest snapshot's (0 = none read yet); now minus it is how stale trending is.",
                       registry=REGISTRY)
TRENDING_SNAPSHOTS = Counter("streamrec_trending_snapshots_total", "Trending snapshots, by outcome: published "
                             "(this worker's partitions) or applied (read from the trending topic).", ["outcome"],
                             registry=REGISTRY)
TRENDING_REJECTED = Counter("streamrec_trending_rejected_total",
                            "Trending-topic records ignored, by reason; label values are "
                            "stream_app.pipeline.trending.REASONS, exported there.", ["reason"], registry=REGISTRY)
MODEL_INFO = Gauge("streamrec_model_info", "Served model versions (value 1).", ["version", "variant"],
                   registry=REGISTRY)
MODEL_SWAPS = Counter("streamrec_model_swaps_total", "Checkpoints hot-swapped in.", registry=REGISTRY)
CHECKPOINT_REJECT_REASONS = ("incomplete", "corrupt", "oversized", "format", "config", "shape", "error")
CHECKPOINT_REJECTED = Counter("streamrec_checkpoint_rejected_total",
                              "Checkpoints not served because they did not load (at start-up or a hot swap), "
                              "once per state of their files, by reason.", ["reason"], registry=REGISTRY)
ONLINE_HITS = Counter("streamrec_online_hits_total",
                      "Click/add_to_cart/purchase events whose item was in the user's latest recommendations.",
                      ["variant"], registry=REGISTRY)
ONLINE_OPPORTUNITIES = Counter("streamrec_online_opportunities_total",
                               "Click/add_to_cart/purchase events of users who had recommendations.",
                               ["variant"], registry=REGISTRY)
ONLINE_HIT_RATE = Gauge("streamrec_online_hit_rate", "Online hit rate over the last 1,000 opportunities.",
                        ["variant"], registry=REGISTRY)
CONSUMER_LAG = Gauge("streamrec_consumer_lag", "Messages behind the log end, per assigned partition.",
                     ["topic", "partition"], registry=REGISTRY)
_LAG_SERIES: set[tuple[str, str]] = set()


def export_lag(lags: dict[tuple[str, str], int]) -> None:
    """streamrec_consumer_lag for exactly these (topic, partition) keys: the series of a
    partition this worker no longer owns is removed (docs/design.md, "Partition series
    follow ownership")."""
    drop_lag(_LAG_SERIES - lags.keys())
    for key, lag in lags.items():
        CONSUMER_LAG.labels(*key).set(lag)
        _LAG_SERIES.add(key)


def drop_lag(keys: Iterable[tuple[str, str]]) -> None:
    """Remove the lag series of these (topic, partition) keys (revoked partitions)."""
    for key in set(keys) & _LAG_SERIES:
        CONSUMER_LAG.remove(*key)
        _LAG_SERIES.discard(key)
ASSIGNED_PARTITIONS = Gauge("streamrec_assigned_partitions", "Input partitions this worker owns now.",
                            registry=REGISTRY)
BROKER_UP = Gauge("streamrec_broker_up", "1 when the last broker probe answered, else 0.", registry=REGISTRY)
BROKER_DOWN_SECONDS = Gauge("streamrec_broker_unreachable_seconds",
                            "Seconds since the broker last answered a probe (0 while it answers).",
                            registry=REGISTRY)
EXPIRED_USERS = Counter("streamrec_expired_users_total", "Users dropped by the inactivity TTL.",
                        registry=REGISTRY)

MODEL_AGE = Gauge("streamrec_model_age_seconds", "Seconds since the served checkpoint was written, by variant.",
                  ["variant"], registry=REGISTRY)
MODEL_WAITING = Gauge("streamrec_model_waiting_seconds",
                      "Seconds a variant with a model directory has served the co-occurrence baseline because the "
                      "directory holds no checkpoint that loads; exported only while it waits.", ["variant"],
                      registry=REGISTRY)

# --- stage profile (docs/operations.md, "Where a worker's time goes") -----------------
STAGES = ("decode", "state_read", "update", "rank", "state_write", "send")
STAGE_SECONDS = Counter("streamrec_stage_seconds_total",
                        "Event-loop seconds spent in each stage of the batch path; the rest of the process's "
                        "CPU time is Faust, asyncio and aiokafka.", ["stage"], registry=REGISTRY)
_STAGE = {name: STAGE_SECONDS.labels(name) for name in STAGES}


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Times one stage of one batch (a few hundred ns of overhead, per batch, not per event)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _STAGE[name].inc(time.perf_counter() - start)


for _t in EVENT_TYPES + CONTROL_TYPES:  # export zeros so dashboards and alerts see every series from the start
    EVENTS.labels(_t)
for _r in REASONS:
    INVALID.labels(_r)
for _k in ("environment", "data"):
    BATCH_FAILURES.labels(_k)
for _p in ("step", "rebuild", "score", "rules", "reasons"):
    INFERENCE_SECONDS.labels(_p)
for _r in CHECKPOINT_REJECT_REASONS:  # model/checkpoint.py's REJECT_REASONS, plus "error": anything else
    CHECKPOINT_REJECTED.labels(_r)


# --- the continual learner (`streamrec learn`): a process of its own, so a registry of its own ----------
LEARNER_REGISTRY = CollectorRegistry(auto_describe=True)
_runtime(LEARNER_REGISTRY)
PREQUENTIAL_HR = Gauge("streamrec_prequential_hr", "Test-then-train HR@10 over the last N scored events, by model "
                       "(serving: what the worker serves; candidate: the learner's latest).", ["model"],
                       registry=LEARNER_REGISTRY)
PREQUENTIAL_NDCG = Gauge("streamrec_prequential_ndcg", "Test-then-train NDCG@10 over the last N scored events.",
                         ["model"], registry=LEARNER_REGISTRY)
PREQUENTIAL_NEW_ITEM_HR = Gauge("streamrec_prequential_new_item_hr",
                                "Test-then-train HR@10 on items first seen less than a day before.", ["model"],
                                registry=LEARNER_REGISTRY)
LEARNER_EVENTS = Counter("streamrec_learner_events_total", "Valid events the learner took in.",
                         registry=LEARNER_REGISTRY)
LEARNER_SKIPPED = Counter("streamrec_learner_skipped_total", "Messages the learner skipped, by DLQ reason.",
                          ["reason"], registry=LEARNER_REGISTRY)
LEARNER_UPDATES = Counter("streamrec_learner_updates_total", "Learner updates by outcome: published, or kept "
                          "aside as not_better or no_holdout.", ["outcome"], registry=LEARNER_REGISTRY)
LEARNER_UPDATE_SECONDS = Histogram("streamrec_learner_update_seconds", "Wall time of one learner update.",
                                   buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300), registry=LEARNER_REGISTRY)
LEARNER_VOCABULARY = Gauge("streamrec_learner_vocabulary_items", "Items with their own ID row in the serving model.",
                           registry=LEARNER_REGISTRY)
LEARNER_KEPT = Gauge("streamrec_learner_kept_events", "Events the learner holds, by kind (recent, replay).",
                     ["kind"], registry=LEARNER_REGISTRY)
LEARNER_LAST_PUBLISH = Gauge("streamrec_learner_last_publish_timestamp_seconds",
                             "Unix time of the learner's last published checkpoint (0 = none yet).",
                             registry=LEARNER_REGISTRY)
for _o in ("published", "not_better", "no_holdout"):
    LEARNER_UPDATES.labels(_o)
for _r in REASONS:
    LEARNER_SKIPPED.labels(_r)


def render() -> bytes:
    return generate_latest(REGISTRY)
