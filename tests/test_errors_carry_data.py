"""User story: "when something goes wrong, my program can act on it, and every path tells me the same thing."

Errors are exported types with fields (``ckptmigrate.RevisionError.heads`` as Alembic's
``MultipleHeads.heads``, ``MigrationError.revision/op/key``, ``SchemaMismatch.nearest/unexpected``);
``--json`` commands report a failure as ``{"error": {...}}`` on stdout with the same exit code.
Nothing is swallowed: ``attach``'s hook and the Lightning callback give the diagnosis
``load_state_dict`` gives, not torch's list of missing keys; a broken script is named by ``diff``;
``--debug`` shows the real traceback; library messages name no CLI flag; ``trust_pickle`` that has
nothing to do says so.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ckptmigrate
from ckptmigrate import api

Cli = Callable[..., subprocess.CompletedProcess[str]]


def chain(root: Path, scripts: dict[str, tuple[str | None, str]], *, schemas: dict[str, dict[str, list[int]]]
          | None = None) -> Path:
    versions = root / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, (down, body) in scripts.items():
        (versions / f"{rev}.py").write_text(f'"""Revision {rev}."""\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
                                            f"def upgrade(ckpt):\n    {body}\n")
    for rev, shapes in (schemas or {}).items():
        schema = {k: {"shape": shape, "dtype": "float32"} for k, shape in shapes.items()}
        (versions / f"{rev}.schema.json").write_text(json.dumps(schema))
    return versions.parent


class Net(nn.Module):
    """Today's model: ``fc``; revision r1 had it as ``old``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)


@pytest.fixture
def renamed(tmp_path: Path) -> Path:
    return chain(tmp_path, {"r1": (None, "pass"), "r2": ("r1", "ckpt.rename_prefix('old.', 'fc.')")},
                 schemas={"r1": {"old.weight": [2, 3], "old.bias": [2]}, "r2": {"fc.weight": [2, 3], "fc.bias": [2]}})


def odd_state_dict() -> dict[str, torch.Tensor]:
    """r1's keys plus one the chain never heard of: it fits no revision."""
    return {"old.weight": torch.ones(2, 3), "old.bias": torch.ones(2), "extra_buffer": torch.zeros(1)}


# -- fields ---------------------------------------------------------------------------------------------


def test_exported_types_carry_their_facts(tmp_path: Path, renamed: Path) -> None:
    assert issubclass(ckptmigrate.MigrationError, ckptmigrate.BadInput)
    assert issubclass(ckptmigrate.RevisionError, ckptmigrate.CkptMigrateError)

    with pytest.raises(ckptmigrate.RevisionError) as unknown:
        api.revision_graph(renamed).get("r9")
    assert unknown.value.revision == "r9" and unknown.value.candidates == ["r1", "r2"]

    (renamed / "versions" / "r3.py").write_text('revision = "r3"\ndown_revision = "r1"\n\n\ndef upgrade(ckpt):\n'
                                                "    pass\n")
    with pytest.raises(ckptmigrate.RevisionError) as two_heads:  # two heads are a state; `head` needs one
        api.revision_graph(renamed).head()
    assert sorted(two_heads.value.heads) == ["r2", "r3"]
    assert type(two_heads.value).__name__ == "MultipleHeads" and two_heads.value.cli_hint.startswith("merge them")
    (renamed / "versions" / "r3.py").unlink()

    torch.save({"old.weight": torch.ones(2, 3), "old.bias": torch.ones(2)}, tmp_path / "m.pt")
    (renamed / "versions" / "r2.py").write_text('revision = "r2"\ndown_revision = "r1"\n\n\ndef upgrade(ckpt):\n'
                                                "    ckpt.transpose('old.wieght', 0, 1)\n")
    with pytest.raises(ckptmigrate.MigrationError) as failed:
        api.upgrade(tmp_path / "m.pt", migrations=renamed)
    error = failed.value
    assert (error.revision, error.op, error.key, error.action) == ("r2", "transpose", "old.wieght", "upgrade")
    assert error.script == str(renamed / "versions" / "r2.py") and error.path == str(tmp_path / "m.pt")
    assert error.to_dict()["type"] == "MigrationError"
    # an op called outside a migration: the same facts, on the op's own error
    with ckptmigrate.Checkpoint.open(tmp_path / "m.pt") as ckpt, pytest.raises(ckptmigrate.OpError) as op:
        ckpt.drop(r"old\.wieght")
    assert (op.value.op, op.value.key) == ("drop", r"old\.wieght") and isinstance(op.value, ckptmigrate.BadInput)


