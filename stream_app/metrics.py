"""Prometheus metrics of a worker. One module so dashboards, alert rules and tests can
import the names instead of repeating strings. Label values come from closed sets
(event types, DLQ reasons) so cardinality stays bounded."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from stream_app.events import EVENT_TYPES, REASONS

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS = Counter("streamrec_events_total", "Valid events accepted, by type.", ["type"], registry=REGISTRY)
INVALID = Counter(
    "streamrec_invalid_events_total", "Messages sent to the dead-letter topic, by reason.", ["reason"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "streamrec_duplicate_events_total", "Redelivered events (same event_id) ignored.", registry=REGISTRY
)
REKEYED = Counter(
    "streamrec_events_rekeyed_total",
    "Valid events whose Kafka key was not their user_id, re-published keyed by user_id.",
    registry=REGISTRY,
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

for _t in EVENT_TYPES:  # export zeros so dashboards and alerts see every series from the start
    EVENTS.labels(_t)
for _r in REASONS:
    INVALID.labels(_r)


def render() -> bytes:
    return generate_latest(REGISTRY)
