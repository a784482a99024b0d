"""User story: "I pointed ckptmigrate at the wrong file — it told me so in one line, and nothing ran."

Missing paths, directories, empty or random files, truncated archives and lying safetensors
headers are refused by ``inspect`` and ``stamp`` with exit code 2 and exactly one line on stderr
(``ckptmigrate: error: <path>: <problem>``), never a traceback, and by the Python API with
:class:`~ckptmigrate.errors.BadInput`; the file is left as it was and no output is written.
A checkpoint whose pickle would run a shell command when loaded is read without running it.
``--debug`` shows the traceback for a bug report.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckptmigrate import api
from ckptmigrate.errors import BadInput

Cli = Callable[..., subprocess.CompletedProcess[str]]


def zip_checkpoint(path: Path) -> bytes:
    torch.save({"w": torch.arange(2048, dtype=torch.float32), "b": torch.ones(3)}, path)
    return path.read_bytes()


def legacy_checkpoint(path: Path) -> bytes:
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def safetensors_bytes(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def f32(shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def truncated(make: Callable[[Path], bytes], where: float) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        data = make(path)
        path.write_bytes(data[: int(len(data) * where)])

    return build


def middle_cut_out(path: Path) -> None:
    """1 KiB gone from inside a storage record: the directory at the end now points astray."""
    data = zip_checkpoint(path)
    middle = len(data) // 2
    path.write_bytes(data[:middle] + data[middle + 1024 :])


def write(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def plain_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "not a checkpoint")


def compressed_zip_checkpoint(path: Path) -> None:
    """A torch checkpoint someone re-zipped with compression: torch cannot mmap it, nor can we."""
    source = path.with_suffix(".orig")
    zip_checkpoint(source)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))


def with_envelope_record(data: bytes) -> Callable[[Path], None]:
    """A torch checkpoint whose ckptmigrate envelope record holds ``data``."""

    def build(path: Path) -> None:
        zip_checkpoint(path)
        with zipfile.ZipFile(path, "a") as zf:
            prefix = zf.namelist()[0].split("/")[0]
            zf.writestr(f"{prefix}/.data/ckptmigrate.json", data)

    return build


BAD_FILES: dict[str, Callable[[Path], None] | None] = {
    "missing": None,
    "directory": lambda path: path.mkdir(),
    "empty": write(b""),
    "random-bytes": write(bytes(range(256)) * 7),
    "plain-pickle": write(pickle.dumps({"a": 1}, protocol=2)),
    "zip-without-checkpoint": plain_zip,
    "zip-compressed-records": compressed_zip_checkpoint,
    "zip-envelope-not-json": with_envelope_record(b"{truncated"),
    "zip-envelope-from-a-newer-ckptmigrate": with_envelope_record(
        json.dumps({"format_version": 999, "schema": {}, "arch_hash": "", "layout": "bare",
                    "devices": []}).encode()
    ),
    **{
        f"zip-truncated-at-{int(where * 100)}%": truncated(zip_checkpoint, where)
        for where in (0.01, 0.5, 0.97, 0.999)
    },
    "zip-with-bytes-cut-from-the-middle": middle_cut_out,
    **{
        f"legacy-truncated-at-{int(where * 100)}%": truncated(legacy_checkpoint, where)
        for where in (0.05, 0.5, 0.99)
    },
    "safetensors-overlapping-offsets": write(
        safetensors_bytes({"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, bytes(24))
    ),
    "safetensors-offsets-past-end": write(safetensors_bytes({"a": f32([4], 0, 16)}, bytes(8))),
    "safetensors-gap-between-tensors": write(
        safetensors_bytes({"a": f32([2], 0, 8), "b": f32([2], 12, 20)}, bytes(20))
    ),
    "safetensors-trailing-bytes": write(safetensors_bytes({"a": f32([2], 0, 8)}, bytes(12))),
    "safetensors-offsets-not-matching-shape": write(
        safetensors_bytes({"a": f32([4], 0, 12)}, bytes(12))
    ),
    "safetensors-header-longer-than-file": write(struct.pack("<Q", 1 << 20) + b'{"a": 1}'),
    "safetensors-header-not-json": write(struct.pack("<Q", 12) + b"{not json!!}" + bytes(8)),
}


@pytest.fixture(params=list(BAD_FILES))
def bad_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"{request.param}.pt"
    build = BAD_FILES[request.param]
    if build is not None:
        build(path)
    return path


def fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(proc: subprocess.CompletedProcess[str], path: Path) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ckptmigrate: error: "), lines[0]
    assert path.name in lines[0]
    assert proc.stdout == ""
    return lines[0]


def run_cli_concurrently(cwd: Path, *commands: list[str | Path]) -> list[subprocess.CompletedProcess[str]]:
    """``ckptmigrate COMMAND`` for each command, as real subprocesses running side by side."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "ckptmigrate", *map(str, command)], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def test_cli_refuses_bad_file_in_one_line_and_writes_nothing(bad_file: Path, tmp_path: Path) -> None:
    before = fingerprint(bad_file)
    out = tmp_path / "out.pt"
    commands: list[list[str | Path]] = [["inspect", "--keys", bad_file]]
    if not bad_file.is_dir():  # stamp reads a directory as a set of checkpoints: tested below
        commands.append(["stamp", "--tag", "a=b", bad_file, "-o", out])
    for proc in run_cli_concurrently(tmp_path, *commands):
        assert_one_line_error(proc, bad_file)
    assert fingerprint(bad_file) == before
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckptmigrate")] == []


