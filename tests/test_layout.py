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


def extra_packages() -> dict[str, str]:
    """Import name -> optional extra (pyproject.toml), for every extra but dev (tests only)."""
    import re
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = re.compile(r"[A-Za-z0-9_.-]+")
    core = {name.match(req).group(0).lower() for req in project["dependencies"]}
    out = {}
    for extra, reqs in project["optional-dependencies"].items():
        for req in reqs:
            package = name.match(req).group(0).lower()
            if extra != "dev" and not package.startswith("streamrec"):
                assert package not in core, f"{package} is both core and in [{extra}]"
                out[package.replace("-", "_")] = extra
    return out


def direct_imports(tree: ast.AST) -> set[str]:
    """Top-level package names of every import statement, at any depth."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.partition(".")[0])
    return found


def declared_needs(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NEEDS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def test_extras_are_imported_only_behind_a_check():
    """A core install (the Docker image) lacks the optional extras. Product and tooling
    modules reach them only through stream_app.errors.optional (a one-line error naming the
    extra), except a benchmark that lists them in NEEDS, which `streamrec bench` checks with
    it before the run starts."""
    extras = extra_packages()
    assert extras, "pyproject.toml declares no optional extra besides dev"
    wrong = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        allowed = declared_needs(tree) if name.startswith("stream_app.bench.") else set()
        bad = sorted((direct_imports(tree) & extras.keys()) - allowed)
        if bad:
            wrong[name] = bad
    assert not wrong, f"import these via stream_app.errors.optional (or a bench module's NEEDS): {wrong}"
