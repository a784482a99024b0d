"""User story: "the disk filled up in the middle of an upgrade — my checkpoint is as it was, and
ckptmigrate told me in one line."

For real, on a 20 MiB tmpfs mounted for the test (skipped where mounting is not allowed): an in-place
``upgrade`` (whose new file does not fit next to the old one), ``upgrade -o`` onto the full disk,
``compact`` and an in-place ``stamp`` on a disk with no free byte. And everywhere, by a wrapper that
runs ``python -m ckptmigrate`` with the disk filling up at the boundary to the OS: every
``os.pwrite``/``os.write``/``os.copy_file_range`` into the checkpoint's directory may write only so
many bytes (a short write, then ``ENOSPC``, as the kernel does), or ``fsync`` fails with ``ENOSPC``
(a filesystem that allocates late). Each failure exits 2 with exactly one line on stderr,
``ckptmigrate: error: <path>: ... No space left on device ...``, no traceback; the checkpoint keeps
its bytes, and no temporary file, backup or lock file is left behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptmigrate import api, formats
from ckptmigrate.example import model_at

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "migrations")
FS_SIZE = 20 << 20

#: ``python WRAPPER ARGS`` is ``python -m ckptmigrate ARGS`` on a disk that is full for writes into
#: ENOSPC_DIR after ENOSPC_AFTER bytes (or, with ENOSPC_AT=fsync, whose fsync there fails).
WRAPPER = '''
import errno, os, runpy

DIRECTORY = os.path.realpath(os.environ["ENOSPC_DIR"])
LEFT = [int(os.environ.get("ENOSPC_AFTER", "0"))]
AT_FSYNC = os.environ.get("ENOSPC_AT") == "fsync"
NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _on_the_full_disk(fd):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return os.path.dirname(target.removesuffix(" (deleted)")) == DIRECTORY


def _room(fd, n):
    """How many of ``n`` bytes fit: all of them elsewhere; what is left here, then ENOSPC."""
    if AT_FSYNC or not _on_the_full_disk(fd):
        return n
    if LEFT[0] <= 0:
        raise NO_SPACE
    n = min(n, LEFT[0])
    LEFT[0] -= n
    return n


_pwrite, _write, _copy_file_range, _fsync = os.pwrite, os.write, os.copy_file_range, os.fsync


def pwrite(fd, data, offset):
    view = memoryview(data).cast("B")
    return _pwrite(fd, view[: _room(fd, len(view))], offset)


def write(fd, data):
    view = memoryview(data).cast("B")
    return _write(fd, view[: _room(fd, len(view))])


def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
    return _copy_file_range(src, dst, _room(dst, count), offset_src, offset_dst)


def fsync(fd):
    if AT_FSYNC and _on_the_full_disk(fd):
        raise NO_SPACE
    return _fsync(fd)


os.pwrite, os.write, os.copy_file_range, os.fsync = pwrite, write, copy_file_range, fsync
runpy.run_module("ckptmigrate", run_name="__main__", alter_sys=True)
'''


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, mmap=True, weights_only=True)


def same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return list(got) == list(want) and all(torch.equal(got[k], w) for k, w in want.items())


def leftovers(directory: Path) -> list[str]:
    """Temporary files, backups and lock files."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".ckptmigrate-tmp-")
                  or p.name.endswith((".part", ".ckptmigrate-lock")) or ".bak" in p.name)