def test_stamp_of_a_directory_without_checkpoints_is_an_error(tmp_path: Path) -> None:
    directory = tmp_path / "no-checkpoints-here"
    directory.mkdir()
    (directory / "notes.txt").write_text("not a checkpoint")
    for proc in run_cli_concurrently(
        tmp_path, ["stamp", directory], ["stamp", directory, "-o", tmp_path / "out.pt"]
    ):
        assert_one_line_error(proc, directory)


def test_api_raises_bad_input(bad_file: Path, tmp_path: Path) -> None:
    before = fingerprint(bad_file)
    with pytest.raises(BadInput, match=bad_file.name):
        api.inspect(bad_file)
    with pytest.raises(BadInput, match=bad_file.name):
        api.stamp(bad_file, output=tmp_path / "out.pt")
    with pytest.raises(BadInput, match=bad_file.name):
        api.stamp(bad_file)
    assert fingerprint(bad_file) == before
    assert not (tmp_path / "out.pt").exists()


def test_debug_shows_the_traceback(cli: Cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    proc = cli("--debug", "inspect", empty)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "BadInput" in proc.stderr


# --- a pickle that runs a shell command when loaded -----------------------------------------------


class RunsAShellCommand:
    """Loading this with a full unpickler runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(params=["zip", "legacy"])
def booby_trapped(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """A real torch.save file whose payload holds a ``os.system`` call next to a tensor."""
    marker = tmp_path / "marker"
    path = tmp_path / f"trapped-{request.param}.pt"
    payload = {"weight": torch.arange(6, dtype=torch.float32), "hook": RunsAShellCommand(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=request.param == "zip")
    assert not marker.exists()
    return path, marker


def test_inspect_and_stamp_never_run_the_pickled_command(
    booby_trapped: tuple[Path, Path], cli: Cli, tmp_path: Path
) -> None:
    path, marker = booby_trapped
    info = api.inspect(path, keys=True)
    assert list(info["keys"]) == ["weight"]
    proc = cli("inspect", "--json", path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tensors"] == 1
    assert not marker.exists()

    out = tmp_path / "stamped.pt"
    proc = cli("stamp", path, "-o", out)  # the inert call is carried, not run and not refused
    assert not marker.exists()
    assert proc.returncode == 0, proc.stderr
    api.stamp(out, tags={"again": "1"})
    assert not marker.exists()
    assert api.inspect(out)["envelope"]["tags"] == {"again": "1"}

    # faithful: torch's safe loader still refuses the stamped file, as it refused the original
    for candidate in (path, out):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(candidate)
    # and only a user who explicitly trusts it gets what the original would have given them
    loaded = torch.load(out, weights_only=False)
    assert marker.exists()
    assert loaded["hook"] == 0  # the exit status of the command
    assert torch.equal(loaded["weight"], torch.arange(6, dtype=torch.float32))


def test_a_payload_that_is_only_a_command_is_refused_cleanly(cli: Cli, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "only-a-command.pt"
    torch.save(RunsAShellCommand(marker), path)
    for command in (["inspect", path], ["stamp", path]):
        assert_one_line_error(cli(*command), path)
    with pytest.raises(BadInput, match="not a state dict"):
        api.inspect(path)
    assert not marker.exists()
