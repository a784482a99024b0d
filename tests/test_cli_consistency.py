"""User story: "the CLI never fails silently, and every command behaves like the others."

Each case was seen by a user: a migration that calls ``sys.exit()`` ended a batch with exit 0 and
nothing done; an empty directory printed nothing; ``-o`` overwrote a file; a missing output
directory was reported as a missing input named after an internal lock file; ``init`` orphaned a
chain; ``--dry-run`` showed counts; ``inspect`` refused directories and printed "Broken pipe" into
``| head``; ``--key`` meant two things; ``--debug`` worked only before the subcommand; click's
``Error:`` beside ``ckptmigrate: error:``. All run here as real subprocesses on real files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptmigrate import BadInput, api, formats
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.util.paths import CHECKPOINT_SUFFIXES

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "migrations")
Cli = Callable[..., subprocess.CompletedProcess[str]]


def chain(root: Path, scripts: dict[str, tuple[str | None, str]], name: str = "chain") -> Path:
    """A script directory: revision id -> (down_revision, body of upgrade())."""
    versions = root / name / "versions"
    versions.mkdir(parents=True)
    for rev, (down, body) in scripts.items():
        (versions / f"{rev}.py").write_text(f'"""Revision {rev}."""\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
                                            f"def upgrade(ckpt):\n    {body}\n")
    return versions.parent


def small(path: Path, first: str = "a") -> Path:
    torch.save({first: torch.arange(6.0).reshape(2, 3), "other": torch.tensor([1, 2])}, path)
    return path


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


# -- no silent failures -----------------------------------------------------------------------------------


def test_sys_exit_inside_upgrade_fails_that_file_and_the_batch_exits_2(tmp_path: Path, cli: Cli) -> None:
    chain(tmp_path, {"r1": (None, "pass"), "r2": ("r1", "import sys; sys.exit()")})
    for name in ("a.pt", "b.pt"):
        small(tmp_path / name)
    before = {n: (tmp_path / n).read_bytes() for n in ("a.pt", "b.pt")}
    proc = cli("upgrade", "a.pt", "b.pt", "--from", "r1", "--migrations", "chain")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "revision r2" in proc.stderr and "called sys.exit(None)" in proc.stderr
    assert "2 files: 0 written, 0 unchanged, 2 failed" in proc.stdout
    assert {n: (tmp_path / n).read_bytes() for n in before} == before  # nothing written


@pytest.mark.parametrize("command", [
    ["inspect"], ["current"], ["stamp"], ["upgrade", "--migrations", EXAMPLE],
    ["downgrade", "--to", "base", "--migrations", EXAMPLE], ["verify"], ["sanitize"],
])
def test_an_empty_directory_is_no_checkpoint_files_found_for_every_command(
    tmp_path: Path, cli: Cli, command: list[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a checkpoint")
    proc = cli(command[0], "empty", *command[1:])
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_lines(proc) == [f"ckptmigrate: error: empty: no checkpoint files found (looked for "
                                 f"{', '.join(CHECKPOINT_SUFFIXES)})"]
    if command[0] in ("inspect", "current", "upgrade", "downgrade", "verify", "sanitize"):
        as_json = cli(command[0], "empty", *command[1:], "--json")
        assert as_json.returncode == 2 and "Traceback" not in as_json.stderr
        error = json.loads(as_json.stdout)["error"]
        assert error["type"] == "BadInput" and error["path"] == "empty" and error["exit_code"] == 2


def test_a_non_tensor_assigned_into_the_state_dict_is_refused_naming_the_key(tmp_path: Path, cli: Cli) -> None:
    chain(tmp_path, {"r1": (None, "pass"), "r2": ("r1", "ckpt.state_dict['step'] = 7")})
    path = small(tmp_path / "m.pt")
    before = path.read_bytes()
    proc = cli("upgrade", "m.pt", "--from", "r1", "--migrations", "chain")
    assert proc.returncode == 2
    assert "state_dict['step'] = int: a state dict holds tensors only; put other values in ckpt.extras" in proc.stderr
    assert path.read_bytes() == before
    with Checkpoint.open(path) as ckpt, pytest.raises(TypeError, match=r"state_dict\['x'\] = str"):
        ckpt.state_dict["x"] = "not a tensor"


def test_stamp_revision_refuses_a_file_whose_schema_is_another_revisions(tmp_path: Path, cli: Cli) -> None:
    path = small(tmp_path / "m.pt", first="b")  # what c2 produces
    root = chain(tmp_path, {"c1": (None, "pass"), "c2": ("c1", "ckpt.rename('a', 'b')")})
    for rev, first in (("c1", "a"), ("c2", "b")):
        schema = {first: {"shape": [2, 3], "dtype": "float32"}, "other": {"shape": [2], "dtype": "int64"}}
        (root / "versions" / f"{rev}.schema.json").write_text(json.dumps(schema))
    before = path.read_bytes()
    proc = cli("stamp", "m.pt", "--revision", "c1", "--migrations", "chain")
    assert proc.returncode == 2
    line = error_lines(proc)[0]
    assert line.startswith("ckptmigrate: error: m.pt: its schema is revision c2's, not c1's (")
    assert "renamed   a -> b" in line  # the difference, as `diff` words it
    assert path.read_bytes() == before
    cli("stamp", "m.pt", "--revision", "c2", "--migrations", "chain", check=True)
    assert formats.read_envelope(path)[1]["revision"] == "c2"  # type: ignore[index]


@pytest.mark.parametrize("command", [
    ["upgrade", "--from", "c1", "--migrations", "chain"], ["stamp"], ["compact"], ["sanitize"],
])
def test_dash_o_never_overwrites_an_existing_file_unless_asked(tmp_path: Path, cli: Cli, command: list[str]) -> None:
    chain(tmp_path, {"c1": (None, "pass"), "c2": ("c1", "ckpt.rename('a', 'b')")})
    small(tmp_path / "m.pt")
    (tmp_path / "out.pt").write_bytes(b"precious")
    proc = cli(command[0], "m.pt", *command[1:], "-o", "out.pt")
    assert proc.returncode == 2
    assert error_lines(proc) == ["ckptmigrate: error: out.pt: the output exists, and overwriting it was not asked "
                                 "for; pass --overwrite to replace it"]
    assert (tmp_path / "out.pt").read_bytes() == b"precious"
    cli(command[0], "m.pt", *command[1:], "-o", "out.pt", "--overwrite", check=True)
    assert torch.load(tmp_path / "out.pt")["other"].tolist() == [1, 2]


@pytest.mark.parametrize("command", [
    ["upgrade", "--from", "c1", "--migrations", "chain"], ["stamp"], ["compact"], ["sanitize"],
])
def test_a_missing_output_directory_is_named_as_such(tmp_path: Path, cli: Cli, command: list[str]) -> None:
    chain(tmp_path, {"c1": (None, "pass"), "c2": ("c1", "ckpt.rename('a', 'b')")})
    small(tmp_path / "m.pt")
    proc = cli(command[0], "m.pt", *command[1:], "-o", "nowhere/out.pt")
    assert proc.returncode == 2
    assert error_lines(proc) == ["ckptmigrate: error: nowhere/out.pt: the output's directory nowhere does not exist"]
    assert "lock" not in proc.stderr


def test_init_refuses_to_orphan_an_existing_chain(tmp_path: Path, cli: Cli) -> None:
    cli("init", "migrations", check=True)
    cli("revision", "-m", "first", "--rev-id", "a1", check=True)
    pyproject = (tmp_path / "pyproject.toml").read_text()
    proc = cli("init", "other")
    assert proc.returncode == 2
    assert "already records migrations = 'migrations' (1 scripts in" in proc.stderr
    assert "would orphan that chain" in proc.stderr
    assert (tmp_path / "pyproject.toml").read_text() == pyproject and not (tmp_path / "other").exists()


# -- one behaviour for every command ------------------------------------------------------------------------


def test_inspect_and_current_take_directories_and_globs(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "ckpts").mkdir()
    for name in ("a.pt", "b.pt"):
        small(tmp_path / "ckpts" / name)
    api.stamp(tmp_path / "ckpts" / "a.pt", tags={"run": "1"})
    infos = json.loads(cli("inspect", "ckpts", "--json", check=True).stdout)
    assert [Path(i["path"]).name for i in infos] == ["a.pt", "b.pt"]
    rows = json.loads(cli("current", "ckpts/*.pt", "--json", check=True).stdout)
    assert [(Path(r["path"]).name, r["stamped"]) for r in rows] == [("a.pt", True), ("b.pt", False)]
    assert cli("current", "ckpts", check=True).stdout.splitlines() == [
        f"{Path('ckpts') / 'a.pt'}: stamped, no revision", f"{Path('ckpts') / 'b.pt'}: unstamped"]


def test_inspect_into_head_ends_quietly_with_exit_0(tmp_path: Path) -> None:
    torch.save({f"layer.{i}.weight": torch.zeros(1) for i in range(4000)}, tmp_path / "many.pt")
    proc = subprocess.Popen([sys.executable, "-m", "ckptmigrate", "inspect", "--keys", "many.pt"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().decode().strip() == "many.pt"  # the reader takes one line and goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert err == ""  # no "Broken pipe", no "Exception ignored"


def test_key_is_the_state_dict_location_on_verify_too(tmp_path: Path, cli: Cli) -> None:
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 3}, tmp_path / "m.pt")
    cli("keygen", "k.pem", "k.pub", check=True)
    cli("stamp", "m.pt", "--key", "model", "--sign", "k.pem", check=True)
    ok = cli("verify", "m.pt", "--key", "model", "--public-key", "k.pub")
    assert ok.returncode == 0 and "OK (1 tensors" in ok.stdout
    old_style = cli("verify", "m.pt", "--key", "k.pub")
    assert old_style.returncode == 2
    assert error_lines(old_style) == [
        "ckptmigrate: error: k.pub: a key file given as --key, which names where the state dict sits on every "
        "command; pass the public key as --public-key k.pub"]


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path: Path, cli: Cli) -> None:
    plain = cli("inspect", "missing.pt")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    for args in (["--debug", "inspect", "missing.pt"], ["inspect", "missing.pt", "--debug"]):
        proc = cli(*args)
        assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr


def test_usage_errors_have_the_same_prefix_and_exit_2(tmp_path: Path, cli: Cli) -> None:
    for args in (["inspect", "--no-such-flag", "x.pt"], ["stamp", "x.pt", "--tag", "novalue"], ["frobnicate"]):
        proc = cli(*args)
        assert proc.returncode == 2, args
        assert "ckptmigrate: error: " in proc.stderr and "Error:" not in proc.stderr.replace("error:", ""), args
        assert error_lines(proc)[-1].startswith("ckptmigrate: error: ")


def test_downgrade_to_base_over_a_baseline_that_does_nothing(tmp_path: Path, cli: Cli) -> None:
    chain(tmp_path, {"b1": (None, '"""Checkpoints as they were."""'), "b2": ("b1", "ckpt.rename('a', 'b')")})
    path = small(tmp_path / "m.pt")
    cli("stamp", "m.pt", "--revision", "b1", "--migrations", "chain", check=True)  # no upgrade history for b1
    cli("upgrade", "m.pt", "--migrations", "chain", check=True)
    proc = cli("downgrade", "m.pt", "--to", "base", "--migrations", "chain")
    assert proc.returncode == 0, proc.stderr
    assert list(torch.load(path)) == ["a", "other"]
    assert cli("current", "m.pt", check=True).stdout.strip() == "stamped, no revision"


# -- schema snapshots from the command line ---------------------------------------------------------------


def test_schema_record_from_a_model_or_a_checkpoint_and_on_revision(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "mymodel.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Linear(3, 2)\n")
    cli("init", check=True)
    with open(tmp_path / "pyproject.toml", "a") as fh:
        fh.write('model = "mymodel:build"\n')
    made = cli("revision", "-m", "baseline", "--rev-id", "r1", check=True)
    snapshot = tmp_path / "migrations" / "versions" / "r1_baseline.schema.json"
    assert made.stdout.strip().endswith("and r1_baseline.schema.json")
    assert json.loads(snapshot.read_text()) == {"weight": {"shape": [2, 3], "dtype": "float32"},
                                                "bias": {"shape": [2], "dtype": "float32"}}
    torch.save({"module.weight": torch.ones(2, 3), "module.bias": torch.ones(2)}, tmp_path / "old.pt")
    proc = cli("schema", "record", "r1", "--from-checkpoint", "old.pt", check=True)
    assert proc.stdout.strip() == f"recorded {snapshot}"
    assert set(json.loads(snapshot.read_text())) == {"module.weight", "module.bias"}
    assert json.loads(cli("current", "old.pt", "--json", check=True).stdout)["stamped"] is False
    plan = cli("upgrade", "old.pt", "--dry-run", check=True)
    assert "already at r1" in plan.stdout  # recognised by the recorded schema
    cli("schema", "record", "r1", "--model", "mymodel:build", check=True)
    assert set(json.loads(snapshot.read_text())) == {"weight", "bias"}


# -- messages -----------------------------------------------------------------------------------------


def test_messages_count_words_and_name_no_internal_classes(tmp_path: Path, cli: Cli) -> None:
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    proc = cli("inspect", "tensor.pt")
    assert proc.returncode == 2 and "TensorRef" not in proc.stderr and "the payload is a tensor" in proc.stderr

    path = small(tmp_path / "m.pt")
    api.stamp(path)
    text = cli("inspect", "m.pt", check=True).stdout
    assert "CUDA None" not in text
    assert ("no CUDA" in text) == (torch.version.cuda is None)

    chain(tmp_path, {"c1": (None, "pass"), "c2": ("c1", "ckpt.rename('a', 'b')")})
    out = cli("upgrade", "m.pt", "--from", "c1", "--dry-run", "--migrations", "chain", check=True).stdout
    assert "rename (1 key)" in out and "(1 keys)" not in out and "→" not in out
    done = cli("upgrade", "m.pt", "--from", "c1", "--migrations", "chain", check=True).stdout.strip()
    assert done == "m.pt: upgrade c1 -> c2 (backup: m.pt.bak)"  # the path once, not again as the output


def test_tied_weights_are_counted_once_in_the_size(tmp_path: Path, cli: Cli) -> None:
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight  # tied, as GPT-2's lm_head
    torch.save({"emb.weight": emb.weight, "head.weight": head.weight}, tmp_path / "tied.pt")
    info = json.loads(cli("inspect", "tied.pt", "--json", check=True).stdout)
    assert info["tensors"] == 2
    assert info["bytes"] == emb.weight.numel() * emb.weight.element_size()
    torch.save({"a": torch.zeros(100, 16), "b": torch.zeros(100, 16)}, tmp_path / "untied.pt")
    assert json.loads(cli("inspect", "untied.pt", "--json", check=True).stdout)["bytes"] == 2 * info["bytes"]


def test_no_checkpoint_path_is_an_error_for_the_api_too(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no checkpoint files found") as err:
        api.checkpoint_files([tmp_path / "empty"])
    assert err.value.path == os.fspath(tmp_path / "empty")
