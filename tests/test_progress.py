"""User story: "I upgrade one 40 GB checkpoint in my terminal and can see how far it got; in CI logs
nothing but the result line appears."

Real subprocesses on a pseudo-terminal (what a person's shell gives them) and on pipes: a streaming
upgrade (a transpose rewrites every byte), a digest stamp and a verify of one large file draw a
byte bar on the terminal; the same commands in a pipe, and a small file anywhere, print no bar.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from ckptmigrate.util.progress import MIN_BYTES

BAR = re.compile(r"(upgrade|stamp|verify): +\d+%\|")


def on_terminal(args: list[str | Path], cwd: Path) -> tuple[int, str]:
    """Run ``ckptmigrate ARGS`` with stdout and stderr on a pseudo-terminal; its exit code and output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([sys.executable, "-m", "ckptmigrate", *map(str, args)], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    out = bytearray()
    while True:
        try:
            data = os.read(leader, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(leader)
    return proc.wait(timeout=300), out.decode(errors="replace")


def in_a_pipe(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptmigrate", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """t1 (base) → t2: transpose every ``*.proj`` weight, so the whole file is rewritten."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "t1.py").write_text('"""Base."""\nrevision = "t1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
                                    "    pass\n")
    (versions / "t2.py").write_text('"""Transpose."""\nrevision = "t2"\ndown_revision = "t1"\n\n\n'
                                    "def upgrade(ckpt):\n    ckpt.transpose(r'.*\\.proj\\.weight', 0, 1)\n")
    return versions.parent


def checkpoint(path: Path, nbytes: int) -> Path:
    """Four float32 ``[n, 256]`` projection weights of ``nbytes`` in all."""
    rows = nbytes // (4 * 4 * 256)
    torch.save({f"layer{i}.proj.weight": torch.randn(rows, 256) for i in range(4)}, path)
    return path


def test_a_large_upgrade_stamp_and_verify_show_a_bar_on_a_terminal(tmp_path: Path, chain: Path) -> None:
    path = checkpoint(tmp_path / "big.pt", MIN_BYTES + (8 << 20))
    rows = torch.load(path, mmap=True)["layer0.proj.weight"].shape[0]
    code, out = on_terminal(["upgrade", path, "--from", "t1", "--no-backup", "--migrations", chain], tmp_path)
    assert code == 0, out
    assert re.search(r"upgrade: +\d+%\|", out), out
    assert torch.load(path, mmap=True)["layer0.proj.weight"].shape == (256, rows)

    code, out = on_terminal(["stamp", path, "--digest"], tmp_path)
    assert code == 0 and re.search(r"stamp: +\d+%\|", out), out
    code, out = on_terminal(["verify", path], tmp_path)
    assert code == 0 and re.search(r"verify: +\d+%\|", out), out
    assert "OK" in out


def test_no_bar_in_a_pipe_or_for_a_small_file(tmp_path: Path, chain: Path) -> None:
    big = checkpoint(tmp_path / "big.pt", MIN_BYTES + (8 << 20))
    piped = in_a_pipe(["upgrade", big, "--from", "t1", "--no-backup", "--migrations", chain], tmp_path)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == "" and not BAR.search(piped.stdout)
    assert len(piped.stdout.splitlines()) == 1

    small = checkpoint(tmp_path / "small.pt", 1 << 20)
    code, out = on_terminal(["upgrade", small, "--from", "t1", "--no-backup", "--migrations", chain], tmp_path)
    assert code == 0 and not BAR.search(out), out


def test_a_batch_on_a_terminal_shows_a_bar_of_files(tmp_path: Path) -> None:
    for i in range(3):
        checkpoint(tmp_path / f"small{i}.pt", 1 << 20)
    code, out = on_terminal(["stamp", tmp_path, "-j", "2"], tmp_path)
    assert code == 0, out
    assert re.search(r"stamp: 100%\|[^|]*\| 3/3", out), out
    assert "3 files: 3 stamped, 0 failed" in out
