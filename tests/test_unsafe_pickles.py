"""User story: "before I load or sign a checkpoint, I want to know whether it would run code".

ckptmigrate never runs a pickle's code; but the user's next ``torch.load(weights_only=False)``
would. So a file whose pickle names globals outside torch's ``weights_only`` allow-list is named
as unsafe by ``inspect`` (text and JSON, with the globals and which are called),
``ckptmigrate.load`` warns with :class:`UnsafePickleWarning`, and ``stamp --sign`` / ``--release``
refuse to vouch for it unless ``--allow-unsafe-pickle``. ``inspect`` also says whether the file
loads with ``weights_only=True`` — checked against real torch on real torch-written files.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptmigrate
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import UnsafePickleWarning
from ckptmigrate.formats.pickle_safety import WEIGHTS_ONLY_GLOBALS
from ckptmigrate.release import integrity, signing

Cli = Callable[..., subprocess.CompletedProcess[str]]


class RunsCode:
    """What a hostile checkpoint holds: unpickling it with weights_only=False runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    signing.keygen(d / "k.pem", d / "k.pub")
    return d / "k.pem", d / "k.pub"


def hostile(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "callback": RunsCode(marker)}, path)
    return path, marker


def test_inspect_names_the_callables_in_text_and_json(tmp_path: Path, cli: Cli) -> None:
    path, marker = hostile(tmp_path)
    proc = cli("inspect", path)
    assert proc.returncode == 0, proc.stderr
    assert "UNSAFE" in proc.stdout and f"{os.system.__module__}.system (called)" in proc.stdout
    assert "weights_only=True refuses it" in proc.stdout
    info = json.loads(cli("inspect", path, "--json").stdout)
    pickle = info[0]["pickle"] if isinstance(info, list) else info["pickle"]
    assert pickle["weights_only"] is False
    assert f"{os.system.__module__}.system" in pickle["unsafe_globals"]
    assert f"{os.system.__module__}.system" in pickle["called"]
    assert not marker.exists()


def test_a_safe_file_says_so(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)
    proc = cli("inspect", path)
    assert "loads with torch.load(weights_only=True)" in proc.stdout and "UNSAFE" not in proc.stdout


def test_load_warns_with_its_own_category(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path, marker = hostile(tmp_path)
    with pytest.warns(UnsafePickleWarning, match="system"):
        ckpt = ckptmigrate.load(path)
    assert torch.equal(ckpt.state_dict["w"], torch.ones(3))
    assert not marker.exists()


def test_signing_and_releasing_an_unsafe_file_is_refused_unless_allowed(
    tmp_path: Path, key: tuple[Path, Path], cli: Cli
) -> None:
    path, marker = hostile(tmp_path)
    before = path.read_bytes()
    for args in (("--sign", key[0]), ("--release", "1.0", "--allow-dirty")):
        proc = cli("stamp", path, *args)
        assert proc.returncode == 2, proc.stderr
        assert "system" in proc.stderr and "--allow-unsafe-pickle" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert path.read_bytes() == before
    assert cli("stamp", path).returncode == 0  # an envelope alone vouches for nothing
    proc = cli("stamp", path, "--sign", key[0], "--allow-unsafe-pickle")
    assert proc.returncode == 0, proc.stderr
    assert integrity.verify(path, key[1]).ok
    assert not marker.exists()


def real_payloads(tmp_path: Path) -> dict[str, Any]:
    """What training code saves, from weights-only-clean to code-running."""
    sd = torch.nn.Linear(2, 2).state_dict()
    return {
        "state_dict": sd,
        "lightning_like": {"state_dict": sd, "epoch": 3, "hparams": {"lr": 0.1, "betas": (0.9, 0.99)},
                           "ids": {1, 2}, "weird": [1 + 2j, bytearray(b"x")]},
        "namespace": {"model": sd, "args": argparse.Namespace(lr=0.1)},
        "numpy_scalar": {"model": sd, "best_acc1": np.float64(71.2)},
        "path": {"model": sd, "root": pathlib.PurePosixPath("/data")},
        "frozenset": {"model": sd, "tags": frozenset({"a"})},
        "module": torch.nn.Sequential(torch.nn.Linear(2, 2)),
        "ordered": OrderedDict(a=torch.ones(1)),
        "hostile": {"model": sd, "cb": RunsCode(tmp_path / "never")},
    }


def test_weights_only_verdict_and_blockers_match_real_torch(tmp_path: Path) -> None:
    for name, payload in real_payloads(tmp_path).items():
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        with Checkpoint.open(path) as ckpt:
            safety = ckpt.pickle_safety()
        try:
            torch.load(path, weights_only=True)
            loads = True
        except Exception:  # noqa: BLE001 - torch's UnpicklingError or a wrapped one
            loads = False
        assert safety.weights_only == loads, name
        torch_says = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        assert set(safety.unsafe) == torch_says, name
    assert not (tmp_path / "never").exists()


def test_the_allow_list_is_the_installed_torchs() -> None:
    from torch._weights_only_unpickler import _get_allowed_globals

    assert set(_get_allowed_globals()) == WEIGHTS_ONLY_GLOBALS


def test_a_release_of_a_directory_leaves_the_unsafe_file_out_unless_allowed(tmp_path: Path,
                                                                            key: tuple[Path, Path]) -> None:
    import sys

    from conftest import ROOT

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"w": torch.ones(2)}, ckpts / "safe.pt")
    torch.save({"w": torch.ones(2), "cb": RunsCode(tmp_path / "never")}, ckpts / "unsafe.pt")
    script = [sys.executable, str(ROOT / "scripts" / "release_stamp.py"), str(ckpts), "--release", "1.0",
              "--sign", str(key[0]), "--allow-dirty"]
    proc = subprocess.run(script, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "unsafe.pt: FAILED" in proc.stderr and "--allow-unsafe-pickle" in proc.stderr
    listed = json.loads((ckpts / "release-manifest.json").read_text())["files"]
    assert [f["file"] for f in listed] == ["safe.pt"]
    proc = subprocess.run([*script, "--allow-unsafe-pickle"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "never").exists()
