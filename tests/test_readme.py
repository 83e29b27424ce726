"""The README is the front door: its generated parts must match the code."""
from pathlib import Path

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
