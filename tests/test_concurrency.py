"""User story: "two jobs upgraded the same checkpoint at once, and it came out upgraded exactly once."

Processes that ``upgrade`` or ``stamp`` the same file at once are serialised by its lock
(``flock`` on ``.NAME.ckptmigrate-lock``): the test holds the lock, starts several real
``ckptmigrate`` processes, waits until the kernel shows every one of them blocked on it, and lets
go. The file ends at head with each revision once in its history and the tensors of a single run;
the later processes find nothing to do, or stamp on top of the upgrade (or the upgrade on top of
the stamp) — no write is lost, no backup is written into. A lock held through a symlink is the
lock of the file it points to. A lock file left by a holder killed with SIGKILL — with the
temporary file it was writing — or a lock file nobody holds does not block the next run, which
removes them (and only them).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate import api, formats
from ckptmigrate.chain import engine
from ckptmigrate.example import model_at
from ckptmigrate.storage.locking import lock_path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "migrations")
UPGRADED = ["0002", "0003", "0004", "0005", "0006"]

HOLD = """
import sys
from ckptmigrate.storage.locking import file_lock
with file_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin, or kills this process
"""

HOLD_WHILE_WRITING = """
import sys, time
from ckptmigrate.storage.atomic import atomic_write
from ckptmigrate.storage.locking import file_lock
with file_lock(sys.argv[1]), atomic_write(sys.argv[1]) as fh:
    fh.write(b"half of a new checkpoint" * 4096)
    fh.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def envelope_of(path: Path) -> dict[str, Any]:
    env = formats.read_envelope(path)[1]
    assert env is not None, f"{path} is not stamped"
    return env


def actions(env: dict[str, Any], action: str) -> list[Any]:
    return [h.get("revision") for h in env["history"] if h.get("action") == action]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, mmap=True, weights_only=True)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape and torch.equal(got[k], w), k


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(".ckptmigrate-tmp-") or p.name.endswith((".part", ".ckptmigrate-lock")))


def ckptmigrate(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "ckptmigrate", *map(str, args)]


