"""Log format of the worker and the learner: `log_format=json` writes one JSON object per
line (ts, level, logger, message), tracebacks included, so a log pipeline parses fields."""
from __future__ import annotations

import io
import json
import logging

from stream_app.runtime import logs


def test_json_lines_carry_ts_level_logger_message():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("streamrec.test-logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("waits for a checkpoint in %s", "/models")
        try:
            raise ValueError("two\nlines")
        except ValueError:
            logger.exception("it failed")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the traceback stays inside its record's line
    first, second = map(json.loads, lines)
    assert set(first) == {"ts", "level", "logger", "message"}
    assert first["level"] == "warning" and first["logger"] == "streamrec.test-logs"
    assert first["message"] == "waits for a checkpoint in /models" and first["ts"].endswith("Z")
    assert second["level"] == "error" and "ValueError: two\nlines" in second["exc"]


def test_config_and_banner_follow_the_format():
    assert logs.faust_config("info", "text") is None  # Faust keeps its own text format
    cfg = logs.faust_config("debug", "json")
    assert cfg["root"]["level"] == "DEBUG" and cfg["formatters"]["streamrec"]["()"] is logs.JsonFormatter
    assert logs.line("text", "streamrec worker: up") == "streamrec worker: up"
    banner = json.loads(logs.line("json", "streamrec worker: up"))
    assert banner["message"] == "streamrec worker: up" and banner["level"] == "info"
