"""The compiled fast paths (``ckptmigrate/formats/_*.c``, built by ``pip install``): each speeds up
the common case of a pure-Python path and hands anything else back to it, with the same results
(tests hold the two to each other). Where one did not build, or ``CKPTMIGRATE_PURE_PYTHON=1`` is
set, the pure-Python path runs alone."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE_PYTHON_ENV = "CKPTMIGRATE_PURE_PYTHON"


def pure_python() -> bool:
    """Whether the user asked for the pure-Python paths only."""
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


def load(name: str) -> ModuleType | None:
    """The extension module ``ckptmigrate.formats.<name>``, or None when it is not built or not wanted."""
    if pure_python():
        return None
    try:
        return importlib.import_module(f"ckptmigrate.formats.{name}")
    except ImportError:
        return None