def test_a_file_that_fits_no_revision_names_the_nearest_without_cli_flags(tmp_path: Path, renamed: Path) -> None:
    torch.save(odd_state_dict(), tmp_path / "odd.pt")
    with pytest.raises(ckptmigrate.SchemaMismatch) as err:
        ckptmigrate.load(tmp_path / "odd.pt", migrations=renamed)
    assert err.value.nearest == "r1" and err.value.unexpected == ["extra_buffer"] and err.value.missing == []
    assert "--from" not in str(err.value) and "nearest is r1" in str(err.value)
    # the API says where it starts instead
    ckpt = ckptmigrate.load(tmp_path / "odd.pt", migrations=renamed, from_rev="r1")
    assert ckpt.applied == ["r2"]


def test_json_commands_report_failures_as_a_json_object(tmp_path: Path, cli: Cli, renamed: Path) -> None:
    torch.save(odd_state_dict(), tmp_path / "odd.pt")
    proc = cli("upgrade", "odd.pt", "--migrations", "chain", "--json")
    assert proc.returncode == 2
    error = json.loads(proc.stdout)["error"]
    assert error["type"] == "SchemaMismatch" and error["nearest"] == "r1" and error["unexpected"] == ["extra_buffer"]
    assert error["exit_code"] == 2 and error["path"] == "odd.pt"
    assert error["message"].endswith("pass --from REV if you know where it starts")  # the CLI's wording, in the CLI
    assert proc.stderr.startswith("ckptmigrate: error: odd.pt: unstamped")

    missing = cli("inspect", "nope.pt", "--json")
    assert missing.returncode == 2 and json.loads(missing.stdout)["error"]["path"] == "nope.pt"
    unknown = cli("stamp", "odd.pt", "--revision", "zz", "--migrations", "chain", "--json")
    assert unknown.returncode == 2
    assert json.loads(unknown.stdout)["error"] | {"candidates": ["r1", "r2"], "revision": "zz"} == \
        json.loads(unknown.stdout)["error"]

    torch.save({"old.weight": torch.ones(2, 3), "old.bias": torch.ones(2)}, tmp_path / "good.pt")
    batch = cli("upgrade", "good.pt", "odd.pt", "--migrations", "chain", "--json")
    assert batch.returncode == 2
    rows = {Path(r["path"]).name: r for r in json.loads(batch.stdout)}
    assert rows["good.pt"]["error"] is None and rows["good.pt"]["written"]
    assert rows["odd.pt"]["error"]["type"] == "SchemaMismatch"


# -- every loading path gives the same diagnosis --------------------------------------------------------------


def test_attach_gives_the_diagnosis_load_state_dict_gives(tmp_path: Path, renamed: Path) -> None:
    torch.save(odd_state_dict(), tmp_path / "odd.pt")
    with pytest.raises(ckptmigrate.SchemaMismatch) as direct:
        ckptmigrate.load_state_dict(Net(), tmp_path / "odd.pt", migrations=renamed)
    model = ckptmigrate.attach(Net(), migrations=renamed)
    assert isinstance(model, nn.Module)
    with pytest.raises(ckptmigrate.SchemaMismatch) as hooked:
        model.load_state_dict(torch.load(tmp_path / "odd.pt"))
    assert "Missing key(s)" not in str(hooked.value)
    detail = str(direct.value).split(": ", 1)[1]
    assert str(hooked.value).endswith(detail)  # the same words, after the name of what was loaded
    assert (hooked.value.nearest, hooked.value.unexpected) == (direct.value.nearest, direct.value.unexpected)
    # strict=False asked for leniency: torch loads what fits
    result = model.load_state_dict(torch.load(tmp_path / "odd.pt"), strict=False)
    assert "extra_buffer" in result.unexpected_keys
    torch.save(model, tmp_path / "whole.pt")  # an attached module is still an ordinary, picklable module
    assert set(torch.load(tmp_path / "whole.pt", weights_only=False).state_dict()) == {"fc.weight", "fc.bias"}

    # a state dict the chain upgrades but that still does not fit the model: the LoadReport's words
    torch.save({"old.weight": torch.ones(2, 3), "old.bias": torch.ones(2)}, tmp_path / "r1.pt")
    other = ckptmigrate.attach(nn.Sequential(nn.Linear(3, 2)), migrations=renamed)
    with pytest.raises(ckptmigrate.SchemaMismatch, match=r"does not fit the model\nloaded 0 tensors") as late:
        other.load_state_dict(torch.load(tmp_path / "r1.pt"))
    assert late.value.missing == ["0.weight", "0.bias"] and late.value.unexpected == ["fc.weight", "fc.bias"]


