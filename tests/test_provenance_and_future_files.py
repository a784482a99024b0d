"""User story: "Which code made this file — and what if a newer release made it?"

Every history entry records the sha256 of the script that ran and ckptmigrate's version;
``current --verbose`` and ``check`` warn, naming the revision, when a script was edited after it ran
on a file. A file written by a newer release (at a revision this checkout does not know) is
reported as newer than the chain — by how many recorded revisions, written by which version — by
``current``, ``inspect``, ``upgrade`` and ``load``, and ``downgrade --to KNOWN_REV`` walks it back
through the inverse journal in the file's own history. The "older release" is a real git checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptmigrate
from ckptmigrate import formats

Cli = Callable[..., subprocess.CompletedProcess[str]]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}


def script(rev: str, down: str | None, body: str) -> str:
    return (f'"""Revision {rev}."""\nimport torch\n\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
            f"def upgrade(ckpt):\n{body}")


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **GIT_ENV})


def envelope(path: Path) -> dict[str, Any]:
    env = formats.read_envelope(path)[1]
    assert env is not None
    return env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with a chain r1 (rename a -> b), r2 (rename b -> c) and a one-parameter model."""
    (tmp_path / "pyproject.toml").write_text('[tool.ckptmigrate]\nmigrations = "m"\nmodel = "netmod:Net"\n')
    (tmp_path / "netmod.py").write_text(
        "import torch\n\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.c = torch.nn.Parameter(torch.zeros(2, 3))\n")
    versions = tmp_path / "m" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1.py").write_text(script("r1", None, "    ckpt.rename('a', 'b')\n"))
    (versions / "r2.py").write_text(script("r2", "r1", "    ckpt.rename('b', 'c')\n"))
    (versions / "r2.schema.json").write_text(json.dumps({"c": {"shape": [2, 3], "dtype": "float32"}}))
    return tmp_path


def test_history_records_the_script_hash_and_version_and_edits_are_warned_of(project: Path, cli: Cli) -> None:
    path = project / "model.pt"
    torch.save({"a": torch.arange(6.0).reshape(2, 3)}, path)
    cli("upgrade", path, "--from", "base", "--no-backup", check=True)
    entries = [e for e in envelope(path)["history"] if e["action"] == "upgrade"]
    for entry in entries:
        script_file = project / "m" / "versions" / f"{entry['revision']}.py"
        assert entry["script_sha256"] == hashlib.sha256(script_file.read_bytes()).hexdigest()
        assert entry["ckptmigrate_version"] == ckptmigrate.__version__
    quiet = cli("current", path, "--verbose", check=True)
    assert quiet.stderr == "" and quiet.stdout.splitlines()[0] == "r2"
    assert f"upgrade r1 at {entries[0]['at']} by ckptmigrate {ckptmigrate.__version__}" in quiet.stdout

    # someone edits r1 after it ran on the file
    r1 = project / "m" / "versions" / "r1.py"
    r1.write_text(r1.read_text() + "    ckpt.add('extra', torch.zeros(1))\n")
    warned = cli("current", path, "--verbose", check=True)
    assert f"warning: {path}: revision r1's script {r1} has changed since it was applied to this file" \
        in warned.stderr
    assert "r2's script" not in warned.stderr
    rows = json.loads(cli("current", path, "--verbose", "--json", check=True).stdout)
    assert len(rows["warnings"]) == 1 and "revision r1's script" in rows["warnings"][0]
    checked = cli("check", path)
    assert checked.returncode == 0, checked.stderr
    assert "revision r1's script" in checked.stderr and "ok: head r2 matches netmod:Net" in checked.stdout


