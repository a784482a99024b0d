"""User story: "our checkpoints live in a directory the whole team (or everyone, like /tmp) can write,
and nobody there can turn ckptmigrate into a tool that overwrites my files or loses my stamps."

Each attack found by the security review is played for real: links planted where ckptmigrate
creates a backup, an output or a lock file; a lock file owned by another user in a sticky directory
(the command runs as root stripped of the capabilities that bypass file permissions — what an
ordinary user has — and files are chowned to another uid); two hard links to one
checkpoint stamped through both names at once.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_concurrency import Holder, flocks, start, wait_until_blocked

from ckptmigrate import api, formats
from ckptmigrate.example import model_at
from ckptmigrate.storage.locking import lock_path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "migrations")
OTHER = 65534  # the other user (nobody)
DIR_OWNER = 65533  # owns the shared directory, as root owns /tmp
# CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID: what lets root ignore
# file permissions and the sticky bit (linux/capability.h); PR_CAPBSET_DROP is 24
_OVERRIDES = (0, 1, 2, 3, 4)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files to other users")


def checkpoint_at(path: Path, era: int = 1) -> Path:
    torch.save(model_at(era).state_dict(), path)
    api.stamp(path, revision="0001", lineage="example")
    return path


def ckptmigrate(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "ckptmigrate", *map(str, args)]


def run(*args: str | Path, cwd: Path, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI as a real subprocess; ``unprivileged``: without the capabilities that override file
    permissions (dropped from the bounding set before exec, so the new process never has them)."""

    def drop() -> None:
        if unprivileged:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in _OVERRIDES:
                if libc.prctl(24, cap, 0, 0, 0) != 0:
                    os._exit(99)

    env = {**os.environ, "HOME": str(cwd)}
    return subprocess.run(ckptmigrate(*args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=drop)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptmigrate: error: "), proc.stderr
    return lines[0]


def tags_of(path: Path) -> dict[str, str]:
    env = formats.read_envelope(path)[1]
    assert env is not None
    return dict(env["tags"])


@pytest.fixture
def shared() -> Iterator[Path]:
    """A sticky, world-writable directory like /tmp (under /tmp, so that another uid can reach it)."""
    directory = Path(tempfile.mkdtemp(prefix="ckptmigrate-shared-", dir="/tmp"))
    directory.chmod(0o1777)
    os.chown(directory, DIR_OWNER, DIR_OWNER)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# --- links planted at names ckptmigrate creates ---------------------------------------------------


def test_a_dangling_link_at_the_backup_name_is_not_written_through(tmp_path: Path, cli: Callable[..., Any]) -> None:
    path = checkpoint_at(tmp_path / "model.pt")
    original = path.read_bytes()
    victim = tmp_path / "elsewhere" / "victim.pt"
    victim.parent.mkdir()
    (tmp_path / "model.pt.bak").symlink_to(victim)

    proc = cli("upgrade", path, "--migrations", EXAMPLE)

    assert proc.returncode == 0, proc.stderr
    assert not victim.exists() and (tmp_path / "model.pt.bak").is_symlink()
    assert (tmp_path / "model.pt.bak.1").read_bytes() == original
    assert "model.pt.bak.1" in proc.stdout


def test_a_link_at_the_backup_name_to_an_existing_file_leaves_that_file_alone(
    tmp_path: Path, cli: Callable[..., Any]
) -> None:
    path = checkpoint_at(tmp_path / "model.pt")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "model.pt.bak").symlink_to(victim)

    assert cli("upgrade", path, "--migrations", EXAMPLE).returncode == 0
    assert victim.read_text() == "precious"
    assert (tmp_path / "model.pt.bak.1").is_file()


@as_root
def test_output_into_a_link_another_user_planted_is_refused(shared: Path, tmp_path: Path) -> None:
    path = checkpoint_at(tmp_path / "model.pt")
    victim = tmp_path / "victim.pt"
    victim.write_bytes(b"my other file")
    out = shared / "out.pt"
    out.symlink_to(victim)
    os.lchown(out, OTHER, OTHER)

    line = one_line_error(run("stamp", path, "-o", out, "--overwrite", "--tag", "k=v", cwd=tmp_path))

    assert str(out) in line and "symbolic link" in line
    assert victim.read_bytes() == b"my other file" and out.is_symlink()


