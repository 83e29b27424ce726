"""How the worker and the learner write their log: text for a terminal, or JSON (one
object per line: ts, level, logger, message) for a log pipeline that parses fields
instead of guessing at a line's shape (docs/configuration.md, "How settings are given")."""
from __future__ import annotations

import json
import logging
import logging.config
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a traceback goes into `exc`, so it never spans lines."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = {"ts": ts, "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def config(level: str, fmt: str) -> dict:
    """A `logging.config.dictConfig` dict: the root logger at `level`, to stdout, as `fmt`."""
    formatter = {"()": JsonFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"streamrec": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "streamrec",
                                 "stream": "ext://sys.stdout", "level": level.upper()}},
        "root": {"level": level.upper(), "handlers": ["default"]},
    }


def setup(level: str, fmt: str) -> None:
    """Configure logging before anything logs (the worker's model loading warns before Faust
    sets up its own), so even the first lines have the chosen format."""
    logging.config.dictConfig(config(level, fmt))


def faust_config(level: str, fmt: str) -> dict | None:
    """What the Faust worker is given: None keeps Faust's own coloured text format."""
    return config(level, fmt) if fmt == "json" else None


def line(fmt: str, message: str, logger: str = "streamrec") -> str:
    """A line printed outside logging (the worker's start-up banner) in the same format."""
    if fmt != "json":
        return message
    return JsonFormatter().format(logging.LogRecord(logger, logging.INFO, "", 0, message, None, None))
