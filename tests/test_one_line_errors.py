"""User story: "whatever file or argument I hand ckptmigrate, I get one line and exit 2, or it works."

The crafted inputs of the security review that still ended in a traceback: envelope fields of the
wrong JSON type, an envelope nested 900 deep, lone surrogates in envelope keys, in tags and in a
``--tag`` argument, FIFOs and ``/dev/zero`` given as key, signing key or manifest, a git checkout
owned by another user. And ordinary files that broke: ``torch.save({0: t})`` and tuple keys, which
now inspect, stamp and verify like any other file (``torch.load`` returns what it did before).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ckptmigrate import api, formats
from ckptmigrate.example import model_at

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "migrations")


def run(*args: str | Path | bytes, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv: list[Any] = [sys.executable, "-m", "ckptmigrate"]
    argv += [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def one_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptmigrate: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def envelope(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A real stamped envelope (with a digest) and the tensors it describes."""
    tensors = {k: v.contiguous() for k, v in model_at(2).state_dict().items()}
    path = tmp_path_factory.mktemp("seed") / "model.safetensors"
    save_file(tensors, path)
    api.stamp(path, revision="0002", lineage="example", tags={"team": "vision"}, digest=True)
    env = formats.read_envelope(path)[1]
    assert env is not None
    return tensors, env


def with_envelope(path: Path, tensors: dict[str, torch.Tensor], env: dict[str, Any]) -> Path:
    save_file(tensors, path, metadata={"ckptmigrate": json.dumps(env)})
    return path


WRONG = [("tags", ["a", "b"]), ("tags", {"a": 1}), ("history", 7), ("history", ["not an entry"]),
         ("history", [{"action": "upgrade", "revision": ["x"]}]), ("git", "main"), ("revision", 12),
         ("revision", {"id": "0002"}), ("lineage", []), ("digest", "sha256:0"), ("digest", {"tensors": [1]}),
         ("schema", {"w": {"shape": "3", "dtype": "float32"}}), ("format_version", "1")]


@pytest.mark.parametrize(("field", "value"), WRONG, ids=[f"{f}={json.dumps(v)}" for f, v in WRONG])
def test_an_envelope_field_of_the_wrong_type_is_one_line_naming_it(
    tmp_path: Path, envelope: tuple[dict[str, torch.Tensor], dict[str, Any]], field: str, value: Any
) -> None:
    tensors, env = envelope
    path = with_envelope(tmp_path / "bad.safetensors", tensors, {**env, field: value})
    before = path.read_bytes()

    for command in (("inspect",), ("stamp", "--tag", "k=v"), ("upgrade", "--migrations", EXAMPLE)):
        line = one_line(run(command[0], path, *command[1:], cwd=tmp_path))
        assert str(path) in line and f"envelope's {field}" in line, line
    assert path.read_bytes() == before


def test_an_envelope_nested_900_deep_is_one_line(
    tmp_path: Path, envelope: tuple[dict[str, torch.Tensor], dict[str, Any]]
) -> None:
    tensors, env = envelope
    deep: Any = "x"
    for _ in range(900):
        deep = [deep]
    path = with_envelope(tmp_path / "deep.safetensors", tensors, {**env, "history": [{"ops": deep}]})

    for command in ("inspect", "stamp"):
        assert "nested deeper" in one_line(run(command, path, cwd=tmp_path))
    verified = run("verify", path, cwd=tmp_path)  # verify reports a file it cannot check as failed
    assert verified.returncode == 1 and "Traceback" not in verified.stderr
    assert "nested deeper" in verified.stdout + verified.stderr


@pytest.mark.parametrize("where", ["tag key", "tag value", "history"])
def test_a_lone_surrogate_in_the_envelope_is_one_line(
    tmp_path: Path, envelope: tuple[dict[str, torch.Tensor], dict[str, Any]], where: str
) -> None:
    tensors, env = envelope
    changed = {
        "tag key": {**env, "tags": {"\ud800": "x"}},
        "tag value": {**env, "tags": {"x": "\udfff"}},
        "history": {**env, "history": [{"action": "stamp", "message": "\ud834"}]},
    }[where]
    path = with_envelope(tmp_path / "s.safetensors", tensors, changed)  # json.dumps escapes it: valid JSON

    for command in ("inspect", "stamp"):
        assert "surrogate" in one_line(run(command, path, cwd=tmp_path))


def test_a_tag_argument_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(model_at(2).state_dict(), path)
    before = path.read_bytes()

    for arg in (b"k=\xed\xa0\x80", b"\xff=v"):
        line = one_line(run("stamp", path, b"--tag", arg, cwd=tmp_path))
        assert "--tag" in line and "UTF-8" in line
    assert path.read_bytes() == before


@pytest.mark.parametrize("payload", ["int keys", "tuple keys"])
def test_non_string_keys_inspect_stamp_and_verify(tmp_path: Path, payload: str) -> None:
    sd: dict[Any, torch.Tensor] = (
        {0: torch.arange(4.0), 1: torch.ones(2, 2)} if payload == "int keys"
        else {(0, "w"): torch.arange(4.0), "b": torch.ones(3)}
    )
    path = tmp_path / "odd.pt"
    torch.save(sd, path)

    listed = run("inspect", "--keys", path, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    for key in sd:
        assert (key if isinstance(key, str) else repr(key)) in listed.stdout
    assert run("stamp", path, "--digest", "--tag", "k=v", cwd=tmp_path).returncode == 0
    verified = run("verify", path, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    got = torch.load(path, weights_only=True)
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_two_keys_with_one_text_are_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "clash.pt"
    torch.save({0: torch.ones(1), "0": torch.zeros(1)}, path)

    for command in (("inspect", "--keys"), ("stamp",)):
        line = one_line(run(command[0], path, *command[1:], cwd=tmp_path))
        assert str(path) in line and "'0'" in line


@pytest.fixture
def not_files(tmp_path: Path) -> list[Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return [fifo, Path("/dev/zero")]


def test_a_fifo_or_dev_zero_as_key_signing_key_or_manifest_is_one_line(tmp_path: Path, not_files: list[Path]) -> None:
    path = tmp_path / "m.pt"
    torch.save(model_at(2).state_dict(), path)
    api.stamp(path, digest=True)

    for bad in not_files:  # a hang fails on run()'s timeout, a MemoryError on the traceback check
        cases = ((("verify", path, "--public-key", bad), "key file"), (("stamp", path, "--sign", bad), "key file"),
                 (("verify", "--manifest", bad), "manifest"))
        for args, what in cases:
            line = one_line(run(*args, cwd=tmp_path))
            assert str(bad) in line and f"{what} is not a regular file" in line


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("git") is None, reason="needs root (chown) and git")
def test_stamp_in_a_checkout_owned_by_another_user_records_a_note(tmp_path: Path, git_repo: Path) -> None:
    path = git_repo / "m.pt"
    torch.save(model_at(2).state_dict(), path)
    for p in (git_repo, *git_repo.rglob("*")):
        os.lchown(p, 65534, 65534)

    stamped = run("stamp", path, "--tag", "k=v", cwd=git_repo)
    assert stamped.returncode == 0, stamped.stderr
    git = formats.read_envelope(path)[1]["git"]
    assert git["commit"] is None and "dubious ownership" in git["note"]

    line = one_line(run("stamp", path, "--release", "1.0", cwd=git_repo))
    assert "safe.directory" in line
