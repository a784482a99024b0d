"""User story: "torch 2.6 made ``weights_only=True`` the default, and my old checkpoints stopped
loading: their hyper-parameters are an ``argparse.Namespace``, numpy values, paths, an OmegaConf
config" — ``ckptmigrate sanitize`` turns them into plain data and tensors without importing or
running anything the pickle names, names what it cannot convert, keeps a backup and records it.

Every file here is written by the real libraries (Lightning, argparse, numpy, pathlib, OmegaConf);
what ``torch.load(weights_only=True)`` returns for the sanitized file, in a fresh process, is
compared with what those libraries' own conversions (``vars``, ``.item()``, ``torch.from_numpy``,
``str``, ``OmegaConf.to_container(resolve=False)``) make of the original.
"""

from __future__ import annotations

import argparse
import collections
import copyreg
import json
import os
import pathlib
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ckptmigrate import api
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.release import signing

Cli = Callable[..., subprocess.CompletedProcess[str]]
TESTS = Path(__file__).resolve().parent


def plain(obj: Any) -> Any:
    """The oracle: what the libraries themselves turn each value into."""
    if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
        return {k: plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, collections.defaultdict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (DictConfig, ListConfig)):
        return plain(OmegaConf.to_container(obj, resolve=False))
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(obj.dtype.newbyteorder("=")))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, dict):
        out = type(obj)((k, plain(v)) for k, v in obj.items())
        for name, value in getattr(obj, "__dict__", {}).items():  # a state dict's _metadata
            setattr(out, name, value)
        return out
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    return obj


def loads_weights_only_as(path: Path, expected: Any, tmp_path: Path) -> None:
    """``torch.load(path, weights_only=True)`` in a fresh process equals ``expected``."""
    want = tmp_path / "expected.pt"
    torch.save(expected, want)
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from payload_equality import assert_same_payload\n"
        f"got = torch.load({str(path)!r}, weights_only=True)\n"
        f"assert_same_payload(got, torch.load({str(want)!r}, weights_only=False))\n"
        "print('same')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stderr[-2000:]


def lightning_checkpoint(path: Path) -> None:
    """A real Lightning checkpoint whose module saved a Namespace and a path as hyper-parameters."""
    pl = pytest.importorskip("pytorch_lightning")

    class Model(pl.LightningModule):  # type: ignore[name-defined]
        def __init__(self, args: argparse.Namespace, data_dir: pathlib.Path) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, _i: int) -> torch.Tensor:
            return self.lin(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    args = argparse.Namespace(lr=np.float32(0.01), layers=[64, 64], out=pathlib.Path("/runs/7"), seed=np.int64(7))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=path.parent)
    trainer.fit(Model(args, pathlib.Path("/data/set")), data)
    trainer.save_checkpoint(path)


def test_a_lightning_checkpoint_with_a_namespace_loads_with_weights_only_after_sanitize(
        tmp_path: Path, cli: Cli) -> None:
    ckpt = tmp_path / "last.ckpt"
    lightning_checkpoint(ckpt)
    original = torch.load(ckpt, weights_only=False)
    with pytest.raises(Exception, match="argparse.Namespace|Unsupported global"):
        torch.load(ckpt, weights_only=True)
    before = api.inspect(ckpt)["pickle"]
    assert not before["weights_only"] and "argparse.Namespace" in before["unsafe_globals"]
    assert "`ckptmigrate sanitize` turns argparse, numpy" in cli("inspect", ckpt, check=True).stdout  # the way out
    original_bytes = ckpt.read_bytes()

    run = cli("sanitize", ckpt)
    assert run.returncode == 0, run.stderr
    assert "argparse.Namespace -> dict" in run.stdout and "pathlib.PosixPath -> str" in run.stdout
    assert "loads with torch.load(weights_only=True)" in run.stdout
    assert (tmp_path / "last.ckpt.bak").read_bytes() == original_bytes  # the original, kept
    after = api.inspect(ckpt)
    assert after["pickle"] == {"weights_only": True, "unsafe_globals": [], "called": []}
    entry = after["envelope"]["history"][-1]
    assert entry["action"] == "sanitize" and entry["converted"]["argparse.Namespace -> dict"] == 1
    loads_weights_only_as(ckpt, plain(original), tmp_path)


