"""User story: "my MoE checkpoint has thousands of tensors, and a rename still appends in place —
and if the job dies mid-append, ``torch.load`` still reads the checkpoint I had."

A metadata-only change appends a new ``data.pkl``, envelope and directory to the file however large
that tail is (beyond the 64 KiB in which zip readers look for the end record), and whatever bytes it
holds (extras that embed a small zip carry an end-of-directory signature of their own). These tests
rebuild every state an interrupted append can leave — the original bytes, then zeros or a prefix of
the new tail, then the copy of the old end that ``ZipWriter.close_appended`` writes first — at many
cut points, and check that ``torch.load`` and ckptmigrate read the original in each, and that the
next run completes the migration and leaves no dead tail. ``tests/test_crash_safety.py`` kills real
runs at random moments on the same kind of file.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.formats import zipio

Cli = Callable[..., object]
TENSORS = 3000  # a directory of ~100 KiB and a data.pkl of ~150 KiB: far past the 64 KiB window

UNWRAP = '''
revision = "r1"
down_revision = None


def upgrade(ckpt):
    ckpt.unwrap("module.")
'''


def embedded_zip() -> bytes:
    """A code snapshot, as training scripts keep one: a small zip, end record and all."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("train.py", (2024, 1, 1, 0, 0, 0)), "print('hello')\n")
    assert b"PK\x05\x06" in buf.getvalue()
    return buf.getvalue()


def many_tensors(n: int) -> dict[str, object]:
    sd = {f"module.experts.{i // 8}.w{i % 8}": torch.full((4,), float(i)) for i in range(n)}
    return {"state_dict": sd, "code": embedded_zip(), "epoch": 3}


def scripts(root: Path) -> Path:
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1_unwrap.py").write_text(UNWRAP)
    return root / "migrations"


def loaded_keys(path: Path) -> tuple[list[str], bytes]:
    obj = torch.load(path, weights_only=True)
    return list(obj["state_dict"]), obj["code"]


@pytest.fixture
def appended(tmp_path: Path, cli: Cli) -> tuple[Path, bytes, bytes]:
    """(the file after a completed in-place upgrade, its bytes before, after)."""
    path = tmp_path / "moe.pt"
    torch.save(many_tensors(TENSORS), path)
    before = path.read_bytes()
    proc: object = cli("upgrade", path, "--no-backup", "--from", "base", "--migrations", scripts(tmp_path))
    assert getattr(proc, "returncode") == 0, getattr(proc, "stderr")  # noqa: B009
    return path, before, path.read_bytes()


def test_a_large_tail_is_appended_in_place(appended: tuple[Path, bytes, bytes]) -> None:
    path, before, after = appended
    assert after[: len(before)] == before  # not a byte of the original moved: nothing was copied
    assert len(after) - len(before) > 2 * 65536  # a tail the old 64 KiB window could not hold
    keys, code = loaded_keys(path)
    assert keys == [f"experts.{i // 8}.w{i % 8}" for i in range(TENSORS)]
    assert code == embedded_zip()
    for mmap in (False, True):
        t = torch.load(path, mmap=mmap, weights_only=True)["state_dict"]["experts.374.w7"]
        assert t.equal(torch.full((4,), 2999.0))
    with zipfile.ZipFile(path) as zf:  # Python's zip reader agrees
        assert zf.testzip() is None
    # the end written last lies inside one page, so a killed write leaves it whole or absent
    assert (len(after) - zipio.APPEND_END) % 4096 <= 4096 - zipio.APPEND_END
    # the new data.pkl holds the embedded end-record signature, before the real end
    assert after.find(b"PK\x05\x06", len(before)) < len(after) - 22


def interrupted(before: bytes, after: bytes, written: int) -> bytes:
    """The file as an append killed after ``written`` bytes of its tail leaves it (see
    ``ZipWriter.close_appended``): the original, a prefix of the tail, zeros, the copy of the old end."""
    end = zipio.APPEND_END
    gap = len(after) - end - len(before)
    written = min(written, gap)
    return before + after[len(before) : len(before) + written] + bytes(gap - written) + before[-end:]


def test_every_interrupted_state_reads_as_the_original(
    appended: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    path, before, after = appended
    tail = len(after) - len(before)
    signature = after.find(b"PK\x05\x06", len(before)) - len(before)
    cuts = sorted({0, 1, 4096, signature - 1, signature + 4, signature + 30, tail // 2, tail - 100, tail})
    want_keys, want_code = loaded_keys_of_original(before, tmp_path)
    for cut in cuts:
        state = tmp_path / f"cut-{cut}.pt"
        state.write_bytes(interrupted(before, after, cut))
        assert loaded_keys(state) == (want_keys, want_code), f"torch reads another archive at cut {cut}"
        assert zipio.live_length(os.open(state, os.O_RDONLY), state.stat().st_size) == len(before)
        with Checkpoint.open(state) as ckpt:
            assert list(ckpt.tensors()) == want_keys
        state.unlink()


def loaded_keys_of_original(before: bytes, tmp_path: Path) -> tuple[list[str], bytes]:
    original = tmp_path / "original.pt"
    original.write_bytes(before)
    return loaded_keys(original)


def test_the_next_run_cuts_the_dead_tail_and_completes(
    appended: tuple[Path, bytes, bytes], tmp_path: Path, cli: Cli
) -> None:
    path, before, after = appended
    path.write_bytes(interrupted(before, after, (len(after) - len(before)) // 2))
    proc: object = cli("upgrade", path, "--no-backup", "--from", "base", "--migrations", tmp_path / "migrations")
    assert getattr(proc, "returncode") == 0, getattr(proc, "stderr")  # noqa: B009
    again = path.read_bytes()
    assert again[: len(before)] == before
    # the dead tail was cut before the new one was appended: one tail's records, one tail's size (the
    # envelope's timestamp can compress a byte longer or shorter)
    assert again[len(before):].count(b"PK\x03\x04") == after[len(before):].count(b"PK\x03\x04")
    assert abs(len(again) - len(after)) < 64
    keys, _ = loaded_keys(path)
    assert keys[0] == "experts.0.w0"
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None


def test_a_file_with_a_comment_is_rewritten_not_appended(tmp_path: Path, cli: Cli) -> None:
    """A zip whose end record is not the file's last bytes cannot take the append protocol."""
    path = tmp_path / "commented.pt"
    torch.save(many_tensors(16), path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = b"archived by a tool that writes comments"
    inode = path.stat().st_ino
    proc: object = cli("upgrade", path, "--no-backup", "--from", "base", "--migrations", scripts(tmp_path))
    assert getattr(proc, "returncode") == 0, getattr(proc, "stderr")  # noqa: B009
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert loaded_keys(path)[0][0] == "experts.0.w0"
