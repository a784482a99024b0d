"""User story: "I load a checkpoint in /tmp, or in an archive someone sent me, and no code of theirs runs."

ckptmigrate finds the migration scripts through ``[tool.ckptmigrate]`` in the nearest
``pyproject.toml``, and importing a script runs it. Every test plants a real script directory whose
scripts write a marker file when imported, in a place the user does not control — a shared sticky
directory, files owned by another uid (an unpacked archive, a CI checkout), a group-writable
directory, above the repository root, on another file system — and checks that ``load()``, the
CLI and ``load_state_dict`` import nothing from it, while ``--migrations`` / ``migrations=``
naming the same directory still works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptmigrate.example import model_at

OTHER = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files to other users")

SCRIPT = '''
"""Trap."""
open({marker!r}, "w").write("imported")
revision = "0001"
down_revision = None


def upgrade(ckpt):
    pass
'''


def plant(project: Path, marker: Path, *, owner: int | None = None) -> Path:
    """A pyproject.toml naming a migrations directory whose script writes ``marker`` on import."""
    versions = project / "migrations" / "versions"
    versions.mkdir(parents=True)
    (versions / "0001_trap.py").write_text(SCRIPT.format(marker=str(marker)))
    (project / "pyproject.toml").write_text('[tool.ckptmigrate]\nmigrations = "migrations"\n')
    if owner is not None:
        for p in (project / "pyproject.toml", project / "migrations", versions, versions / "0001_trap.py"):
            os.chown(p, owner, owner)
    return project / "migrations"


def checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model_at(2).state_dict(), path)
    return path


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "ckptmigrate", *map(str, args)], cwd)


def python_load(path: Path, cwd: Path, call: str = "ckptmigrate.load(sys.argv[1])") -> subprocess.CompletedProcess[str]:
    code = f"import sys, torch, ckptmigrate\n{call}\nprint('loaded')"
    return run([sys.executable, "-c", code, str(path)], cwd)


@pytest.fixture
def shared() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="ckptmigrate-shared-", dir="/tmp"))
    directory.chmod(0o1777)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@as_root
def test_a_pyproject_planted_in_a_shared_directory_is_not_looked_at(shared: Path, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    plant(shared, marker, owner=OTHER)
    mine = shared / "mine"
    mine.mkdir()
    path = checkpoint(mine / "model.pt")

    loaded = python_load(path, mine)
    heads = cli("heads", cwd=mine)

    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr
    assert heads.returncode == 2 and "no migrations configured" in heads.stderr
    assert not marker.exists()


@as_root
def test_an_archive_unpacked_with_another_users_files_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    project = tmp_path / "unpacked"
    project.mkdir()
    migrations = plant(project, marker, owner=OTHER)
    path = checkpoint(project / "model.pt")

    upgrade = cli("upgrade", path, cwd=project)
    assert upgrade.returncode == 2 and "Traceback" not in upgrade.stderr
    for proc in (
        upgrade,
        python_load(path, project),
        python_load(path, project, "ckptmigrate.load_state_dict(torch.nn.Linear(1, 1), sys.argv[1])"),
    ):
        assert proc.returncode != 0 and "owned by uid 65534" in proc.stderr, proc.stderr
        assert ("--migrations" if proc is upgrade else "migrations=") in proc.stderr
    assert not marker.exists()

    named = cli("heads", "--migrations", migrations, cwd=project)  # the user names it: imported as given
    assert named.returncode == 0, named.stderr
    assert marker.exists()


def test_a_group_writable_script_directory_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    project = tmp_path / "project"
    project.mkdir()
    migrations = plant(project, marker)
    (migrations / "versions").chmod(0o775)

    proc = cli("heads", cwd=project)

    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "writable by other users" in proc.stderr and str(migrations / "versions") in proc.stderr
    assert not marker.exists()

    (migrations / "versions").chmod(0o755)
    assert cli("heads", cwd=project).returncode == 0 and marker.exists()


def test_a_pyproject_in_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    project = tmp_path / "project"
    project.mkdir()
    plant(project, marker)
    project.chmod(0o777)  # anyone could have replaced the pyproject.toml (no sticky bit)

    proc = cli("heads", cwd=project)

    assert proc.returncode == 2 and "writable by other users" in proc.stderr, proc.stderr
    assert not marker.exists()


def test_the_walk_stops_at_the_repository_root(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    plant(tmp_path, marker)  # e.g. a home directory's stray pyproject.toml
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    path = checkpoint(repo / "sub" / "model.pt")

    loaded = python_load(path, repo / "sub")
    heads = cli("heads", cwd=repo / "sub")

    assert loaded.returncode == 0, loaded.stderr
    assert heads.returncode == 2 and "no migrations configured" in heads.stderr
    assert not marker.exists()


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted inside the test's directory; skipped where mounting is not allowed."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mountpoint)], tmp_path)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, timeout=60)


def test_the_walk_does_not_cross_into_another_file_system(tmp_path: Path, other_fs: Path) -> None:
    marker = tmp_path / "imported"
    plant(tmp_path, marker)
    path = checkpoint(other_fs / "model.pt")

    heads = cli("heads", cwd=other_fs)
    loaded = python_load(path, other_fs)

    assert heads.returncode == 2 and "no migrations configured" in heads.stderr
    assert loaded.returncode == 0, loaded.stderr
    assert not marker.exists()


def test_my_own_project_is_found_from_a_subdirectory(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    project = tmp_path / "project"
    (project / "runs").mkdir(parents=True)
    plant(project, marker)

    proc = cli("heads", cwd=project / "runs")

    assert proc.returncode == 0, proc.stderr
    assert "0001" in proc.stdout and marker.exists()

