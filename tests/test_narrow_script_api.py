"""A migration script gets the ops and the data they edit, not the file.

Story: a script author types ``ckpt.`` and sees the ops, ``state_dict``, ``extras``, ``config`` and a few
read-only facts (the revision the file is at, its envelope, path and format). A script that calls
``ckpt.write(...)``, ``ckpt.close()`` or ``ckpt.apply_inverse(...)`` in the middle of a migration — each
of which used to work and could tear the file or the walk — fails with a line that says what it may
use, and the file is left as it was. A new op in the vocabulary reaches scripts without anyone
listing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptmigrate import api
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import MigrationError
from ckptmigrate.ops.architecture import ArchitectureOps
from ckptmigrate.ops.context import MigrationContext

FIRST = "revision = 'r1'\ndown_revision = None\n\ndef upgrade(ckpt):\n    pass\n"


def chain(tmp_path: Path, body: str) -> Path:
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1.py").write_text(FIRST)
    (versions / "r2.py").write_text(f"revision = 'r2'\ndown_revision = 'r1'\n\ndef upgrade(ckpt):\n{body}\n")
    return versions.parent


def stamped(tmp_path: Path, migrations: Path) -> Path:
    path = tmp_path / "run.pt"
    torch.save({"epoch": 7, "model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}}, path)
    api.stamp(path, revision="r1", migrations=migrations, tags={"team": "vision"})
    return path


@pytest.mark.parametrize("call", ["ckpt.write(ckpt.path, None)", "ckpt.close()", "ckpt.apply_inverse([])",
                                  "ckpt.materialize()", "ckpt.envelope.revision"])
def test_a_script_reaching_past_the_ops_is_refused_and_told_what_it_may_use(tmp_path: Path, call: str) -> None:
    migrations = chain(tmp_path, f"    {call}")
    path = stamped(tmp_path, migrations)
    before = path.read_bytes()

    with pytest.raises(MigrationError) as caught:
        api.upgrade(path, migrations=migrations)

    name = call.split(".")[1].split("(")[0]
    message = str(caught.value)
    assert f"raised AttributeError: a migration script's ckpt has no {name!r}" in message, message
    offered = message.split("it offers the ops ")[1].split(", and state_dict, extras, config")[0].split(", ")
    assert {"rename", "rename_regex", "split", "add"} <= set(offered) and name not in offered, message
    assert (caught.value.revision, Path(str(caught.value.script)).name) == ("r2", "r2.py")
    assert path.read_bytes() == before


def test_a_script_reads_the_facts_it_needs_and_edits_through_the_ops(tmp_path: Path) -> None:
    body = "\n".join(f"    {line}" for line in [
        'ckpt.extras["migrated_from"] = ckpt.revision',
        'ckpt.extras["team"] = ckpt.metadata["tags"]["team"]',
        'ckpt.extras["container"] = ckpt.format',
        'ckpt.extras["rows"] = ckpt.state_dict["w"].shape[0]',
        'ckpt.metadata["revision"] = "forged"',  # a copy: the envelope is not edited through it
        'ckpt.rename("w", "weight")',
    ])
    migrations = chain(tmp_path, body)
    path = stamped(tmp_path, migrations)

    api.upgrade(path, migrations=migrations)

    saved = torch.load(path)
    assert (saved["migrated_from"], saved["team"], saved["container"], saved["rows"]) == ("r1", "vision",
                                                                                         "torch-zip", 2)
    assert list(saved["model"]) == ["weight", "b"]
    assert api.current(path)["revision"] == "r2"


def test_a_script_cannot_rebind_what_it_was_given(tmp_path: Path) -> None:
    migrations = chain(tmp_path, "    ckpt.state_dict = {}")
    path = stamped(tmp_path, migrations)

    with pytest.raises(MigrationError, match="cannot set ckpt.state_dict: edit ckpt.state_dict or ckpt.extras"):
        api.upgrade(path, migrations=migrations)


def test_every_op_of_the_vocabulary_reaches_scripts_and_nothing_else_of_the_checkpoint(tmp_path: Path) -> None:
    """Derived, not listed: an op added to ``ckptmigrate.ops`` is callable from scripts at once; what a
    Checkpoint has besides (writing, closing, walking back, materialising) is not."""
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    with Checkpoint.open(tmp_path / "w.pt") as ckpt:
        context = MigrationContext(ckpt)
        ops = {name for cls in ArchitectureOps.__mro__ if cls.__module__.startswith("ckptmigrate.ops.")
               for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}
        for name in ops - {"apply_inverse"}:
            assert callable(getattr(context, name)), name
        public = {name for name in dir(ckpt) if not name.startswith("_")}
        reachable = {name for name in public if hasattr(context, name)}
        assert public - reachable >= {"write", "close", "apply_inverse", "materialize", "trust_pickle", "envelope",
                                      "container", "copies", "journal", "optimizers", "payload"}
        assert reachable - ops == {"state_dict", "extras", "config", "revision", "metadata", "path", "format"}
        context.rename("w", "v")
        assert context.calls == [("rename", ("w", "v"), {})] and list(ckpt.state_dict) == ["v"]