def start(argv: list[str], cwd: Path, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def flocks(lock_file: Path) -> tuple[set[int], set[int]]:
    """(holders, waiters): the pids the kernel lists as holding or blocked on ``lock_file``'s flock."""
    try:
        inode = lock_file.stat().st_ino
    except FileNotFoundError:
        return set(), set()
    holders: set[int] = set()
    waiters: set[int] = set()
    with open("/proc/locks") as fh:
        for line in fh:
            parts = line.split()
            blocked = parts[1] == "->"
            if blocked:
                parts = parts[1:]
            if parts[1] != "FLOCK" or int(parts[5].rsplit(":", 1)[1]) != inode:
                continue
            (waiters if blocked else holders).add(int(parts[4]))
    return holders, waiters


def wait_until_blocked(lock_file: Path, procs: list[subprocess.Popen[str]], timeout: float = 120) -> None:
    """Wait until every process in ``procs`` is blocked on the flock of ``lock_file``."""
    deadline = time.monotonic() + timeout
    pids = {p.pid for p in procs}
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                out, err = p.communicate()
                raise AssertionError(f"{p.args!r} ended while the lock was held (exit {p.returncode}):\n{out}{err}")
        if pids <= flocks(lock_file)[1]:
            return
        time.sleep(0.02)
    raise AssertionError(f"not all of {pids} blocked on {lock_file}: {flocks(lock_file)}")


class Holder:
    """A separate process holding a file's lock until released (or killed)."""

    def __init__(self, path: Path, script: str = HOLD) -> None:
        self.proc = start([sys.executable, "-c", script, str(path)], path.parent, stdin=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() in ("locked", "writing"), (line, self.proc.stderr.read() if self.proc.stderr else "")

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.communicate()


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{p.args!r} exited {p.returncode}:\n{err}"
        assert err == "", err
        outputs.append(out)
    return outputs


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """An era-1 checkpoint with a 32 MiB tensor besides the model, stamped at 0001."""
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = dict(model_at(1).state_dict())
    sd["module.big.weight"] = torch.randn(8 * 1024 * 1024, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    torch.save(sd, path)
    api.stamp(path, revision="0001", lineage="example")
    return path


@pytest.fixture
def single_run(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The tensors one upgrade alone produces."""
    alone = tmp_path / "alone.pt"
    shutil.copyfile(checkpoint, alone)
    engine.migrate_file(alone, api.revision_graph(EXAMPLE), backup=False)
    return tensors_of(alone)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    """Holder processes still running at the end of a test are killed."""
    started: list[Holder] = []
    yield started
    for h in started:
        if h.proc.poll() is None:
            h.kill()


def test_upgrades_started_together_upgrade_the_file_once(
    checkpoint: Path, single_run: dict[str, torch.Tensor], holders: list[Holder]
) -> None:
    original = sha256(checkpoint)
    holders.append(holder := Holder(checkpoint))
    procs = [start(ckptmigrate("upgrade", checkpoint, "--migrations", EXAMPLE), checkpoint.parent) for _ in range(3)]
    wait_until_blocked(lock_path(checkpoint), procs)
    assert sha256(checkpoint) == original  # nobody wrote while the lock was held
    holder.release()
    outputs = finish(procs)

    assert sum("upgrade 0001 -> 0002 -> 0003 -> 0004 -> 0005 -> 0006" in o for o in outputs) == 1, outputs
    assert sum("already at 0006, left untouched" in o for o in outputs) == 2, outputs
    env = envelope_of(checkpoint)
    assert env["revision"] == "0006"
    assert actions(env, "upgrade") == UPGRADED
    assert_same_tensors(tensors_of(checkpoint), single_run)
    backups = sorted(p.name for p in checkpoint.parent.glob("model.pt.bak*"))
    assert backups == ["model.pt.bak"]
    assert sha256(checkpoint.parent / "model.pt.bak") == original
    assert leftovers(checkpoint.parent) == []


def test_a_stamp_and_an_upgrade_at_once_both_land(
    checkpoint: Path, single_run: dict[str, torch.Tensor], holders: list[Holder]
) -> None:
    original = sha256(checkpoint)
    original_tensors = {k: v.clone() for k, v in tensors_of(checkpoint).items()}
    holders.append(holder := Holder(checkpoint))
    upgrade = start(ckptmigrate("upgrade", checkpoint, "--migrations", EXAMPLE), checkpoint.parent)
    stamp = start(ckptmigrate("stamp", checkpoint, "--tag", "who=stamp"), checkpoint.parent)
    wait_until_blocked(lock_path(checkpoint), [upgrade, stamp])
    holder.release()
    finish([upgrade, stamp])

    env = envelope_of(checkpoint)
    assert env["revision"] == "0006"
    assert actions(env, "upgrade") == UPGRADED
    assert [h["tags"] for h in env["history"] if h["action"] == "stamp"][-1] == {"who": "stamp"}
    assert env["tags"]["who"] == "stamp"
    assert_same_tensors(tensors_of(checkpoint), single_run)
    # the backup is the file as the upgrade found it, never written into afterwards
    backup = checkpoint.parent / "model.pt.bak"
    bak_env = envelope_of(backup)
    assert bak_env["revision"] == "0001"
    stamps = [h for h in env["history"] if h["action"] == "stamp"]
    if sha256(backup) == original:  # the upgrade went first, the stamp on top of it
        assert stamps[-1]["revision"] == "0006"
    else:  # the stamp went first, the upgrade on top of the stamped file
        assert stamps[-1]["revision"] == "0001" and bak_env["tags"] == {"who": "stamp"}
    assert_same_tensors(tensors_of(backup), original_tensors)
    assert leftovers(checkpoint.parent) == []


def test_stamps_racing_without_a_held_lock_keep_every_tag(checkpoint: Path) -> None:
    """No help from the test: processes started together still serialise on their own."""
    for round_ in range(3):
        procs = [start(ckptmigrate("stamp", checkpoint, "--tag", f"r{round_}p{i}=yes"), checkpoint.parent)
                 for i in range(3)]
        finish(procs)
    env = envelope_of(checkpoint)
    assert {f"r{r}p{i}" for r in range(3) for i in range(3)} <= set(env["tags"])
    assert len(actions(env, "stamp")) == 1 + 9  # the fixture's stamp, then nine more, none lost
    assert leftovers(checkpoint.parent) == []


def test_a_lock_through_a_symlink_is_the_lock_of_its_target(checkpoint: Path, holders: list[Holder]) -> None:
    link = checkpoint.parent / "latest.pt"
    link.symlink_to(checkpoint.name)
    holders.append(holder := Holder(checkpoint))
    stamp = start(ckptmigrate("stamp", link, "--tag", "via=link"), checkpoint.parent)
    wait_until_blocked(lock_path(checkpoint), [stamp])
    holder.release()
    finish([stamp])
    assert link.is_symlink()
    assert envelope_of(checkpoint)["tags"]["via"] == "link"
    assert leftovers(checkpoint.parent) == []


@pytest.mark.parametrize("command", ["stamp", "upgrade"])
def test_a_lock_left_by_a_killed_holder_does_not_block_the_next_run(
    checkpoint: Path, holders: list[Holder], command: str
) -> None:
    original = sha256(checkpoint)
    holders.append(holder := Holder(checkpoint))
    holder.kill()
    assert lock_path(checkpoint).exists()  # SIGKILL ran no cleanup: the lock file stays, unheld
    assert flocks(lock_path(checkpoint)) == (set(), set())
    args = ["--tag", "after=kill"] if command == "stamp" else ["--migrations", EXAMPLE]
    began = time.monotonic()
    done = subprocess.run(ckptmigrate(command, checkpoint, *args), cwd=checkpoint.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began < 60
    env = envelope_of(checkpoint)
    if command == "stamp":
        assert env["tags"]["after"] == "kill"
    else:
        assert env["revision"] == "0006"
    assert sha256(checkpoint) != original
    assert leftovers(checkpoint.parent) == []


def test_a_killed_writer_leaves_lock_and_temporary_file_that_the_next_run_removes(
    checkpoint: Path, holders: list[Holder]
) -> None:
    original = sha256(checkpoint)
    other = checkpoint.parent / "other.pt"
    shutil.copyfile(checkpoint, other)
    holders.append(writer := Holder(checkpoint, HOLD_WHILE_WRITING))
    holders.append(other_writer := Holder(other, HOLD_WHILE_WRITING))  # another file's live write
    writer.kill()
    assert sha256(checkpoint) == original
    stale = leftovers(checkpoint.parent)
    assert any(n.startswith(".ckptmigrate-tmp-model.pt.") for n in stale), stale
    other_temp = [n for n in stale if n.startswith(".ckptmigrate-tmp-other.pt.")]
    assert len(other_temp) == 1, stale

    done = subprocess.run(ckptmigrate("stamp", checkpoint), cwd=checkpoint.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # model.pt's lock file and temporary file are gone; other.pt's write, still going on, is untouched
    assert leftovers(checkpoint.parent) == sorted([".other.pt.ckptmigrate-lock", *other_temp])
    assert flocks(lock_path(other))[0] == {other_writer.proc.pid}


def test_a_lock_file_nobody_holds_does_not_block(checkpoint: Path) -> None:
    lock_path(checkpoint).write_text("left by a copy of the directory\n")
    done = subprocess.run(ckptmigrate("stamp", checkpoint, "--tag", "stale=ok"), cwd=checkpoint.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert envelope_of(checkpoint)["tags"]["stale"] == "ok"
    assert leftovers(checkpoint.parent) == []