def test_each_type_is_converted_as_its_library_would(tmp_path: Path, cli: Cli) -> None:
    cfg = OmegaConf.create({"lr": 0.1, "ref": "${lr}", "todo": "???", "model": {"dims": [8, "${lr}", {"k": None}]}})
    extras = {
        "args": argparse.Namespace(name="run", path=pathlib.Path("/ckpt/a"), nested=argparse.Namespace(x=1)),
        "scalars": [np.float32(1.1), np.float16(0.25), np.float64(-2.5), np.int8(-3), np.uint64(2**63 + 1),
                    np.bool_(True), np.complex64(1 - 2j), np.str_("héllo"), np.bytes_(b"ab")],
        "arrays": {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "bool": np.array([True, False]),
                   "f16": np.linspace(0, 1, 5, dtype=np.float16), "big": np.arange(4, dtype=">i4"),
                   "big_c": np.array([1 + 2j, -3j], dtype=">c16"),
                   "fortran": np.asfortranarray(np.arange(6.).reshape(2, 3)),
                   "scalar": np.array(3.5), "empty": np.zeros((0, 4), dtype=np.int16)},
        "paths": (pathlib.PurePosixPath("rel/x"), pathlib.PureWindowsPath("C:/data/y"), pathlib.Path("/abs")),
        "cfg": cfg, "list_cfg": OmegaConf.create([1, {"a": "${cfg.lr}"}]),
        "shared": None, "epoch": 3, "empty": b"",  # torch.save's own b"" does not load with weights_only
        "simple": types.SimpleNamespace(k=np.int32(5)), "counts": collections.defaultdict(list, {"a": [1]}),
    }
    extras["shared"] = extras["args"]  # one object twice stays one object
    src = tmp_path / "all.pt"
    torch.save({"model": {"w": torch.randn(3)}, **extras}, src)
    original = torch.load(src, weights_only=False)

    out = tmp_path / "clean.pt"
    row = api.sanitize(src, output=out)
    assert row["weights_only"] and row["written"] and row["output"] == str(out) and row["backup"] is None
    counts = {c["global"]: c["count"] for c in row["converted"]}
    assert counts["argparse.Namespace"] == 2 and counts["numpy scalar"] == 10 and counts["numpy.ndarray"] == 8
    assert counts["omegaconf.dictconfig.DictConfig"] == 4 and counts["omegaconf.listconfig.ListConfig"] == 2
    assert counts["builtins.bytes"] == 1 and counts["types.SimpleNamespace"] == counts["collections.defaultdict"] == 1
    assert {c["to"] for c in row["converted"] if c["global"] == "numpy.ndarray"} == {"tensor (dtype kept)"}
    loads_weights_only_as(out, plain(original), tmp_path)
    again = torch.load(out, weights_only=True)
    assert again["shared"] is again["args"]
    assert again["cfg"]["ref"] == "${lr}" and again["cfg"]["todo"] == "???"  # as written, not resolved
    # the CLI says the same thing as the API
    twin = json.loads(cli("sanitize", src, "--dry-run", "--json", check=True).stdout)
    assert twin["converted"] == row["converted"] and twin["weights_only"] and not twin["written"]


def test_what_cannot_be_converted_is_named_and_nothing_runs(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "mylib").mkdir()
    (tmp_path / "mylib" / "__init__.py").write_text(
        "class Settings:\n    def __init__(self, depth):\n        self.depth = depth\n")
    marker = tmp_path / "ran"

    class Payload:  # what a hostile or careless pickle does: call os.system on load
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    writer = (
        "import argparse, torch, mylib\n"
        f"torch.save({{'state_dict': {{'w': torch.ones(2)}}, 'args': argparse.Namespace(a=1), "
        f"'settings': mylib.Settings(3)}}, {str(tmp_path / 'mixed.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", writer], cwd=tmp_path, check=True, timeout=300)
    path = tmp_path / "mixed.pt"
    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": Payload(), "args": argparse.Namespace(b=2)}, hostile)

    run = cli("sanitize", path, hostile)
    assert run.returncode == 1, run.stderr  # written, but still refused by weights_only: a failed check
    assert "still refused by torch.load(weights_only=True): mylib.Settings (called)" in run.stdout
    assert "posix.system (called)" in run.stdout
    assert "2 files: 2 written, 2 still refused by weights_only, 0 failed" in run.stdout
    assert not marker.exists()  # read, converted and written, and nothing ran
    for name, blocker in (("mixed.pt", "mylib.Settings"), ("hostile.pt", "posix.system")):
        info = api.inspect(tmp_path / name)["pickle"]
        assert info["unsafe_globals"] == [blocker] and info["called"] == [blocker]  # the Namespace went
    refused = subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(hostile)!r}, weights_only=True)"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "system" in refused.stderr and not marker.exists()
    # the custom class is left exactly as it was: a trusted load still builds it
    code = f"import torch, mylib; s = torch.load({str(path)!r}, weights_only=False)['settings']; print(s.depth)"
    trusted = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert trusted.stdout.strip() == "3", trusted.stderr