def assert_no_space_error(proc: subprocess.CompletedProcess[str], path: Path) -> None:
    """Exit 2, one line naming the file that could not be written and saying the disk is full, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(rf"ckptmigrate: error: {re.escape(str(path))}: ", lines[0]), lines[0]
    assert "no space left on device" in lines[0].lower(), lines[0]


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
        wrapper: Path | None = None) -> subprocess.CompletedProcess[str]:
    head = [sys.executable, str(wrapper)] if wrapper is not None else [sys.executable, "-m", "ckptmigrate"]
    return subprocess.run([*head, *map(str, args)], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A ~12 MiB era-1 checkpoint stamped at 0001, whose in-place stamp left orphaned bytes."""
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = dict(model_at(1).state_dict())
    sd["module.big.weight"] = torch.randn(3 * 1024 * 1024, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "src" / "model.pt"
    path.parent.mkdir()
    torch.save(sd, path)
    api.stamp(path, revision="0001", lineage="example")
    return path


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MiB tmpfs, unmounted afterwards; the test is skipped where it cannot be mounted."""
    mountpoint = tmp_path / "small-fs"
    mountpoint.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0755", "tmpfs",
                                  str(mountpoint)], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(directory: Path) -> None:
    """Take every free byte of the filesystem ``directory`` is on."""
    with open(directory / "filler", "wb") as fh:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
        while True:
            try:
                if os.write(fh.fileno(), b"\0" * 512) == 0:
                    break
            except OSError:
                break


# --- a real full disk --------------------------------------------------------------------------


def test_upgrade_in_place_on_a_real_full_disk(checkpoint: Path, full_disk: Path) -> None:
    path = full_disk / "model.pt"
    shutil.copyfile(checkpoint, path)
    before = sha256(path)
    proc = run("upgrade", path, "--migrations", EXAMPLE, cwd=full_disk)
    assert_no_space_error(proc, path)
    assert sha256(path) == before
    assert leftovers(full_disk) == []


def test_upgrade_output_onto_a_real_full_disk(checkpoint: Path, full_disk: Path) -> None:
    fill(full_disk)
    out = full_disk / "upgraded.pt"
    before = sha256(checkpoint)
    proc = run("upgrade", checkpoint, "-o", out, "--migrations", EXAMPLE, cwd=full_disk)
    assert_no_space_error(proc, out)
    assert not out.exists()
    assert sha256(checkpoint) == before
    assert leftovers(full_disk) == [] and leftovers(checkpoint.parent) == []


def test_compact_on_a_real_full_disk(checkpoint: Path, full_disk: Path) -> None:
    path = full_disk / "model.pt"
    shutil.copyfile(checkpoint, path)
    before = sha256(path)
    proc = run("compact", path, cwd=full_disk)
    assert_no_space_error(proc, path)
    assert sha256(path) == before
    assert leftovers(full_disk) == []


def test_stamp_in_place_on_a_real_full_disk(checkpoint: Path, full_disk: Path) -> None:
    path = full_disk / "model.pt"
    shutil.copyfile(checkpoint, path)
    envelope, tensors = formats.read_envelope(path)[1], tensors_of(checkpoint)
    fill(full_disk)
    proc = run("stamp", path, "--tag", "full=yes", cwd=full_disk)
    assert_no_space_error(proc, path)
    assert formats.read_envelope(path)[1] == envelope  # reads as it did: no tag, no new history
    assert same_tensors(tensors_of(path), tensors)
    assert leftovers(full_disk) == []


def test_stamp_in_place_on_a_real_full_disk_keeps_the_bytes(checkpoint: Path, full_disk: Path) -> None:
    path = full_disk / "model.pt"
    shutil.copyfile(checkpoint, path)
    before = sha256(path)
    fill(full_disk)
    assert run("stamp", path, "--tag", "full=yes", cwd=full_disk).returncode == 2
    assert sha256(path) == before


# --- the disk fills up at the OS boundary (runs everywhere) --------------------------------------


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    path = tmp_path / "ckptmigrate_on_a_full_disk.py"
    path.write_text(WRAPPER)
    return path


#: (command, how the disk fills): bytes that still fit, or "fsync" when the fsync fails
CASES = [
    ("upgrade", 0), ("upgrade", 4096), ("upgrade", "half"), ("upgrade", "fsync"),
    ("upgrade --no-backup", "half"), ("compact", "half"), ("compact", "fsync"), ("stamp -o", "half"),
    ("stamp", 0),
]


@pytest.mark.parametrize(("command", "room"), CASES, ids=[f"{c}-{r}" for c, r in CASES])
def test_a_disk_that_fills_up_leaves_the_checkpoint_as_it_was(
    checkpoint: Path, wrapper: Path, command: str, room: int | str
) -> None:
    directory = checkpoint.parent
    before, size = sha256(checkpoint), checkpoint.stat().st_size
    env = {"ENOSPC_DIR": str(directory)}
    if room == "fsync":
        env["ENOSPC_AT"] = "fsync"
    else:
        env["ENOSPC_AFTER"] = str(size // 2 if room == "half" else room)
    commands: dict[str, list[str | Path]] = {
        "upgrade": ["upgrade", checkpoint, "--migrations", EXAMPLE],
        "upgrade --no-backup": ["upgrade", checkpoint, "--no-backup", "--migrations", EXAMPLE],
        "compact": ["compact", checkpoint],
        "stamp -o": ["stamp", checkpoint, "-o", directory / "stamped.pt", "--tag", "full=yes"],
        "stamp": ["stamp", checkpoint, "--tag", "full=yes"],
    }
    args = commands[command]
    proc = run(*args, cwd=directory, env=env, wrapper=wrapper)
    assert_no_space_error(proc, directory / "stamped.pt" if command == "stamp -o" else checkpoint)
    assert sha256(checkpoint) == before
    assert sorted(p.name for p in directory.iterdir()) == ["model.pt"]

    if room == "half":  # the same command with room to spare succeeds: the failure was the disk's
        done = run(*args, cwd=directory)
        assert done.returncode == 0, done.stderr


def test_a_disk_that_fills_up_in_the_last_bytes_says_so_and_leaves_the_checkpoint_as_it_was(
    checkpoint: Path, wrapper: Path
) -> None:
    """The kernel writes what fits and returns a short count: here only the last bytes do not fit."""
    before = sha256(checkpoint)
    compacted = checkpoint.parent / "compacted.pt"
    api.compact(checkpoint, output=compacted)
    room = compacted.stat().st_size - 1
    compacted.unlink()
    env = {"ENOSPC_DIR": str(checkpoint.parent), "ENOSPC_AFTER": str(room)}
    proc = run("compact", checkpoint, cwd=checkpoint.parent, env=env, wrapper=wrapper)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_space_error(proc, checkpoint)
    assert sha256(checkpoint) == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("room", [100, "fsync"])
def test_a_stamp_in_place_that_runs_out_of_space_reads_as_before(
    checkpoint: Path, wrapper: Path, room: int | str
) -> None:
    """The append fails after writing part of its tail (or before its end record, when fsync fails):
    the file still reads as the checkpoint it was."""
    envelope, tensors = formats.read_envelope(checkpoint)[1], tensors_of(checkpoint)
    env = {"ENOSPC_DIR": str(checkpoint.parent)}
    env.update({"ENOSPC_AT": "fsync"} if room == "fsync" else {"ENOSPC_AFTER": str(room)})
    proc = run("stamp", checkpoint, "--tag", "full=yes", cwd=checkpoint.parent, env=env, wrapper=wrapper)
    assert_no_space_error(proc, checkpoint)
    assert formats.read_envelope(checkpoint)[1] == envelope
    assert same_tensors(tensors_of(checkpoint), tensors)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("room", [100, "fsync"])
def test_a_stamp_in_place_that_runs_out_of_space_keeps_the_bytes(
    checkpoint: Path, wrapper: Path, room: int | str
) -> None:
    before = sha256(checkpoint)
    env = {"ENOSPC_DIR": str(checkpoint.parent)}
    env.update({"ENOSPC_AT": "fsync"} if room == "fsync" else {"ENOSPC_AFTER": str(room)})
    proc = run("stamp", checkpoint, "--tag", "full=yes", cwd=checkpoint.parent, env=env, wrapper=wrapper)
    assert proc.returncode == 2
    assert sha256(checkpoint) == before
