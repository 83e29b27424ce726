"""`streamrec bench replay`, small: a dataset's histories sent at once, every user answered,
and the end-to-end rate reported beside the worker's own."""
from __future__ import annotations

import argparse
import json

import pytest

from model.synthetic import make_pairs, write_pairs
from stream_app.bench import replay

pytestmark = pytest.mark.integration


def test_bulk_replay_answers_every_user(tmp_path):
    data = tmp_path / "seq.txt"
    write_pairs(str(data), make_pairs(users=80, items=60, avg_len=8, seed=3, groups=3, p_follow=0.8))
    args = argparse.Namespace(data=str(data), users=0, checkpoint=None, linger_ms=0, batch_kb=16, timeout=120.0,
                              json=tmp_path / "r.json")
    assert replay.run(args) == 0
    result = json.loads(args.json.read_text())
    assert result["users"] == result["answered"] == 80
    assert result["events"] > 80 * 4 and result["end_to_end_events_per_s"] > 0