def test_it_writes_like_upgrade_does(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "run.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    original = path.read_bytes()
    # --dry-run writes nothing; -o refuses to replace a file; a missing -o directory is named
    dry = cli("sanitize", path, "--dry-run")
    assert dry.returncode == 0 and "would convert" in dry.stdout and path.read_bytes() == original
    (tmp_path / "taken.pt").write_bytes(b"keep me")
    taken = cli("sanitize", path, "-o", "taken.pt")
    assert taken.returncode == 2 and "--overwrite" in taken.stderr
    assert (tmp_path / "taken.pt").read_bytes() == b"keep me"
    assert path.read_bytes() == original
    # a signed file: the signature covered the old bytes, so it is superseded (recorded), as upgrade does
    signing.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    cli("stamp", path, "--sign", tmp_path / "k.pem", "--allow-unsafe-pickle", check=True)
    signed = api.inspect(path)["envelope"]
    assert signed["signature"] is not None
    run = cli("sanitize", path, "--no-backup")
    assert run.returncode == 0 and "dropped (stamp --sign again)" in run.stdout
    assert not (tmp_path / "run.pt.bak").exists()
    env = api.inspect(path)["envelope"]
    assert env["signature"] is None and env["history"][-1]["superseded"]["signature"] == signed["signature"]
    assert cli("verify", path, "--public-key", tmp_path / "k.pub").returncode == 1  # unsigned now: stamp again
    # nothing left to convert: untouched
    before = path.read_bytes()
    assert "nothing to convert" in cli("sanitize", path, check=True).stdout and path.read_bytes() == before


def test_what_sanitize_refuses(tmp_path: Path, cli: Cli) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    run = cli("sanitize", "module.pt")
    assert run.returncode == 2 and "whole pickled nn.Module" in run.stderr and "Traceback" not in run.stderr
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    before = (tmp_path / "w.safetensors").read_bytes()
    row = api.sanitize(tmp_path / "w.safetensors")  # nothing pickled, nothing to do: not an error in a batch
    assert row["note"] == "a safetensors checkpoint holds no pickle: nothing to sanitize" and not row["written"]
    assert (tmp_path / "w.safetensors").read_bytes() == before
    with pytest.raises(BadInput, match="nothing-here: no such file"):
        api.sanitize(tmp_path / "nothing-here")


def test_a_migration_that_sanitizes_is_irreversible(tmp_path: Path, cli: Cli) -> None:
    versions = tmp_path / "mig" / "versions"
    versions.mkdir(parents=True)
    (versions / "0001_base.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n')
    (versions / "0002_clean.py").write_text(
        'revision = "0002"\ndown_revision = "0001"\n\n\ndef upgrade(ckpt):\n    ckpt.sanitize()\n')
    path = tmp_path / "run.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=np.float64(0.5))}, path)
    cli("upgrade", path, "--from", "0001", "--migrations", "mig", check=True)
    assert torch.load(path, weights_only=True)["args"] == {"lr": 0.5}
    entry = api.inspect(path)["envelope"]["history"][-1]
    assert entry["inverse"] is None and entry["ops"] == [{"op": "sanitize", "keys": 2}]
    down = cli("downgrade", path, "--to", "0001", "--migrations", "mig")
    assert down.returncode == 2 and "write a downgrade()" in down.stderr


def test_files_numpy_1_wrote_are_converted_too(tmp_path: Path) -> None:
    """numpy < 2 pickled its scalars and arrays as ``numpy.core.multiarray.*`` (numpy 2: ``numpy._core``)."""
    path = tmp_path / "np1.pt"
    torch.save({"model": {"w": torch.ones(1)}, "best": np.float64(0.25), "mean": np.arange(3, dtype=np.int16)}, path)
    with Checkpoint.open(path) as ckpt:
        ckpt.rename_global("numpy._core.multiarray.", "numpy.core.multiarray.")  # what numpy 1.x wrote
        assert "numpy.core.multiarray.scalar" in ckpt.pickle_safety().unsafe
        report = ckpt.sanitize()
        assert report.safety.weights_only and sum(report.converted.values()) == 2
        assert ckpt.extras["best"] == 0.25 and ckpt.extras["mean"].shape == (3,)


def test_lightnings_attribute_dict_becomes_a_dict(tmp_path: Path) -> None:
    """Older Lightning saved ``hparams`` as its ``AttributeDict`` (a dict subclass)."""
    parsing = pytest.importorskip("pytorch_lightning.utilities.parsing")
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": parsing.AttributeDict(lr=0.1, dims=[4])}, path)
    row = api.sanitize(path)
    assert row["weights_only"] and row["converted"][0]["to"] == "dict" and row["backup"] == f"{path}.bak"
    assert torch.load(path, weights_only=True)["hyper_parameters"] == {"lr": 0.1, "dims": [4]}


class Reduces:
    """Pickles as whatever ``reduced`` says: a look-alike of a class's pickle with other contents."""

    def __init__(self, *reduced: Any) -> None:
        self.reduced = reduced

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduced

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # what the pickler checks a __newobj__ class against
        first = self.reduced[1][0] if len(self.reduced) > 1 and self.reduced[1] else None
        return first if isinstance(first, type) and self.reduced[0].__name__ == "__newobj__" else Reduces


def test_look_alikes_are_left_as_they_are_not_guessed(tmp_path: Path) -> None:
    newobj = copyreg.__dict__["__newobj__"]
    scalar: Any = np.float64(0).__reduce__()[0]  # numpy 1 or 2's own names for them
    reconstruct: Any = np.zeros(1).__reduce__()[0]
    odd = {
        "path_of_ints": Reduces(pathlib.PurePosixPath, (1, 2)),
        "namespace_of_a_list": Reduces(newobj, (argparse.Namespace,), ["not", "a", "dict"]),
        "scalar_of_3_bytes": Reduces(scalar, (np.dtype("f8"), b"abc")),
        "array_too_short": Reduces(reconstruct, (np.ndarray, (0,), b"b"), (1, (4,), np.dtype("f4"), False, b"\0" * 8)),
        "config_of_a_number": Reduces(newobj, (DictConfig,), {"_content": 7}),
        "fine": argparse.Namespace(ok=True),
    }
    path = tmp_path / "odd.pt"
    torch.save({"model": {"w": torch.ones(1)}, **odd}, path)
    row = api.sanitize(path, dry_run=True)
    assert row["converted"] == [{"global": "argparse.Namespace", "to": "dict", "count": 1}]
    numpy_names = {f"{f.__module__}.{f.__name__}" for f in (scalar, reconstruct)}
    assert set(row["unsafe_globals"]) >= {"pathlib.PurePosixPath", "argparse.Namespace", "numpy.dtype",
                                          "omegaconf.dictconfig.DictConfig", *numpy_names}


def test_an_rng_state_file_still_restores_the_same_streams(tmp_path: Path) -> None:
    """Hugging Face's Trainer saves ``rng_state.pth``: Python's, numpy's (an array) and torch's RNG states."""
    import random

    path = tmp_path / "rng_state.pth"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
               path)
    expected = np.random.rand(3), random.random(), torch.rand(2)
    row = api.sanitize(path)
    assert row["weights_only"] and row["converted"] == [{"global": "numpy.ndarray", "to": "tensor (dtype kept)",
                                                         "count": 1}]
    state = torch.load(path, weights_only=True)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    torch.random.set_rng_state(state["cpu"])
    assert np.array_equal(np.random.rand(3), expected[0]) and random.random() == expected[1]
    assert torch.equal(torch.rand(2), expected[2])