def test_the_lightning_upgrade_gives_the_same_diagnosis(tmp_path: Path, renamed: Path) -> None:
    lightning = pytest.importorskip("ckptmigrate.integrations.lightning")
    checkpoint = {"state_dict": odd_state_dict(), "epoch": 3}
    with pytest.raises(ckptmigrate.SchemaMismatch, match="nearest is r1") as err:
        lightning.upgrade_checkpoint(checkpoint, renamed, Net())
    assert err.value.unexpected == ["extra_buffer"]
    fits = {"state_dict": Net().state_dict(), "epoch": 3}
    assert lightning.upgrade_checkpoint(fits, renamed, Net()) == []


def test_diff_names_the_broken_script(tmp_path: Path, cli: Cli, renamed: Path) -> None:
    (renamed / "versions" / "r2.py").write_text('revision = "r2"\ndown_revision = "r1"\ndef upgrade(ckpt:\n')
    proc = cli("diff", "r1", "r2", "--migrations", "chain")
    assert proc.returncode == 2
    assert f"{renamed / 'versions' / 'r2.py'}:3: syntax error in migration script" in proc.stderr
    assert "neither a file" not in proc.stderr


def test_debug_shows_the_scripts_own_traceback(tmp_path: Path, cli: Cli) -> None:
    chain(tmp_path, {"r1": (None, "pass"), "r2": ("r1", "1 / 0")})
    torch.save({"w": torch.ones(1)}, tmp_path / "m.pt")
    proc = cli("--debug", "upgrade", "m.pt", "--from", "r1", "--migrations", "chain")
    assert proc.returncode != 0
    assert "ZeroDivisionError: division by zero" in proc.stderr
    assert str(tmp_path / "chain" / "versions" / "r2.py") in proc.stderr  # the script's frame is in it
    assert "The above exception was the direct cause" in proc.stderr


def test_trust_pickle_with_nothing_to_do_says_so(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    torch.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "plain.pt")
    for name, why in (("m.safetensors", "a safetensors file holds no pickle"),
                      ("plain.pt", "its pickle holds only tensors and plain data, which are read as they are")):
        with warnings.catch_warnings(record=True) as caught, ckptmigrate.Checkpoint.open(tmp_path / name) as ckpt:
            warnings.simplefilter("always")
            note = ckpt.trust_pickle()
        assert note == f"{tmp_path / name}: trust_pickle has nothing to do: {why}"
        assert [str(w.message) for w in caught if issubclass(w.category, ckptmigrate.CkptMigrateWarning)] == [note]


def test_trust_pickle_that_has_work_to_do_is_silent(tmp_path: Path) -> None:
    import argparse

    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, tmp_path / "hp.pt")
    with warnings.catch_warnings(record=True) as caught, ckptmigrate.Checkpoint.open(tmp_path / "hp.pt") as ckpt:
        warnings.simplefilter("always")
        assert ckpt.trust_pickle() is None
        assert ckpt.state_dict.entries["args"].lr == 0.1
    assert not [w for w in caught if issubclass(w.category, ckptmigrate.CkptMigrateWarning)]
