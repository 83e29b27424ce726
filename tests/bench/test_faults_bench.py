"""`streamrec bench faults` at CI size: the rows no other test covers end to end (a hot
user through a SIGKILL; broken checkpoints at start-up and at hot swap; a worker
SIGSTOPped beside a second one; a forget racing mis-keyed events), then the
command itself on one row, for its table and JSON. The other rows' faults have their own
tests: tests/pipeline/test_faults.py, tests/pipeline/test_catalog.py, tests/runtime/test_learner.py."""
from __future__ import annotations

import argparse
import json

import pytest

from stream_app.bench import faults

pytestmark = pytest.mark.integration


def test_hot_user_bad_checkpoints_and_paused_worker_rows_hold(broker, tmp_path):
    rows = faults.run_matrix(broker.bootstrap, ["hot_user", "bad_checkpoints", "paused_worker", "forget_race"], 3000,
                             tmp_path,
                             say=lambda _: None)
    for row in rows:
        assert row.ok, row
        assert row.sent > 0


def test_the_command_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "faults.json"
    code = faults.run(argparse.Namespace(rows="two_learners", events=0, quick=True, json=out))
    result = json.loads(out.read_text())
    assert code == 0 and [r["fault"] for r in result["rows"]] == ["two_learners"] and result["rows"][0]["ok"]
    assert "the second stops at start, naming the first: yes" in capsys.readouterr().out


def test_unknown_rows_are_a_one_line_error():
    from stream_app.errors import UserError
    with pytest.raises(UserError, match="unknown row"):
        faults.run(argparse.Namespace(rows="nope", events=0, quick=True, json=None))