@as_root
def test_output_into_a_link_of_my_own_in_a_shared_directory_replaces_its_target(shared: Path, tmp_path: Path) -> None:
    path = checkpoint_at(tmp_path / "model.pt")
    target = shared / "epoch10.pt"
    shutil.copyfile(path, target)
    (shared / "latest.pt").symlink_to(target)

    proc = run("stamp", path, "-o", shared / "latest.pt", "--overwrite", "--tag", "k=v", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert (shared / "latest.pt").is_symlink() and tags_of(target)["k"] == "v"


@as_root
def test_in_place_through_another_users_link_is_refused(shared: Path, tmp_path: Path) -> None:
    victim = checkpoint_at(tmp_path / "mine.pt")
    before = victim.read_bytes()
    link = shared / "model.pt"
    link.symlink_to(victim)
    os.lchown(link, OTHER, OTHER)

    line = one_line_error(run("stamp", link, "--tag", "k=v", cwd=tmp_path))

    assert "symbolic link" in line and victim.read_bytes() == before


def test_a_link_at_the_lock_name_is_refused_not_spun_on(tmp_path: Path) -> None:
    path = checkpoint_at(tmp_path / "model.pt")
    before = path.read_bytes()
    lock_path(path).symlink_to(tmp_path / "nowhere")

    line = one_line_error(run("stamp", path, "--tag", "k=v", cwd=tmp_path))  # a hang fails on the timeout

    assert ".model.pt.ckptmigrate-lock" in line and path.read_bytes() == before
    assert lock_path(path).is_symlink()


def test_a_fifo_at_the_lock_name_is_refused(tmp_path: Path) -> None:
    path = checkpoint_at(tmp_path / "model.pt")
    os.mkfifo(lock_path(path))

    line = one_line_error(run("stamp", path, "--tag", "k=v", cwd=tmp_path))

    assert ".model.pt.ckptmigrate-lock" in line


# --- another user's lock file in a sticky directory -----------------------------------------------


@as_root
def test_another_users_lock_file_does_not_fail_a_stamp(shared: Path) -> None:
    path = checkpoint_at(shared / "model.pt")
    lock = lock_path(path)
    lock.write_bytes(b"")
    os.chown(lock, OTHER, OTHER)
    lock.chmod(0o644)

    proc = run("stamp", path, "--tag", "k=v", cwd=shared, unprivileged=True)

    assert proc.returncode == 0, proc.stderr
    assert tags_of(path)["k"] == "v"
    assert lock.exists() and lock.stat().st_uid == OTHER  # not ours to remove


@as_root
def test_another_users_lock_file_does_not_hide_the_real_error(shared: Path) -> None:
    path = shared / "model.pt"
    path.write_bytes(b"not a checkpoint at all")
    lock = lock_path(path)
    lock.write_bytes(b"")
    os.chown(lock, OTHER, OTHER)

    line = one_line_error(run("stamp", path, "--tag", "k=v", cwd=shared, unprivileged=True))

    assert "lock" not in line and str(path) in line


@as_root
def test_an_unreadable_lock_file_of_another_user_is_named(shared: Path) -> None:
    path = checkpoint_at(shared / "model.pt")
    before = path.read_bytes()
    lock = lock_path(path)
    lock.write_bytes(b"")
    os.chown(lock, OTHER, OTHER)
    lock.chmod(0o600)

    line = one_line_error(run("stamp", path, "--tag", "k=v", cwd=shared, unprivileged=True))

    assert str(lock) in line and f"uid {OTHER}" in line
    assert path.read_bytes() == before


# --- hard links: one file, two names --------------------------------------------------------------


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for h in started:
        if h.proc.poll() is None:
            h.kill()


def test_a_stamp_through_a_second_hard_link_waits_for_the_first(tmp_path: Path, holders: list[Holder]) -> None:
    a = checkpoint_at(tmp_path / "a.pt")
    b = tmp_path / "b.pt"
    os.link(a, b)
    holders.append(holder := Holder(a))

    proc = start(ckptmigrate("stamp", b, "--tag", "via=b"), tmp_path)
    wait_until_blocked(a, [proc])  # on the inode lock of the file both names share

    holder.release()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert tags_of(a)["via"] == "b"
    assert flocks(a) == (set(), set())


def test_stamps_through_two_hard_links_at_once_are_all_kept(tmp_path: Path) -> None:
    a = checkpoint_at(tmp_path / "a.pt")
    b = tmp_path / "b.pt"
    os.link(a, b)
    names = [a, b] * 4
    procs = [start(ckptmigrate("stamp", p, "--tag", f"job{i}={p.name}"), tmp_path) for i, p in enumerate(names)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err

    stamped = [h for h in formats.read_envelope(a)[1]["history"] if h.get("action") == "stamp"]
    assert len(stamped) == 1 + len(names)  # the fixture's stamp and every job's
    assert {f"job{i}" for i in range(len(names))} <= set(tags_of(a))
    assert os.stat(a).st_ino == os.stat(b).st_ino  # appended in place: still one file
    got = torch.load(b, weights_only=True)
    want = model_at(1).state_dict()
    assert list(got) == list(want)
