"""User story: "everything the CLI does, my Python code can do — and gets the same answer."

Every command is a plain function (``ckptmigrate.api``): ``check``, ``diff``, ``init``,
``new_revision``, ``heads``, ``history``, ``current``, ``stamp``, ``upgrade``, ``downgrade``,
``verify``, ``verify_manifest``, ``record_schema``; the CLI only parses and prints. Validation lives
in the API: ``stamp(revision=...)`` of an unknown revision is refused there, not only by the CLI.
Each function is compared with its command run as a subprocess on the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import ckptmigrate
from ckptmigrate import api
from ckptmigrate.example import model_at
from ckptmigrate.release.manifest import MANIFEST_FORMAT, MANIFEST_VERSION

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "migrations"
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A fresh project directory as the working directory (the API reads pyproject.toml from there)."""
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


def test_project_functions_match_their_commands(project: Path, cli: Cli) -> None:
    root, pyproject = api.init("migrations")
    assert root == project / "migrations" and (root / "versions").is_dir() and pyproject == project / "pyproject.toml"
    with pytest.raises(ckptmigrate.BadInput, match="already a script directory"):
        api.init("migrations")
    first = api.new_revision("baseline", rev_id="a1")
    second = api.new_revision("rename", rev_id="a2")
    assert first.name == "a1_baseline.py" and second.name == "a2_rename.py"
    assert api.heads() == json.loads(cli("heads", "--json", check=True).stdout)
    assert api.history() == json.loads(cli("history", "--json", check=True).stdout)
    assert [row["revision"] for row in api.history()] == ["a2", "a1"]


def test_check_and_diff_return_what_the_commands_print(tmp_path: Path, cli: Cli) -> None:
    model = "ckptmigrate.example:current_model"
    result = api.check(model=model, migrations=EXAMPLE)
    assert result.ok and result.head == "0006"
    assert json.loads(cli("check", "--model", model, "--migrations", EXAMPLE, "--json", check=True).stdout) \
        == result.to_dict()

    comparison = api.diff("0003", "0004", migrations=EXAMPLE)
    assert not comparison.same and comparison.a == "revision 0003"
    assert json.loads(cli("diff", "0003", "0004", "--migrations", EXAMPLE, "--json", check=True).stdout) \
        == comparison.to_dict()

    failing = cli("check", "--model", "ckptmigrate.example:model_at", "--migrations", EXAMPLE)
    assert failing.returncode == 2 and "Traceback" not in failing.stderr  # the factory itself fails: bad input
    assert "model 'ckptmigrate.example:model_at': the factory raised TypeError" in failing.stderr


def test_checkpoint_functions_match_their_commands(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    torch.save(model_at(1).state_dict(), tmp_path / "era1.pth")
    outcome = api.upgrade(tmp_path / "era1.pth", to="0003", migrations=EXAMPLE)
    assert outcome.written and [s.id for s in outcome.plan.steps] == ["0002", "0003"]  # type: ignore[union-attr]
    assert api.current(tmp_path / "era1.pth") == {**json.loads(cli("current", "era1.pth", "--json").stdout),
                                                 "path": str(tmp_path / "era1.pth")}
    assert api.current(tmp_path / "era1.pth")["revision"] == "0003"
    back = api.downgrade(tmp_path / "era1.pth", to="base", migrations=EXAMPLE, backup=False)
    assert back.plan is not None and back.plan.direction == "downgrade" and back.written

    with pytest.raises(ckptmigrate.OutputExists):
        api.upgrade(tmp_path / "era1.pth", output=tmp_path / "era1.pth.bak", migrations=EXAMPLE)


def test_stamp_validates_the_revision_itself(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pt")
    before = (tmp_path / "m.pt").read_bytes()
    with pytest.raises(ckptmigrate.RevisionError) as err:
        api.stamp(tmp_path / "m.pt", revision="9999", migrations=EXAMPLE)
    assert err.value.revision == "9999" and "0006" in err.value.candidates
    assert (tmp_path / "m.pt").read_bytes() == before
    with pytest.raises(ckptmigrate.RevisionError, match="ambiguous"):
        api.stamp(tmp_path / "m.pt", revision="000", migrations=EXAMPLE)
    api.stamp(tmp_path / "m.pt", revision="0006", migrations=EXAMPLE)
    assert api.current(tmp_path / "m.pt")["revision"] == "0006"
    assert api.current(tmp_path / "m.pt")["lineage"] == "example"  # the API looked it up, not the CLI


def test_verify_and_manifest_verification_are_functions(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "ckpts").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "ckpts" / "a.pt")
    cli("keygen", "k.pem", "k.pub", check=True)
    cli("stamp", "ckpts/a.pt", "--sign", "k.pem", check=True)
    result = api.verify(tmp_path / "ckpts" / "a.pt", tmp_path / "k.pub")
    assert result.ok and result.pinned
    listed = json.loads(cli("verify", "ckpts/a.pt", "--public-key", "k.pub", "--json", check=True).stdout)["files"]
    assert listed == [{**result.to_dict(), "path": "ckpts/a.pt"}]

    manifest = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "release": None,
                "files": [{"file": "a.pt"}]}
    (tmp_path / "ckpts" / "release-manifest.json").write_text(json.dumps(manifest))
    info, results = api.verify_manifest(tmp_path / "ckpts" / "release-manifest.json")
    assert [r.ok for r in results] == [True] and info["files"] == 1
    (tmp_path / "ckpts" / "a.pt").unlink()
    _, results = api.verify_manifest(tmp_path / "ckpts" / "release-manifest.json")
    assert results[0].problems == ["listed in the manifest but missing"]
