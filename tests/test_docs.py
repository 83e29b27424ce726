"""README.md and docs/: generated parts match the code, runnable blocks run, links resolve,
and the pages describe the product rather than the history of a run."""
import re
from pathlib import Path

import pytest

from stream_app.config import config_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (examples, commands)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def test_config_reference_is_current():
    text = CONFIGURATION.read_text()
    start, end = text.index("<!-- config:start -->\n"), text.index("<!-- config:end -->")
    assert text[start + len("<!-- config:start -->\n"):end].strip() == config_reference().strip(), \
        "docs/configuration.md's settings table is stale: regenerate it with `python -m stream_app.config`"


def test_two_commands_and_ci_agree():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def runnable_blocks() -> list[tuple[str, str, str]]:
    """(page, language, code) of every fenced block preceded by `<!-- runnable -->`,
    in README.md and every docs/*.md."""
    pattern = re.compile(r"<!-- runnable -->\n```(\w+)\n(.*?)```", re.S)
    return [(_name(page), lang, code) for page in pages() for lang, code in pattern.findall(page.read_text())]


def test_there_are_runnable_blocks():
    assert {lang for _, lang, _ in runnable_blocks()} == {"bash", "python"}


@pytest.mark.integration
@pytest.mark.parametrize("index", range(len(runnable_blocks())),
                         ids=[f"{page}-{lang}-{n}" for n, (page, lang, _) in enumerate(runnable_blocks())])
def test_docs_block_runs(index, broker, tmp_path):
    """Each runnable block, as a user would paste it, in a fresh directory, against a real broker."""
    import os
    import subprocess
    import sys

    page, lang, code = runnable_blocks()[index]
    env = {**os.environ, "STREAMREC_BOOTSTRAP_SERVERS": broker.bootstrap,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{page} block {index} ({lang}) failed:\n{result.stderr[-2000:]}"


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slugs(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links() -> list[tuple[str, str]]:
    """(page, target) of every relative link and image in README.md and docs/*.md."""
    out = []
    for page in pages():
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                out.append((_name(page), target))
    return out


@pytest.mark.parametrize("page,target", links())
def test_relative_links_resolve(page, target):
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page} links to {target}, which does not exist"
    assert file.resolve().is_relative_to(ROOT), f"{page} links outside the repository: {target}"
    if anchor and file.suffix == ".md":
        assert anchor in slugs(file.read_text()), f"{page} links to {target}: no such heading"


def test_every_benchmark_file_is_cited():
    """docs/benchmarks/ holds current results only: each file is linked from a page."""
    cited = {((ROOT / page).parent / target.partition("#")[0]).resolve() for page, target in links()}
    stale = [str(f.relative_to(ROOT)) for f in sorted((DOCS / "benchmarks").rglob("*"))
             if f.is_file() and f.resolve() not in cited]
    assert not stale, f"not cited by any page (git rm them, or cite them in docs/benchmarks.md): {stale}"


DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d(?!\d)")
DIARY = re.compile(r"this machine|this session|\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|"
                   r"ninth|tenth|previous|last|earlier) sessions?\b", re.I)


@pytest.mark.parametrize("page", pages(), ids=_name)
def test_pages_describe_the_product_not_a_run(page):
    """No dates (outside code and JSON examples) and no run-diary phrases: what is true of
    the product, with the command that shows it. History lives in git."""
    text = page.read_text()
    assert not DATE.findall(prose(text)), f"{_name(page)} has dates: {DATE.findall(prose(text))}"
    assert not DIARY.findall(text), f"{_name(page)} reads like a run diary: {DIARY.findall(text)}"