@pytest.fixture
def newer_file(project: Path, cli: Cli) -> tuple[Path, dict[str, torch.Tensor]]:
    """The project as a git repository: release 1 has r1, r2; release 2 adds r3 (rename c -> d) and r4
    (transpose d). A file upgraded by release 2, then the checkout goes back to release 1."""
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "release 1")
    git(project, "tag", "v1")
    versions = project / "m" / "versions"
    (versions / "r3.py").write_text(script("r3", "r2", "    ckpt.rename('c', 'd')\n"))
    (versions / "r4.py").write_text(script("r4", "r3", "    ckpt.transpose('d', 0, 1)\n"))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "release 2")
    path = project / "model.pt"
    original = {"a": torch.arange(6.0).reshape(2, 3)}
    torch.save(original, path)
    cli("upgrade", path, "--from", "base", "--no-backup", check=True)
    assert envelope(path)["revision"] == "r4"
    git(project, "checkout", "-q", "v1")
    assert not (versions / "r3.py").exists()
    return path, original


def test_a_file_from_a_newer_release_says_so(newer_file: tuple[Path, Any], project: Path, cli: Cli) -> None:
    path, _ = newer_file
    expected = (f"{path}: the file is newer than the installed chain (head r2): 2 recorded revisions past r2 "
                f"(r3, r4), written by ckptmigrate {ckptmigrate.__version__}")
    current = cli("current", path, check=True)
    assert current.stdout.strip() == "r4" and expected in current.stderr
    assert f"`ckptmigrate downgrade {path} --to r2`" in current.stderr
    assert expected in cli("inspect", path, check=True).stderr
    row = json.loads(cli("current", path, "--json", check=True).stdout)
    assert row["newer"] == {"known": "r2", "ahead": ["r3", "r4"],
                            "written_by": [f"ckptmigrate {ckptmigrate.__version__}"],
                            "hint": f"`ckptmigrate downgrade {path} --to r2`"}
    before = path.read_bytes()
    upgrade = cli("upgrade", path)
    assert upgrade.returncode == 2 and expected in upgrade.stderr and "Traceback" not in upgrade.stderr
    assert path.read_bytes() == before

    from ckptmigrate.errors import NewerThanChain

    with pytest.raises(NewerThanChain) as info:
        ckptmigrate.load(path, migrations=project / "m")
    assert (info.value.known, info.value.ahead, info.value.revision) == ("r2", ["r3", "r4"], "r4")


def test_an_older_checkout_walks_a_newer_file_back_through_its_own_journal(
        newer_file: tuple[Path, dict[str, torch.Tensor]], cli: Cli) -> None:
    path, original = newer_file
    out = cli("downgrade", path, "--to", "r2", "--no-backup", check=True).stdout
    assert "downgrade r4 -> r3 -> r2" in out
    assert envelope(path)["revision"] == "r2"
    state = torch.load(path)
    assert list(state) == ["c"] and torch.equal(state["c"], original["a"])
    # from here on it is a file this checkout knows
    cli("downgrade", path, "--to", "base", "--no-backup", check=True)
    assert torch.equal(torch.load(path)["a"], original["a"])


def test_a_newer_revision_that_recorded_no_inverse_cannot_be_walked_back(project: Path, cli: Cli) -> None:
    # the file holds `keep` beside the model's `c`, so r2's snapshot says so (each step is held to it)
    snapshot = {"c": {"shape": [2, 3], "dtype": "float32"}, "keep": {"shape": [1], "dtype": "float32"}}
    (project / "m" / "versions" / "r2.schema.json").write_text(json.dumps(snapshot))
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "release 1")
    (project / "m" / "versions" / "r3.py").write_text(script("r3", "r2", "    ckpt.drop('c')\n"))
    path = project / "model.pt"
    torch.save({"a": torch.zeros(2, 3), "keep": torch.ones(1)}, path)
    cli("upgrade", path, "--from", "base", "--no-backup", check=True)
    git(project, "clean", "-qfd", "m")
    line = cli("downgrade", path, "--to", "r2").stderr.strip()
    assert "cannot walk back from r3: revision r3 of the file's history recorded no invertible journal" in line
