"""Run the stream processor: consume events, keep per-user state, publish recommendations.

With no bootstrap servers configured the worker starts an embedded broker for its own
lifetime (and stops it on exit); with servers configured it never starts one."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stream_app.config import Settings, add_settings_arguments, settings_from_args

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  streamrec worker                                   # embedded broker, metrics on 127.0.0.1:6066
  STREAMREC_BOOTSTRAP_SERVERS=kafka:9092 streamrec worker --web-port 6067
  streamrec worker --partitions 8 --state-dir /var/lib/streamrec
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser)


def run_worker(settings: Settings) -> int:
    """Blocks until SIGINT/SIGTERM; the embedded broker (if any) is stopped afterwards.

    May first re-execute the process with jemalloc preloaded (stream_app.runtime.allocator)."""
    from stream_app.runtime import allocator, failpoints, logs

    failpoints.points()  # a malformed STREAMREC_FAILPOINTS is a one-line error, before anything starts
    from stream_app.serving.surfaces import load as load_surfaces
    load_surfaces(settings.surfaces_file, settings.top_k)  # likewise a surfaces file that does not validate
    running_on = allocator.ensure(settings.allocator)  # before faust, torch and RocksDB allocate

    import gc
    import tempfile

    from faust import Worker

    from stream_app import metrics
    from stream_app.pipeline.app import create_app
    from stream_app.transport.broker import kafka_for
    from stream_app.pipeline.catalog import Catalog
    from stream_app.transport.health import EXIT_BROKER_LOST, BrokerWatch
    from stream_app.serving.lifecycle import Lifecycle

    logs.setup(settings.log_level, settings.log_format)  # model loading logs before Faust sets up its own
    metrics.ALLOCATOR.labels(running_on).set(1)
    loop_kind = use_event_loop(settings.event_loop)

    with kafka_for(settings) as ready, tempfile.TemporaryDirectory(prefix="streamrec-state-") as tmp:
        if settings.embedded:  # a memory broker's offsets die with it: never reuse old state
            ready = ready.model_copy(update={"state_dir": Path(tmp)})
        ready.state_dir.mkdir(parents=True, exist_ok=True)
        catalog = Catalog()
        watch = BrokerWatch(ready)
        app = create_app(ready, Lifecycle(ready, catalog), catalog, watch)
        gc.freeze()  # what start-up built (modules, torch, the model) lives as long as the worker:
        # later full collections skip it (docs/operations.md, "Where a worker's time goes")
        print(logs.line(ready.log_format, f"streamrec worker: kafka {ready.bootstrap_servers}, metrics "
                        f"http://{ready.web_host}:{ready.web_port}/metrics, allocator {running_on}, loop {loop_kind}"),
              flush=True)
        worker = Worker(app, loglevel=ready.log_level, quiet=True,
                        logging_config=logs.faust_config(ready.log_level, ready.log_format))
        code = 0
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            code = int(exc.code or 0)
        if watch.gave_up:  # the watch said why, in one line
            return EXIT_BROKER_LOST
    return code


def use_event_loop(choice: str) -> str:
    """Install uvloop's policy before Faust creates its loop; returns the loop in use."""
    import asyncio

    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("streamrec: event_loop=uvloop but uvloop is not installed; pip install uvloop "
                             "or set STREAMREC_EVENT_LOOP=asyncio")
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run(args: argparse.Namespace) -> int:
    return run_worker(settings_from_args(args))
