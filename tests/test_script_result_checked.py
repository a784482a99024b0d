"""A script that does not do what its revision says is refused, not stamped.

Story: a team records each revision's schema snapshot (`schema record`). Someone writes revision
r2 "rename blocks to layers" and forgets the rename, or renames only the first block. Before, the
upgrade ran the empty script and stamped the file as r2: every later `load` failed far from the
cause, or worse, `strict=False` loaded nothing. Now the engine compares the result of each step
with the snapshot of the revision the file lands at, refuses with the revision, its script and the
grouped difference `check` would print, and leaves the file as it was. The same holds walking
back: a hand-written `downgrade()` that does not restore r2's schema is refused.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptmigrate import api
from ckptmigrate.errors import MigrationError


class AtR1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 2)


class AtR2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 2)


class AtR3(AtR2):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.ones(1))


RENAME = 'ckpt.rename_regex(r"^blocks\\.", "layers.")'


def chain(tmp_path: Path, r2_body: str, r3_downgrade: str = 'ckpt.drop("temperature")') -> Path:
    """r1 (baseline) -> r2 (rename blocks to layers, body given) -> r3 (a buffer, hand-written downgrade),
    each with the schema snapshot of the model it describes."""
    root = tmp_path / "migrations"
    (root / "versions").mkdir(parents=True)
    scripts = {
        "r1": "revision = 'r1'\ndown_revision = None\n\ndef upgrade(ckpt):\n    pass\n",
        "r2": f"revision = 'r2'\ndown_revision = 'r1'\n\ndef upgrade(ckpt):\n    {r2_body}\n",
        "r3": textwrap.dedent(f"""\
            import torch
            revision = 'r3'
            down_revision = 'r2'

            def upgrade(ckpt):
                ckpt.add("temperature", torch.ones(1))

            def downgrade(ckpt):
                {r3_downgrade}
            """),
    }
    for rev, text in scripts.items():
        (root / "versions" / f"{rev}.py").write_text(text)
    for rev, model in (("r1", AtR1()), ("r2", AtR2()), ("r3", AtR3())):
        api.record_schema(rev, model, migrations=root)
    return root


def stamped_at_r1(tmp_path: Path, migrations: Path, dtype: torch.dtype = torch.float32) -> Path:
    path = tmp_path / "run.pt"
    torch.save(AtR1().to(dtype).state_dict(), path)
    api.stamp(path, revision="r1", migrations=migrations)
    assert api.current(path)["revision"] == "r1"
    return path


def test_a_script_that_does_nothing_is_refused_and_the_file_is_left_as_it_was(tmp_path: Path) -> None:
    migrations = chain(tmp_path, "pass")
    path = stamped_at_r1(tmp_path, migrations)
    before = path.read_bytes()

    with pytest.raises(MigrationError) as caught:
        api.upgrade(path, migrations=migrations)

    error = caught.value
    assert (error.revision, error.action, Path(str(error.script)).name) == ("r2", "upgrade", "r2.py")
    assert str(path) in str(error) and "r2.schema.json" in str(error)
    assert "missing     layers.{0..2}.weight  [4, 4] float32" in str(error), str(error)
    assert "unexpected  blocks.{0..2}.bias  [4] float32" in str(error), str(error)
    assert error.difference is not None
    assert sorted(error.difference["missing"]) == sorted(AtR2().state_dict().keys() - AtR1().state_dict().keys())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["migrations", "run.pt"]  # no backup, no temp file
    assert api.current(path)["revision"] == "r1"


def test_a_script_that_does_half_the_job_names_what_is_left(tmp_path: Path) -> None:
    migrations = chain(tmp_path, 'ckpt.rename_regex(r"^blocks\\.0\\.", "layers.0.")')
    path = stamped_at_r1(tmp_path, migrations)

    with pytest.raises(MigrationError) as caught:
        api.upgrade(path, migrations=migrations)

    assert caught.value.difference is not None
    left = sorted(f"blocks.{i}.{p}" for i in (1, 2) for p in ("bias", "weight"))
    assert sorted(caught.value.difference["unexpected"]) == left
    assert "unexpected  blocks.{1,2}.weight  [4, 4] float32" in str(caught.value), str(caught.value)


def test_the_script_that_does_the_job_passes_and_lands_on_the_snapshot(tmp_path: Path) -> None:
    migrations = chain(tmp_path, RENAME)
    path = stamped_at_r1(tmp_path, migrations)

    api.upgrade(path, migrations=migrations)

    snapshot = json.loads((migrations / "versions" / "r3.schema.json").read_text())
    assert api.current(path)["revision"] == "r3"
    with api.load(path, migrations=migrations) as ckpt:
        assert ckpt.schema() == snapshot


def test_a_downgrade_that_does_not_restore_the_revision_below_is_refused(tmp_path: Path) -> None:
    migrations = chain(tmp_path, RENAME, r3_downgrade="pass")
    path = stamped_at_r1(tmp_path, migrations)
    api.upgrade(path, migrations=migrations, backup=False)
    before = path.read_bytes()

    with pytest.raises(MigrationError) as caught:
        api.downgrade(path, to="r2", migrations=migrations)

    error = caught.value
    assert (error.revision, error.action) == ("r3", "downgrade")
    assert "r2.schema.json" in str(error) and "unexpected  temperature" in str(error), str(error)
    assert path.read_bytes() == before
    assert api.current(path)["revision"] == "r3"


def test_a_key_of_the_files_own_that_no_step_touches_is_carried_not_blamed_on_the_script(tmp_path: Path) -> None:
    """The file has a buffer beside r1's keys (it fits no revision, so the user says where it starts):
    a difference it brought along is its own; what the script left undone is still refused."""
    migrations = chain(tmp_path, RENAME)
    path = tmp_path / "run.pt"
    torch.save({**AtR1().state_dict(), "extra_buffer": torch.zeros(1)}, path)

    api.upgrade(path, from_rev="r1", migrations=migrations)

    with api.load(path, migrations=migrations) as ckpt:
        assert set(ckpt.schema()) - set(AtR3().state_dict()) == {"extra_buffer"}

    lazy = chain(tmp_path / "lazy", "pass")
    torch.save({**AtR1().state_dict(), "extra_buffer": torch.zeros(1)}, path)
    with pytest.raises(MigrationError) as caught:
        api.upgrade(path, from_rev="r1", migrations=lazy)
    assert caught.value.difference is not None and "extra_buffer" not in caught.value.difference["unexpected"]
    assert len(caught.value.difference["unexpected"]) == 6


def test_a_key_of_the_files_own_that_a_step_renames_along_is_still_the_files(tmp_path: Path) -> None:
    """A pattern rename (here of every ``blocks.`` key) moves the file's own tensor too: it is the
    same tensor under its new name, so it is carried, not blamed on the script."""
    migrations = chain(tmp_path, RENAME)
    path = tmp_path / "run.pt"
    torch.save({**AtR1().state_dict(), "blocks.extra": torch.zeros(1)}, path)

    api.upgrade(path, from_rev="r1", migrations=migrations)

    with api.load(path, migrations=migrations) as ckpt:
        assert set(ckpt.schema()) - set(AtR3().state_dict()) == {"layers.extra"}


def test_a_half_precision_export_migrates_in_its_own_precision(tmp_path: Path) -> None:
    """The snapshots are float32 (the model's); a bf16 export of it differs in dtype only, on keys no
    step touched: that is the file's precision, not a script that forgot something."""
    migrations = chain(tmp_path, RENAME)
    path = stamped_at_r1(tmp_path, migrations, torch.bfloat16)

    api.upgrade(path, migrations=migrations)

    with api.load(path, migrations=migrations) as ckpt:
        assert ckpt.state_dict["layers.0.weight"].dtype == torch.bfloat16
        assert ckpt.state_dict["temperature"].dtype == torch.float32  # added by r3 as the snapshot says


def test_a_step_that_gives_a_key_another_dtype_than_its_snapshot_is_refused(tmp_path: Path) -> None:
    migrations = chain(tmp_path, RENAME + '\n    ckpt.cast(r"layers\\.0\\.weight", "float16")')
    path = stamped_at_r1(tmp_path, migrations)

    with pytest.raises(MigrationError) as caught:
        api.upgrade(path, migrations=migrations)

    assert caught.value.difference is not None
    assert list(caught.value.difference["reshaped"]) == ["layers.0.weight"]
    assert "[4, 4] float32 -> [4, 4] float16" in str(caught.value), str(caught.value)


def test_the_command_line_says_it_in_one_error_and_as_json(tmp_path: Path, cli) -> None:  # noqa: ANN001
    migrations = chain(tmp_path, "pass")
    path = stamped_at_r1(tmp_path, migrations)
    before = path.read_bytes()

    text = cli("upgrade", path, "--migrations", migrations)
    assert text.returncode == 2, text.stderr
    assert "Traceback" not in text.stderr
    assert "revision r2" in text.stderr and "r2.py" in text.stderr and "layers.{0..2}" in text.stderr, text.stderr

    as_json = cli("upgrade", path, "--migrations", migrations, "--json")
    assert as_json.returncode == 2
    report = json.loads(as_json.stdout)
    failure = report[0]["error"] if isinstance(report, list) else report["error"]
    assert "revision r2" in (failure if isinstance(failure, str) else failure["message"])
    assert path.read_bytes() == before
