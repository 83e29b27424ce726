"""The README is the front door: its generated parts must match the code."""
from pathlib import Path

import pytest

from stream_app.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_is_current():
    text = README.read_text()
    start, end = text.index("<!-- config:start -->\n"), text.index("<!-- config:end -->")
    assert text[start + len("<!-- config:start -->\n"):end].strip() == config_reference().strip(), \
        "README configuration table is stale: regenerate it with `python -m stream_app.config`"


def test_two_commands_and_ci_agree():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def runnable_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block preceded by `<!-- runnable -->`."""
    import re
    pattern = re.compile(r"<!-- runnable -->\n```(\w+)\n(.*?)```", re.S)
    return pattern.findall(README.read_text())


def test_there_are_runnable_blocks():
    assert {lang for lang, _ in runnable_blocks()} == {"bash", "python"}


@pytest.mark.integration
@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_block_runs(index, broker, tmp_path):
    """Each runnable block, as a user would paste it, in a fresh directory, against a real broker."""
    import os
    import subprocess
    import sys

    lang, code = runnable_blocks()[index]
    env = {**os.environ, "STREAMREC_BOOTSTRAP_SERVERS": broker.bootstrap,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"README block {index} ({lang}) failed:\n{result.stderr[-2000:]}"
