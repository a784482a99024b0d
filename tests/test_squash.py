"""User story: "Our chain has 40 revisions; squash the old ones without stranding stamped files."

``ckptmigrate squash FIRST LAST -m MSG`` replaces a straight run by one revision that runs the old
upgrades in order; the old ids stay as aliases, so a file stamped at LAST is at the new revision, a
file before the run goes through it, and a file part-way through is told to walk back through its
own journal. ``--final`` makes the squashed revision a floor: files below it are refused, naming the
last release that can read them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate import formats

Cli = Callable[..., subprocess.CompletedProcess[str]]

SCRIPTS = {
    "r1": (None, "    ckpt.rename('a', 'b')\n"),
    "r2": ("r1", "    ckpt.rename('b', helper('c'))\n"),
    "r3": ("r2", "    ckpt.transpose('c', 0, 1)\n"),
    "r4": ("r3", "    ckpt.rename('c', 'd')\n"),
}


def write(versions: Path, rev: str, down: str | None, body: str) -> None:
    helper = "\n\ndef helper(name):\n    return name\n" if rev == "r2" else ""
    (versions / f"{rev}.py").write_text(
        f'"""Revision {rev}."""\nimport torch\n\nrevision = {rev!r}\ndown_revision = {down!r}\n{helper}\n\n'
        f"def upgrade(ckpt):\n    # {rev}'s own comment\n{body}")


def state(path: Path) -> dict[str, list[Any]]:
    return {k: v.tolist() for k, v in torch.load(path).items()}


def revision(path: Path) -> str | None:
    env = formats.read_envelope(path)[1]
    return None if env is None else env.get("revision")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    versions = tmp_path / "m" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[tool.ckptmigrate]\nmigrations = "m"\n')
    for rev, (down, body) in SCRIPTS.items():
        write(versions, rev, down, body)
    return tmp_path


def make(project: Path, name: str, at: str, cli: Cli) -> Path:
    path = project / name
    torch.save({"a": torch.arange(6.0).reshape(2, 3)}, path)
    cli("upgrade", path, "--from", "base", "--to", at, "--no-backup", check=True)
    return path


def test_squash_keeps_stamped_files_working(project: Path, cli: Cli) -> None:
    at_r3, at_r1, at_r2 = (make(project, f"{r}.pt", r, cli) for r in ("r3", "r1", "r2"))
    expected = {"d": torch.arange(6.0).reshape(2, 3).T.tolist()}

    out = cli("squash", "r2", "r3", "-m", "rename and transpose", "--rev-id", "s1", check=True).stdout
    versions = project / "m" / "versions"
    squashed = versions / "s1_rename_and_transpose.py"
    assert out.strip() == f"created {squashed.relative_to(project)}" or out.strip() == f"created {squashed}"
    assert not (versions / "r2.py").exists() and not (versions / "r3.py").exists()
    text = squashed.read_text()
    assert "aliases = ('r2', 'r3')" in text and "down_revision = 'r1'" in text
    assert "# r2's own comment" in text and "def helper(name)" in text
    assert cli("history", check=True).stdout.splitlines() == [
        "s1 -> r4  Revision r4.", "r1 -> s1  rename and transpose", "<base> -> r1  Revision r1."]

    # stamped at the last squashed id: exactly at s1; upgrades on, and downgrades back through r3's and r2's journals
    assert cli("current", at_r3, check=True).stderr == ""
    cli("upgrade", at_r3, "--no-backup", check=True)
    assert revision(at_r3) == "r4" and state(at_r3) == expected
    # before the run: through s1
    cli("upgrade", at_r1, "--no-backup", check=True)
    assert revision(at_r1) == "r4" and state(at_r1) == expected
    for path in (at_r3, at_r1):
        cli("downgrade", path, "--to", "r1", "--no-backup", check=True)
        assert state(path) == {"b": torch.arange(6.0).reshape(2, 3).tolist()}
    # part-way through: told so, walked back through its own journal, then upgraded
    line = cli("upgrade", at_r2).stderr
    assert f"{at_r2}: revision r2 was squashed into s1 (s1_rename_and_transpose.py) (r2, r3)" in line
    assert f"`ckptmigrate downgrade {at_r2} --to r1`" in line
    cli("downgrade", at_r2, "--to", "r1", "--no-backup", check=True)
    cli("upgrade", at_r2, "--no-backup", check=True)
    assert state(at_r2) == expected


def test_a_run_with_a_branch_or_mixed_downgrades_is_refused(project: Path, cli: Cli) -> None:
    versions = project / "m" / "versions"
    write(versions, "x2", "r2", "    pass\n")
    line = cli("squash", "r2", "r4", "-m", "x").stderr
    assert "r2 (r2.py) is a branch point (r3, x2): squash a straight run" in line
    (versions / "x2.py").unlink()
    (versions / "r3.py").write_text((versions / "r3.py").read_text() + "\n\ndef downgrade(ckpt):\n    pass\n")
    line = cli("squash", "r2", "r3", "-m", "x").stderr
    assert "r2 have no downgrade() and the others do" in line
    assert (versions / "r2.py").exists() and len(list(versions.glob("*.py"))) == 4


def test_a_final_revision_is_a_floor(project: Path, cli: Cli) -> None:
    old = make(project, "old.pt", "r1", cli)
    cli("squash", "r2", "r3", "-m", "floor", "--rev-id", "s1", "--final", "--last-release", "mylib 1.4", check=True)
    before = old.read_bytes()
    line = cli("upgrade", old).stderr
    assert f"{old}: at r1, below this chain's floor s1 (s1_floor.py) (final = True); mylib 1.4 is the last " \
           "release that can upgrade it to s1" in line
    assert old.read_bytes() == before
    # the revisions below the floor removed: the file's revision is unknown, and the floor explains it
    squashed = project / "m" / "versions" / "s1_floor.py"
    squashed.write_text(squashed.read_text().replace("down_revision = 'r1'", "down_revision = None"))
    (project / "m" / "versions" / "r1.py").unlink()
    line = cli("upgrade", old).stderr
    assert "revision r1 is not in this chain, whose floor is s1 (s1_floor.py)" in line
    assert "mylib 1.4 is the last release that can upgrade it to s1" in line
