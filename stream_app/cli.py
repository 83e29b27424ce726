"""`streamrec` console script: one subcommand per module, imported lazily so that
`streamrec --help` does not pay for importing torch and faust."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from stream_app.errors import UserError


class Command(NamedTuple):
    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "demo": Command("stream_app.demo.live", "embedded broker + worker + synthetic producer, with a live view"),
    "worker": Command("stream_app.runtime.worker", "run the stream processor (starts an embedded broker if none is configured)"),
    "broker": Command("stream_app.transport.broker", "run the embedded Tansu Kafka broker in the foreground"),
    "produce": Command("stream_app.testing.traffic", "send events (synthetic or from a JSONL file) to the events topic"),
    "forget": Command("stream_app.clients.forget", "erase users: state (changelog tombstone), caches, latest recommendations"),
    "synth": Command("stream_app.testing.synth", "write a deterministic synthetic clickstream (and catalog) to files"),
    "learn": Command("stream_app.runtime.learner", "continual learner: fine-tune on the live stream, publish gated checkpoints"),
    "train": Command("model.train", "train the sequential transformer recommender"),
    "eval": Command("model.evaluate", "evaluate a checkpoint or a baseline (sampled or full ranking)"),
    "bench": Command("stream_app.bench", "benchmarks: inference, pipeline, hostile, chaos, soak, quality, broker, "
                                         "replay, freshness, retrieval, faults"),
}


def version() -> str:
    """The installed package's version (pyproject.toml), so a log or a bug report names the build."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed
    try:
        return installed("streamrec")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed; pip install -e .)"


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: streamrec COMMAND [options]   (streamrec COMMAND --help for details)",
             "       streamrec --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The subcommand's parser; its module supplies arguments, examples (EXAMPLES) and run()."""
    module = importlib.import_module(COMMANDS[name].module)
    parser = argparse.ArgumentParser(
        prog=f"streamrec {name}",
        description=(module.__doc__ or COMMANDS[name].summary).strip().splitlines()[0],
        epilog=getattr(module, "EXAMPLES", None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"streamrec {version()}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"streamrec: unknown command {name!r}; run `streamrec --help` for the list", file=sys.stderr)
        return 2
    parser, module = build_parser(name)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"streamrec {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
