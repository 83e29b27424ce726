"""The layout the code promises (docs/design.md, "Product never imports tooling"): product
packages never import tooling, every product module is imported by some test, and the
module map in docs/design.md names every module."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLING = ("stream_app.testing", "stream_app.bench", "stream_app.demo")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in ("stream_app", "model") for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """Modules of this project that a file imports, at any depth (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & known


def is_tooling(name: str) -> bool:
    return name.startswith(TOOLING)


def product_modules() -> dict[str, Path]:
    return {name: path for name, path in modules().items() if not is_tooling(name) and path.stat().st_size}


def test_product_never_imports_tooling():
    known = set(modules())
    wrong = {name: sorted(filter(is_tooling, imported(path, known))) for name, path in product_modules().items()}
    assert not {name: bad for name, bad in wrong.items() if bad}, "product modules import tooling"


def test_every_product_module_is_imported_by_a_test():
    known = set(modules())
    tested: set[str] = set()
    for test in (ROOT / "tests").rglob("*.py"):
        tested |= imported(test, known)
    untested = sorted(set(product_modules()) - tested)
    assert not untested, f"no test imports {untested}"


def test_tests_mirror_the_packages():
    """Each subpackage of stream_app, and model, has its folder of tests."""
    packages = {p.parent.name for p in (ROOT / "stream_app").glob("*/__init__.py")} | {"model"}
    folders = {p.name for p in (ROOT / "tests").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= folders, f"missing test folders: {sorted(packages - folders)}"


def test_module_map_names_every_module():
    text = (ROOT / "docs" / "design.md").read_text()
    unnamed = [str(path.relative_to(ROOT)) for path in modules().values()
               if path.stat().st_size and f"`{path.relative_to(ROOT)}`" not in text]
    assert not unnamed, f"docs/design.md's module map does not name {unnamed}"
