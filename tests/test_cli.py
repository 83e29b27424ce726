"""The CLI as a user meets it: help for every command, one-line errors, the demo."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from stream_app.cli import COMMANDS, main


def streamrec(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_app.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_overview_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_examples(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"streamrec {name}" in out


@pytest.mark.parametrize("args,fix", [
    (["produce", "--synthetic"], "STREAMREC_BOOTSTRAP_SERVERS"),
    (["produce", "--file", "/nonexistent.jsonl", "--bootstrap-servers", "127.0.0.1:1"], "streamrec synth"),
    (["worker", "--partitions", "0"], "--partitions"),
    (["nonsense"], "streamrec --help"),
])
def test_user_errors_are_one_line_naming_the_fix(args, fix):
    result = streamrec(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fix in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("bench,package", [("soak", "psutil"), ("retrieval", "matplotlib")])
def test_a_benchmark_without_the_bench_extra_is_one_line_naming_it(bench, package, tmp_path):
    """A core install (the Docker image) lacks what only benchmarks need: the run stops
    before it starts anything, with the pip command that adds it."""
    import os
    (tmp_path / f"{package}.py").write_text("raise ImportError('left out: a core install')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "stream_app.cli", "bench", bench, "--json", str(tmp_path / "b.json")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert f"streamrec bench {bench} needs {package}" in lines[0] and "pip install 'streamrec[bench]'" in lines[0]
    assert not (tmp_path / "b.json").exists()


def test_unreachable_broker_is_a_bounded_one_line_error():
    result = streamrec("worker", "--bootstrap-servers", "127.0.0.1:1", "--broker-connect-timeout-s", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if "cannot reach Kafka at 127.0.0.1:1" in line]


@pytest.mark.integration
def test_demo_runs_and_reports(tmp_path):
    from stream_app.transport.broker import free_port

    out = tmp_path / "demo.json"
    result = streamrec("demo", "--duration", "12", "--rate", "200", "--json", str(out), "--users", "500",
                       "--web-port", str(free_port()), "--model-cache", str(tmp_path / "models"), timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    # the broker's address, as one line a user pastes to run the README's examples beside it
    exports = [line for line in result.stderr.splitlines() if line.startswith("export STREAMREC_BOOTSTRAP_SERVERS=")]
    assert len(exports) == 1 and re.match(r"export STREAMREC_BOOTSTRAP_SERVERS=127\.0\.0\.1:\d+ ", exports[0])
    summary = json.loads(out.read_text())
    assert summary["events"] > 1000 and summary["recommendations"] > 100 and summary["dlq"] > 0
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert summary["stalled_at_s"] is None
    # the transformer answers (co-occurrence only for users it cannot represent), with its costs shown
    served = {version: share for version, share in summary["models"].items() if not version.startswith("cooccurrence")}
    assert sum(served.values()) > 0.9, summary["models"]
    assert summary["step_us_per_user"] > 0 and summary["rebuild_us_per_user"] > 0 and summary["cache_hit_rate"] > 0


def test_demo_says_once_when_processing_stops_with_events_waiting():
    import io

    from rich.console import Console

    from stream_app.demo.live import StallWarning

    out = io.StringIO()
    warning = StallWarning(Console(file=out, width=400), embedded=True)
    for t in range(0, 60, 5):  # flowing: no warning
        warning.check({"elapsed_s": float(t), "events": 300 * t, "lag": 10})
    assert warning.at_s is None and out.getvalue() == ""
    for t in range(60, 200, 1):  # stuck at 17,700 events while 5,000 wait
        warning.check({"elapsed_s": float(t), "events": 17_700, "lag": 5_000})
    assert warning.at_s == 120.0  # 60 s after the last progress, sampled every 5 s
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1 and "5000 waiting" in lines[0] and "STREAMREC_BOOTSTRAP_SERVERS" in lines[0]


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"streamrec {version('streamrec')}"


def test_help_lists_every_benchmark(capsys):
    from stream_app.bench import BENCHES
    main(["--help"])
    overview = capsys.readouterr().out
    bench_line = next(line for line in overview.splitlines() if line.strip().startswith("bench"))
    assert all(name in bench_line for name in BENCHES), bench_line
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in BENCHES)


@pytest.mark.parametrize("flags,incremental,single", [
    ([], True, None),
    (["--no-incremental"], False, None),
    (["--incremental"], True, None),
    (["--incremental", "false", "--single-record-batches"], False, True),
    (["--no-single-record-batches", "--incremental", "true"], True, False),
])
def test_boolean_flags_need_no_value(flags, incremental, single):
    from stream_app.cli import build_parser
    from stream_app.config import settings_from_args
    parser, _ = build_parser("worker")
    settings = settings_from_args(parser.parse_args(flags))
    assert settings.incremental is incremental and settings.single_record_batches is single


@pytest.mark.parametrize("flag,value,valid", [("--log-level", "verbose", "'debug', 'info', 'warning'"),
                                              ("--log-format", "xml", "'text' or 'json'")])
def test_log_settings_are_checked_in_one_line(flag, value, valid):
    result = streamrec("worker", flag, value)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert flag in lines[0] and valid in lines[0] and "Traceback" not in result.stderr
