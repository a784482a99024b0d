"""User story: "I download a release directory and run ``verify --manifest``. If someone dropped an
unsigned checkpoint beside the signed ones, I am told — and with ``--strict`` the check fails."

A file is a checkpoint by its bytes, not its name (``torch.load`` does not look at the suffix): a zip,
a legacy torch file, safetensors or a tar archive under any name is reported, a text file or a FIFO
is not, and a symlinked directory is not followed. Real releases: ``scripts/release_stamp.py`` in a
real git repository, ``ckptmigrate verify`` as a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckptmigrate.release import signing

Cli = Callable[..., subprocess.CompletedProcess[str]]
RELEASE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "release_stamp.py"


@pytest.fixture
def release(git_repo: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A signed release of two checkpoints: (its manifest, the public key)."""
    ckpts = git_repo / "release"
    (ckpts / "sub").mkdir(parents=True)
    torch.save({"w": torch.arange(4.0)}, ckpts / "model.pt")
    torch.save({"state_dict": {"b": torch.ones(2)}}, ckpts / "sub" / "trainer.ckpt")
    signing.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    proc = subprocess.run([sys.executable, RELEASE_SCRIPT, "release", "--release", "1.0", "--sign", tmp_path / "k.pem"],
                          cwd=git_repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ckpts / "release-manifest.json", tmp_path / "k.pub"


def plant_unlisted(ckpts: Path, outside: Path) -> set[str]:
    """Unsigned checkpoints under names a suffix filter would miss, and look-alikes that are not
    checkpoints; return the relative paths that must be reported."""
    torch.save({"w": torch.zeros(4)}, ckpts / "extra.bin")
    shutil.copy(ckpts / "model.pt", ckpts / "model.pt.bak")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (ckpts / "sub" / "weights.dat").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    (ckpts / "notes.txt").write_text("release notes\n")
    (ckpts / "empty.pt").write_bytes(b"")
    os.mkfifo(ckpts / "pipe.pt")
    outside.mkdir()
    torch.save({"w": torch.zeros(1)}, outside / "elsewhere.pt")
    (ckpts / "linked").symlink_to(outside, target_is_directory=True)
    return {"extra.bin", "model.pt.bak", "sub/weights.dat"}


def test_unlisted_checkpoints_are_reported_and_strict_fails_on_them(
    release: tuple[Path, Path], tmp_path: Path, cli: Cli
) -> None:
    manifest, pub = release
    ckpts = manifest.parent
    assert cli("verify", "--manifest", manifest, "--public-key", pub, "--strict").returncode == 0  # a clean release

    expected = plant_unlisted(ckpts, tmp_path / "outside")
    warned = cli("verify", "--manifest", manifest, "--public-key", pub)
    assert warned.returncode == 0, warned.stderr  # the listed files still verify
    reported = {line.split(": ")[0] for line in warned.stderr.splitlines() if "not listed in the manifest" in line}
    assert {os.path.relpath(p, ckpts) for p in reported} == expected
    assert all("WARNING" in line for line in warned.stderr.splitlines() if "not listed" in line)

    as_json = json.loads(cli("verify", "--manifest", manifest, "--public-key", pub, "--json").stdout)
    unlisted = {os.path.relpath(item["path"], ckpts): item["format"] for item in as_json["manifest"]["unlisted"]}
    assert unlisted == {"extra.bin": "torch-zip", "model.pt.bak": "torch-zip", "sub/weights.dat": "safetensors"}
    assert as_json["ok"] is True

    strict = cli("verify", "--manifest", manifest, "--public-key", pub, "--strict", "--json")
    assert strict.returncode == 1
    report = json.loads(strict.stdout)
    assert report["ok"] is False and "not listed" in report["manifest"]["problems"][0]
    text = cli("verify", "--manifest", manifest, "--public-key", pub, "--strict")
    assert text.returncode == 1 and "Traceback" not in text.stderr
    failed = [line for line in text.stderr.splitlines() if "FAILED" in line and "not listed in the manifest" in line]
    assert len(failed) == len(expected)


def test_a_file_listed_under_another_spelling_of_its_path_counts_as_listed(
    release: tuple[Path, Path], cli: Cli
) -> None:
    manifest, pub = release
    doc = json.loads(manifest.read_text())
    for entry in doc["files"]:
        entry["file"] = "./" + entry["file"]
    manifest.write_text(json.dumps(doc))  # the signature no longer matches, but coverage is what we ask
    report = json.loads(cli("verify", "--manifest", manifest, "--json").stdout)
    assert report["manifest"]["unlisted"] == []


def test_strict_without_a_manifest_is_bad_input(tmp_path: Path, cli: Cli) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "a.pt")
    proc = cli("verify", tmp_path / "a.pt", "--strict")
    assert proc.returncode == 2 and "--manifest" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
