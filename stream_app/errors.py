"""Errors a user can cause. The CLI prints them as one line naming the fix, no traceback."""
from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """Message must say what is wrong and how to fix it, in one line."""


def optional(module: str, extra: str, purpose: str) -> ModuleType:
    """Import a dependency of an optional extra (pyproject.toml), or raise a UserError
    naming the extra: a core install (the Docker image) leaves out what only benchmarks
    and plots need, and a bare ModuleNotFoundError would not say how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.partition(".")[0]
        raise UserError(f"{purpose} needs {package}, which this install leaves out: "
                        f"pip install 'streamrec[{extra}]'") from None
