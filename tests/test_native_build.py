"""A developer installs ckptmigrate with its set-up (as CI does): every compiled fast path is built,
so the tests hold each to the pure-Python path it speeds up; ``CKPTMIGRATE_PURE_PYTHON=1`` turns
them all off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckptmigrate
from ckptmigrate.formats import native

SOURCES = sorted((Path(ckptmigrate.__file__).parent / "formats").glob("_*.c"))


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_every_fast_path_is_built(source: Path) -> None:
    module = native.load(source.stem)
    assert module is not None, f"{source.name} is not built: run scripts/setup.sh (it needs a C compiler)"


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_pure_python_turns_a_fast_path_off(source: Path) -> None:
    env = {**os.environ, native.PURE_PYTHON_ENV: "1"}
    probe = f"from ckptmigrate.formats import native; print(native.load({source.stem!r}))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
