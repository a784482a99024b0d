"""A project adds ops of its own, and walks them back as exactly as the built-in ones.

Story: a team keeps ``ckpt_ops.py`` beside its model, names it in ``[tool.ckptmigrate] ops``, and
registers two ops there with ``@ckptmigrate.op``: ``scale`` (with ``unscale`` as its inverse, Alembic's
``reverse``) and ``roll_rows``, whose inverse is itself with the opposite shift (it returns the
inverse's arguments). A migration script calls them as ``ckpt.scale(...)``; the history records
each call's arguments and its inverse, so ``downgrade`` needs no hand-written ``downgrade()`` and
gives every tensor back bit for bit — in the state dict and in its EMA copy. Without the ops
module the downgrade is refused before anything runs: the journal comes from the file, and only
ops registered in the running process may be called by it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import ckptmigrate
from ckptmigrate import api, formats
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import MigrationError
from ckptmigrate.ops.operations import Operations, OpError
from tests.payload_equality import assert_same_payload

Cli = Callable[..., subprocess.CompletedProcess[str]]

OPS_MODULE = '''\
import torch

import ckptmigrate


@ckptmigrate.op
def scale(ckpt, pattern: str, factor: float):
    """Multiply tensors by a power of two (exact both ways)."""
    ckpt.map(pattern, lambda t: t * factor)


@scale.inverse
def unscale(ckpt, pattern: str, factor: float):
    ckpt.map(pattern, lambda t: t / factor)


@ckptmigrate.op(inverse="roll_rows")
def roll_rows(ckpt, key: str, shift: int = 1):
    ckpt.map(key, lambda t: torch.roll(t, shift, 0))
    return {"key": key, "shift": -shift}
'''

R2_BODY = 'ckpt.scale(r"head\\.weight", 4.0)\n    ckpt.roll_rows("body.weight")'


def write_chain(root: Path, r2_body: str = R2_BODY) -> Path:
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1.py").write_text("revision = 'r1'\ndown_revision = None\n\ndef upgrade(ckpt):\n    pass\n")
    (versions / "r2.py").write_text(f"revision = 'r2'\ndown_revision = 'r1'\n\ndef upgrade(ckpt):\n    {r2_body}\n")
    return root / "migrations"


def project(tmp_path: Path, *, ops_line: str = 'ops = "ckpt_ops"') -> Path:
    root = tmp_path / "proj"
    write_chain(root)
    (root / "ckpt_ops.py").write_text(OPS_MODULE)
    (root / "pyproject.toml").write_text(f'[tool.ckptmigrate]\nmigrations = "migrations"\n{ops_line}\n')
    return root


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"body.weight": torch.randn(3, 4), "body.bias": torch.randn(3), "head.weight": torch.randn(2, 3)}


def test_the_cli_upgrades_with_a_project_op_records_it_and_walks_it_back_exactly(tmp_path: Path, cli: Cli) -> None:
    root = project(tmp_path)
    path = root / "run.pt"
    torch.save({"epoch": 3, "model": weights(0), "ema_state_dict": weights(1)}, path)
    original = torch.load(path)

    cli("upgrade", path, "--from", "r1", cwd=root, check=True)

    upgraded = torch.load(path)
    for where in ("model", "ema_state_dict"):  # the EMA copy got the same calls
        torch.testing.assert_close(upgraded[where]["head.weight"], original[where]["head.weight"] * 4, rtol=0, atol=0)
        assert torch.equal(upgraded[where]["body.weight"], torch.roll(original[where]["body.weight"], 1, 0))
        assert torch.equal(upgraded[where]["body.bias"], original[where]["body.bias"])
    entry = formats.read_envelope(path)[1]["history"][-1]  # type: ignore[index]
    assert entry["ops"] == [{"op": "scale", "keys": 1}, {"op": "roll_rows", "keys": 1}]
    assert entry["inverse"] == [["unscale", {"pattern": "head\\.weight", "factor": 4.0}],
                                ["roll_rows", {"key": "body.weight", "shift": -1}]]
    assert entry["copies"]["ema_state_dict"] == entry["inverse"]

    cli("downgrade", path, "--to", "r1", cwd=root, check=True)

    assert_same_payload(torch.load(path), original)


def test_without_the_ops_module_the_downgrade_is_refused_and_nothing_runs(tmp_path: Path, cli: Cli) -> None:
    root = project(tmp_path)
    path = root / "run.pt"
    torch.save(weights(0), path)
    cli("upgrade", path, "--from", "r1", "--no-backup", cwd=root, check=True)
    before = path.read_bytes()
    (root / "pyproject.toml").write_text('[tool.ckptmigrate]\nmigrations = "migrations"\n')  # ops forgotten

    refused = cli("downgrade", path, "--to", "r1", cwd=root)

    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "'roll_rows' is not an op an inverse can name" in refused.stderr, refused.stderr
    assert "@ckptmigrate.op" in refused.stderr and "[tool.ckptmigrate] ops" in refused.stderr
    assert path.read_bytes() == before


def test_an_op_a_migration_script_registers_itself_walks_back_too(tmp_path: Path, cli: Cli) -> None:
    """Every script of the chain is imported before anything runs, so an op defined in a script (or a
    module it imports) is registered for the downgrade as well."""
    root = tmp_path / "proj"
    migrations = write_chain(root, 'ckpt.roll_rows("body.weight", shift=2)')
    script = migrations / "versions" / "r2.py"
    script.write_text(OPS_MODULE + "\n\n" + script.read_text())
    path = root / "run.pt"
    torch.save(weights(0), path)
    original = torch.load(path)

    cli("upgrade", path, "--from", "r1", "--migrations", migrations, check=True)
    assert torch.equal(torch.load(path)["body.weight"], torch.roll(original["body.weight"], 2, 0))
    cli("downgrade", path, "--to", "r1", "--migrations", migrations, check=True)

    assert_same_payload(torch.load(path), original)


def test_an_ops_module_that_takes_a_builtin_name_is_refused_naming_it(tmp_path: Path, cli: Cli) -> None:
    root = project(tmp_path)
    (root / "ckpt_ops.py").write_text(OPS_MODULE + "\n\n@ckptmigrate.op\ndef rename(ckpt, old: str):\n    pass\n")
    torch.save(weights(0), root / "run.pt")

    refused = cli("upgrade", "run.pt", "--from", "r1", cwd=root)

    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "ops 'ckpt_ops'" in refused.stderr and "already has 'rename'" in refused.stderr, refused.stderr


# -- the same from Python, the ops registered in this process ------------------------------------


@pytest.fixture
def registry() -> Iterator[dict[str, object]]:
    """The ops registered by a test leave with it."""
    saved = dict(Operations.custom_ops)
    yield Operations.custom_ops  # type: ignore[misc]
    Operations.custom_ops.clear()
    Operations.custom_ops.update(saved)


def register_ops() -> dict[str, int]:
    """``scale``/``unscale`` as the ops module registers them; returns how often each ran."""
    runs = {"scale": 0, "unscale": 0}

    @ckptmigrate.op(inverse="unscale")
    def scale(ckpt: ckptmigrate.MigrationContext, pattern: str, factor: float) -> None:
        runs["scale"] += 1
        ckpt.map(pattern, lambda t: t * factor)

    @ckptmigrate.op(inverse="scale")
    def unscale(ckpt: ckptmigrate.MigrationContext, pattern: str, factor: float) -> None:
        runs["unscale"] += 1
        ckpt.map(pattern, lambda t: t / factor)

    return runs


def test_the_api_round_trip_with_ops_registered_in_process(tmp_path: Path, registry: object) -> None:
    runs = register_ops()
    migrations = write_chain(tmp_path, 'ckpt.scale(r"head\\.weight", 4.0)')
    path = tmp_path / "w.pt"
    torch.save(weights(0), path)
    original = torch.load(path)

    api.upgrade(path, from_rev="r1", migrations=migrations, backup=False)
    assert torch.equal(torch.load(path)["head.weight"], original["head.weight"] * 4)
    api.downgrade(path, to="r1", migrations=migrations, backup=False)

    assert_same_payload(torch.load(path), original)
    assert runs == {"scale": 1, "unscale": 1}


def test_an_argument_the_journal_cannot_hold_is_refused_naming_the_op_and_argument(
    tmp_path: Path, registry: object,
) -> None:
    runs = register_ops()
    migrations = write_chain(tmp_path, 'import torch\n    ckpt.scale(r"head\\.weight", torch.tensor(4.0))')
    path = tmp_path / "w.pt"
    torch.save(weights(0), path)
    before = path.read_bytes()

    with pytest.raises(MigrationError) as caught:
        api.upgrade(path, from_rev="r1", migrations=migrations)

    assert caught.value.op == "scale"
    assert "argument 'factor' is a torch.Tensor" in str(caught.value), str(caught.value)
    assert runs["scale"] == 0 and path.read_bytes() == before


def test_a_builtin_name_or_another_modules_op_name_is_refused_at_registration(registry: object) -> None:
    with pytest.raises(OpError, match="ckptmigrate already has 'drop'"):
        ckptmigrate.op(lambda ckpt, pattern: None, name="drop")
    with pytest.raises(OpError, match="ckptmigrate already has 'state_dict'"):
        ckptmigrate.op(lambda ckpt: None, name="state_dict")
    register_ops()
    with pytest.raises(OpError, match=r"'scale' .* is already registered by \S*register_ops\.<locals>\.scale"):
        ckptmigrate.op(lambda ckpt, pattern, factor: None, name="scale")
    with pytest.raises(OpError, match=r"\*args, \*\*kwargs and positional-only arguments cannot be recorded"):
        ckptmigrate.op(lambda ckpt, **kwargs: None, name="anything")
    register_ops()  # the same module registering again (a script imported twice) replaces its own


def test_a_journal_naming_an_unregistered_op_runs_nothing_of_it(tmp_path: Path, registry: object) -> None:
    """The journal comes from the file: every step is checked before the first runs."""
    runs = register_ops()
    path = tmp_path / "w.pt"
    torch.save(weights(0), path)
    crafted = [["not_registered_anywhere", {}], ["unscale", {"pattern": "head\\.weight", "factor": 4.0}]]
    with Checkpoint.open(path) as ckpt:
        with pytest.raises(OpError, match="'not_registered_anywhere' is not an op an inverse can name"):
            ckpt.apply_inverse(crafted)
        assert torch.equal(ckpt.state_dict["head.weight"], torch.load(path)["head.weight"])
    assert runs == {"scale": 0, "unscale": 0}


def test_a_project_op_is_listed_where_a_script_looks(tmp_path: Path, registry: object) -> None:
    register_ops()
    torch.save(weights(0), tmp_path / "w.pt")
    with Checkpoint.open(tmp_path / "w.pt") as ckpt:
        context = ckptmigrate.MigrationContext(ckpt)
        assert {"scale", "unscale", "rename"} <= set(dir(context))
        with pytest.raises(AttributeError, match="scale, split"):
            context.scael  # noqa: B018 - a typo lists what there is
        context.scale("head.weight", 2.0)
        assert context.calls == [("scale", ("head.weight", 2.0), {})]
        assert json.loads(json.dumps(ckpt.journal)) == [["unscale", {"pattern": "head.weight", "factor": 2.0}]]
