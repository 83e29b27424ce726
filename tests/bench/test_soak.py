"""The soak benchmark's verdict and a short real run of it (the long one is in docs/benchmarks.md)."""
from __future__ import annotations

import json
import math

import pytest

from stream_app.runtime import allocator
from stream_app.bench.soak import growth, still_filling
from stream_app.testing.harness import stalled


def test_growth_compares_the_ends_after_warmup():
    flat = [{"t_s": t, "rss_mb": 100.0} for t in range(0, 100, 10)]
    assert growth(flat, warmup_s=20) == 0.0
    leaking = [{"t_s": t, "rss_mb": 100.0 + t} for t in range(0, 110, 10)]  # warm-up spike ignored
    assert growth(leaking, warmup_s=50) == pytest.approx(100 * (100 - 50) / 150, abs=0.01)
    assert math.isnan(growth(flat, warmup_s=1000))


@pytest.mark.integration
def test_short_soak_writes_samples_and_a_plot(tmp_path, broker):
    """On a broker it did not start (--bootstrap), as a long run on a real Kafka would be."""
    from kafka import KafkaConsumer, TopicPartition

    from stream_app.cli import main

    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    code = main(["bench", "soak", "--minutes", "0.4", "--rate", "200", "--sample-s", "3", "--users", "300",
                 "--items", "500", "--bootstrap", broker.bootstrap, "--json", str(out), "--plot", str(png)])
    result = json.loads(out.read_text())
    assert result["broker"] == broker.bootstrap and result["topic"].startswith("soak-")
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:  # the run's own topic, on the broker it was given, holds what was sent
        parts = consumer.partitions_for_topic(result["topic"])
        ends = consumer.end_offsets([TopicPartition(result["topic"], p) for p in parts])
    finally:
        consumer.close()
    # within a batch of the count processed: Tansu's high watermark is its last batch's base + 1
    assert sum(ends.values()) > 0.9 * result["samples"][-1]["events"] > 0
    assert result["worker_alive"] and png.stat().st_size > 10_000
    # a real worker process re-executed itself onto jemalloc where it is installed (allocator=auto)
    assert result["allocator"] == ("jemalloc" if allocator.find_jemalloc() else "glibc")
    assert len(result["samples"]) >= 5 and result["samples"][-1]["events"] > 0.8 * 200 * 0.4 * 60
    assert code == (0 if result["rss_growth_pct"] < 5 else 1)


def test_stall_means_no_progress_while_events_wait():
    rows = [{"t_s": t, "events": min(t, 30) * 100 + t // 10, "lag": 5} for t in range(0, 100, 10)]  # a trickle
    assert stalled(rows, 60) and not stalled(rows[:6], 60)
    assert not stalled([{**r, "lag": 0} for r in rows], 60)  # idle, nothing waiting


def test_bounded_structures_still_filling_after_warmup_are_named():
    rows = [{"t_s": t, "users": 100, "fallback_entries": 1000 + 10 * t, "rocksdb_mb": 50.0} for t in range(0, 100, 10)]
    assert still_filling(rows, warmup_s=30) == ["fallback_entries"]
    full = [dict(r, fallback_entries=2000) for r in rows]
    assert still_filling(full, warmup_s=30) == []
