"""User story: "CI proves my chain keeps the model's function, not just its shapes."

Each revision of the example chain has a recorded fixture (a seeded checkpoint of the model as it
was, example inputs and the outputs it gave). ``ckptmigrate test`` upgrades each to head, runs it in
today's model and compares; it must pass on the real chain and fail, naming the revision, when one
line of a migration is made wrong in a way no schema check can see (q and k swapped, a transpose
added, a downgrade that swaps layers). The same check runs from Python and from pytest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptmigrate.chain.fixtures import paths
from ckptmigrate.chain.scripts import ScriptDirectory
from ckptmigrate.testing import ChainBroken, check_chain

ROOT = Path(__file__).resolve().parent.parent
MODEL = "ckptmigrate.example:current_model"
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """A copy of the example chain with its recorded fixtures."""
    copy = tmp_path / "migrations"
    shutil.copytree(ROOT / "migrations", copy)
    return copy


def break_line(chain: Path, script: str, old: str, new: str) -> None:
    path = next((chain / "versions").glob(f"{script}_*.py"))
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_the_example_chain_keeps_its_function(chain: Path, cli: Cli) -> None:
    proc = cli("test", "--migrations", chain, "--model", MODEL, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    revisions = [rev.id for rev in ScriptDirectory(chain).load().chain(None)]
    upgrades = {r["revision"]: r for r in report["results"] if r["kind"] == "upgrade"}
    assert list(upgrades) == revisions  # every revision has a fixture and was checked
    assert upgrades[revisions[0]]["steps"] == revisions[1:]
    assert all(r["ok"] for r in report["results"])
    assert {r["revision"] for r in report["results"] if r["kind"] == "roundtrip"} == set(revisions[:-1])


def test_q_and_k_swapped_is_caught_and_blamed_on_its_revision(chain: Path, cli: Cli) -> None:
    break_line(chain, "0004", 'for name in ("q", "k", "v")', 'for name in ("k", "q", "v")')
    assert cli("check", "--migrations", chain, "--model", MODEL).returncode == 0  # the schema cannot see it
    proc = cli("test", "--migrations", chain, "--model", MODEL)
    assert proc.returncode == 1
    assert "FAIL fixture 0003 upgrade to head" in proc.stdout
    assert "ok   fixture 0004 upgrade to head" in proc.stdout
    assert "fixture 0003 upgraded to head: output: differs by up to" in proc.stderr
    assert "broken by 0004" in proc.stderr and "broken by 0004, 0005" not in proc.stderr


def test_a_transpose_that_keeps_the_shape_is_caught(chain: Path) -> None:
    break_line(chain, "0005", '    ckpt.reshape("head.weight", [out_features, in_features, 1])',
               '    ckpt.map("head.weight", lambda t: t.t().reshape(out_features, in_features, 1))')
    with pytest.raises(ChainBroken, match="broken by 0005") as err:
        check_chain(migrations=chain, model=MODEL)
    failed = {r.revision for r in err.value.results if not r.ok}
    assert failed == {"0001", "0002", "0003", "0004"}


def test_a_downgrade_that_swaps_layers_fails_the_walk_back(chain: Path, cli: Cli) -> None:
    path = next((chain / "versions").glob("0003_*.py"))
    path.write_text(path.read_text() + textwrap.dedent('''

        def downgrade(ckpt):
            ckpt.rename_regex(r"layers\\.0\\.(.*)", r"tmp.\\1")
            ckpt.rename_regex(r"layers\\.1\\.(.*)", r"blocks.0.\\1")
            ckpt.rename_regex(r"tmp\\.(.*)", r"blocks.1.\\1")
    '''))
    proc = cli("test", "--migrations", chain, "--model", MODEL)
    assert proc.returncode == 1
    assert "FAIL fixture 0002 to head and back" in proc.stdout
    assert "the walk back changed blocks." in proc.stdout


def test_a_fixture_is_refused_for_a_revision_the_model_is_not_at(chain: Path, cli: Cli) -> None:
    before = sorted(p.name for p in (chain / "versions").iterdir())
    proc = cli("fixture", "record", "0003", "--migrations", chain, "--model", MODEL,
               "--inputs", "ckptmigrate.example:example_inputs")
    assert proc.returncode == 2
    assert "the fixture model's state dict is not this revision's schema" in proc.stderr
    assert sorted(p.name for p in (chain / "versions").iterdir()) == before


def test_a_new_revision_records_its_fixture_and_it_is_small(tmp_path: Path, chain: Path, cli: Cli) -> None:
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.ckptmigrate]\nmigrations = "migrations"\nmodel = "{MODEL}"\n'
        'example_inputs = "ckptmigrate.example:example_inputs"\n')
    for p in (chain / "versions").glob("0006_*.fixture*"):
        p.unlink()
    proc = cli("fixture", "record", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    head = ScriptDirectory(chain).load().head()
    checkpoint, io = paths(head)
    assert checkpoint.stat().st_size < 100_000 and io.stat().st_size < 100_000
    inspected = json.loads(cli("inspect", "--json", checkpoint, check=True).stdout)
    assert inspected["envelope"]["revision"] == head.id
    made = cli("revision", "-m", "nothing changes", "--rev-id", "0007", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (chain / "versions" / "0007_nothing_changes.fixture.pt").is_file()
    assert cli("test", cwd=tmp_path).returncode == 0


def test_the_pytest_plugin_proves_the_chain_in_a_project_suite(tmp_path: Path, chain: Path) -> None:
    (tmp_path / "test_chain.py").write_text(textwrap.dedent(f'''
        def test_old_checkpoints_keep_working(ckptmigrate_chain):
            results = ckptmigrate_chain(migrations={str(chain)!r}, model={MODEL!r})
            assert all(r.ok for r in results)
    '''))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_a_revision_without_a_fixture_is_named_and_fails_ci_when_every_revision_must_have_one(
        chain: Path, cli: Cli) -> None:
    for p in (chain / "versions").glob("0003_*.fixture*"):
        p.unlink()
    lenient = cli("test", "--migrations", chain, "--model", MODEL, "--json")
    assert lenient.returncode == 0, lenient.stderr
    report = json.loads(lenient.stdout)
    assert report["ok"] and report["unrecorded"] == ["0003"]
    assert "0003" not in {r["revision"] for r in report["results"]}
    strict = cli("test", "--migrations", chain, "--model", MODEL, "--every-revision")
    assert strict.returncode == 1
    assert "no fixture for 0003" in strict.stderr and "fixture record" in strict.stderr
    with pytest.raises(ChainBroken, match="no fixture for 0003"):
        check_chain(migrations=chain, model=MODEL, every_revision=True)
