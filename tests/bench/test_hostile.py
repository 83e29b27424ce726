"""Hostile input, CI-sized: the code path of `streamrec bench hostile` against the
session broker. Zero crashes, every bad message dead-lettered once with its expected
reason and intact payload, every good event in state exactly once, redeliveries dropped."""
from __future__ import annotations

import pytest

from stream_app.bench.hostile import HostileStream, run_hostile
from stream_app.testing.hostile import CASES

pytestmark = pytest.mark.integration


def test_hostile_stream(make_settings, tmp_path):
    settings = make_settings()
    stream = HostileStream(bad=3_000, good=1_000, duplicates=200, users=100, items=300, seed=3,
                           unknown_share=0.1, dlq_payload_cap=settings.dlq_payload_cap)
    result = run_hostile(settings, stream, tmp_path, timeout=120)
    assert result["failures"] == []
    assert result["crashes"] == 0
    assert result["dlq"] == result["bad_sent"] == 3_000 and result["dlq_reason_mismatches"] == 0
    assert result["good_in_state"] == result["good_sent"] == 1_000
    assert result["duplicates_dropped"] == result["duplicates_sent"] == 200
    assert result["unknown_item_events"] > 0
    assert {r for r, c in result["reasons"].items() if c["sent"]} == {reason for _, reason in CASES}
