"""User story: "my checkpoints are whatever my training code wrote — ckptmigrate must read, carry
and write all of it back as torch would load it".

Real objects saved with ``torch.save``: OmegaConf/Hydra configs in Lightning-style hparams and
self-referencing dicts (reference cycles); quantized (per tensor, per channel), sparse COO and
CSR, nested and meta tensors. Each is read as inert data or recognised as a tensor (counted by
``inspect``), survives stamp and a rewrite that moves other tensors (torch.load of the result
equals torch.load of the original), is in the digest, and loads through the Python API.
TorchScript archives and ``torch.export`` files are named for what they are.
"""

from __future__ import annotations

import json
import subprocess
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import ckptmigrate
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.formats import torchzip
from ckptmigrate.release import integrity, signing

Cli = Callable[..., subprocess.CompletedProcess[str]]

warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    signing.keygen(d / "k.pem", d / "k.pem.pub")
    return d / "k.pem", d / "k.pem.pub"


def same(a: Any, b: Any, path: str = "") -> None:
    """Deep equality of what torch.load returned, cycles and tensors of every layout included."""
    seen: set[tuple[int, int]] = set()

    def walk(x: Any, y: Any, where: str) -> None:
        if (id(x), id(y)) in seen:
            return
        seen.add((id(x), id(y)))
        assert type(x) is type(y), where
        if isinstance(x, torch.Tensor):
            assert (x.layout, x.dtype, x.device, x.is_quantized, x.is_nested) == (
                y.layout, y.dtype, y.device, y.is_quantized, y.is_nested), where
            if x.is_quantized:
                assert x.qscheme() == y.qscheme() and torch.equal(x.int_repr(), y.int_repr()), where
                assert torch.equal(x.dequantize(), y.dequantize()), where
            elif x.is_nested:
                assert all(torch.equal(p, q) for p, q in zip(x.unbind(), y.unbind(), strict=True)), where
            elif x.device.type == "meta":
                assert x.shape == y.shape and x.stride() == y.stride(), where
            elif x.layout != torch.strided:
                assert torch.equal(x.to_dense(), y.to_dense()), where
            else:
                assert torch.equal(x, y), where
        elif isinstance(x, DictConfig):
            assert OmegaConf.to_container(x) == OmegaConf.to_container(y), where
        elif isinstance(x, dict):
            assert list(x) == list(y), where
            for k in x:
                walk(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (p, q) in enumerate(zip(x, y, strict=True)):
                walk(p, q, f"{where}[{i}]")
        else:
            assert x == y, where

    walk(a, b, path)


def cyclic_payload() -> dict[str, Any]:
    cfg = OmegaConf.create({"model": {"width": 64, "layers": [1, 2, 3]}, "optim": {"lr": 3e-4}})
    loop: dict[str, Any] = {"name": "loop"}
    loop["self"] = loop
    return {"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)},
            "hyper_parameters": {"cfg": cfg}, "loop": loop, "epoch": 4}


def test_reference_cycles_load_as_inert_data_and_are_written_back(tmp_path: Path, cli: Cli,
                                                                   key: tuple[Path, Path]) -> None:
    path = tmp_path / "lightning.ckpt"
    torch.save(cyclic_payload(), path)
    original = torch.load(path, weights_only=False)
    proc = cli("inspect", path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tensors"] == 2
    assert cli("stamp", path, "--sign", key[0], "--allow-unsafe-pickle").returncode == 0
    stamped = torch.load(path, weights_only=False)
    same(original, stamped)
    assert stamped["loop"]["self"] is stamped["loop"]
    assert stamped["hyper_parameters"]["cfg"].model._get_parent() is stamped["hyper_parameters"]["cfg"]
    assert integrity.verify(path, key[1]).ok
    with Checkpoint.open(path) as ckpt:  # a rewrite that computes a tensor: a full new file
        ckpt.transpose("w", 0, 1)
        ckpt.write(tmp_path / "out.ckpt", None)
    rewritten = torch.load(tmp_path / "out.ckpt", weights_only=False)
    original["state_dict"]["w"] = original["state_dict"]["w"].t().contiguous()
    same(original, rewritten)


def test_a_self_referencing_dict_reads_as_torch_weights_only_reads_it(tmp_path: Path, cli: Cli) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2), "meta": loop}, path)
    torch.load(path, weights_only=True)
    assert cli("stamp", path, "--digest").returncode == 0
    assert cli("verify", path).returncode == 0
    back = torch.load(path, weights_only=True)
    assert back["meta"]["self"] is back["meta"]
    before = integrity.compute(Checkpoint.open(path))["payload"]
    loop2: dict[str, Any] = {}
    loop2["self"] = {"self": loop2}  # another shape of cycle: another digest
    torch.save({"w": torch.ones(2), "meta": loop2}, tmp_path / "n.pt")
    assert integrity.compute(Checkpoint.open(tmp_path / "n.pt"))["payload"] != before


def exotic_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 2, torch.quint8),
        "qc": torch.quantize_per_channel(torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0,
                                         torch.qint8),
        "coo": torch.randn(3, 3).relu().to_sparse(),
        "csr": torch.randn(3, 4).relu().to_sparse_csr(),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)]),
        "meta": torch.empty(2, 3, device="meta"),
        "w": torch.arange(4.0),
    }


def test_quantized_sparse_nested_and_meta_tensors_are_tensors(tmp_path: Path, cli: Cli,
                                                              key: tuple[Path, Path]) -> None:
    path = tmp_path / "m.pt"
    sd = exotic_state_dict()
    torch.save(sd, path)
    original = torch.load(path, weights_only=True)
    info = json.loads(cli("inspect", path, "--json", "--keys").stdout)
    assert info["tensors"] == len(sd)
    assert {k: tuple(v["shape"]) for k, v in info["keys"].items() if k != "nested"} == {
        k: tuple(v.shape) for k, v in sd.items() if k != "nested"}
    assert info["keys"]["q"]["dtype"] == "quint8" and info["keys"]["meta"]["device"] == "meta"
    assert cli("stamp", path, "--sign", key[0]).returncode == 0  # all on torch's allow-list
    same(original, torch.load(path, weights_only=True))
    assert integrity.verify(path, key[1]).ok
    with Checkpoint.open(path) as ckpt:  # renames and drops carry them; a computed tensor beside them
        ckpt.rename("q", "quantized")
        ckpt.transpose("w", 0, 0)
        ckpt.write(tmp_path / "out.pt", None)
        materialized = dict(ckpt.materialize())
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    original["quantized"] = original.pop("q")
    same(dict(sorted(original.items())), dict(sorted(out.items())))
    same(dict(sorted(original.items())), dict(sorted(materialized.items())))


def test_a_changed_part_of_a_quantized_or_sparse_tensor_fails_verify(tmp_path: Path, key: tuple[Path, Path]) -> None:
    path = tmp_path / "m.pt"
    sd = exotic_state_dict()
    torch.save(sd, path)
    ckptmigrate.stamp(path, sign=key[0])
    pristine = path.read_bytes()
    for name in ("q", "coo"):
        sd2 = dict(sd)
        sd2[name] = (torch.quantize_per_tensor(torch.randn(4), 0.2, 2, torch.quint8) if name == "q"
                     else (sd["coo"] * 2).coalesce())
        twin = tmp_path / name / "m.pt"
        twin.parent.mkdir()
        torch.save(sd2, twin)
        path.write_bytes(pristine)
        with zipfile.ZipFile(twin) as z:  # the other file's pickle and tensor records, swapped in
            records = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()
                       if n.split("/", 1)[1] == "data.pkl" or n.split("/", 1)[1].startswith("data/")}
        with open(path, "r+b") as fh:
            torchzip.append_records(fh, records)
        result = integrity.verify(path, key[1])
        assert not result.ok and name in result.changed, (name, result.problems)


def test_load_state_dict_of_a_quantized_and_a_sparse_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.ao.nn.quantized as nnq

    monkeypatch.chdir(tmp_path)
    source = nnq.Linear(4, 3)
    source.set_weight_bias(torch.quantize_per_tensor(torch.randn(3, 4), 0.05, 0, torch.qint8), torch.randn(3))
    torch.save(source.state_dict(), tmp_path / "q.pt")
    target = nnq.Linear(4, 3)
    report = ckptmigrate.load_state_dict(target, tmp_path / "q.pt")
    assert report.ok
    assert torch.equal(target.weight().int_repr(), source.weight().int_repr())
    assert torch.equal(target.bias(), source.bias())

    class WithSparse(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("adjacency", torch.zeros(3, 3).to_sparse())
            self.lin = torch.nn.Linear(2, 2)

    model = WithSparse()
    model.adjacency = torch.eye(3).to_sparse()
    torch.save(model.state_dict(), tmp_path / "s.pt")
    fresh = WithSparse()
    assert ckptmigrate.load_state_dict(fresh, tmp_path / "s.pt").ok
    assert torch.equal(fresh.adjacency.to_dense(), torch.eye(3))
    assert torch.equal(fresh.lin.weight, model.lin.weight)


def test_torchscript_and_export_archives_are_named_not_misread(tmp_path: Path, cli: Cli) -> None:
    model = torch.nn.Linear(2, 2)
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    torch.export.save(torch.export.export(model, (torch.randn(1, 2),)), tmp_path / "exported.pt2")
    for name, what in (("scripted.pt", "TorchScript archive (torch.jit.save)"),
                       ("exported.pt2", "torch.export archive")):
        for command in ("inspect", "current", "stamp"):
            proc = cli(command, tmp_path / name)
            assert proc.returncode == 2, (name, command, proc.stderr)
            assert what in proc.stderr and "not a checkpoint" in proc.stderr, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1 and "compressed" not in proc.stderr


DTENSOR = """
import sys, tempfile, torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + tempfile.mktemp())
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
if sys.argv[1] == "save":
    mesh = init_device_mesh("cpu", (1,))
    torch.save({"w": distribute_tensor(torch.arange(6.0).reshape(2, 3), mesh, [Shard(0)]), "b": torch.ones(2)},
               sys.argv[2])
else:
    got = torch.load(sys.argv[2], weights_only=False)
    assert isinstance(got["w"], DTensor) and got["w"].placements == (Shard(0),)
    assert torch.equal(got["w"].to_local(), torch.arange(6.0).reshape(2, 3)) and torch.equal(got["b"], torch.ones(2))
dist.destroy_process_group()
"""


def test_a_dtensor_saved_by_one_cpu_process_is_a_tensor_carried_and_signed(tmp_path: Path, cli: Cli,
                                                                           key: tuple[Path, Path]) -> None:
    import sys

    path = tmp_path / "fsdp2.pt"
    subprocess.run([sys.executable, "-c", DTENSOR, "save", str(path)], check=True, timeout=300)
    info = json.loads(cli("inspect", path, "--json", "--keys").stdout)
    assert info["tensors"] == 2 and info["keys"]["w"]["shape"] == [2, 3] and info["keys"]["w"]["dtype"] == "float32"
    assert cli("stamp", path, "--sign", key[0], "--allow-unsafe-pickle").returncode == 0
    assert integrity.verify(path, key[1]).ok
    subprocess.run([sys.executable, "-c", DTENSOR, "load", str(path)], check=True, timeout=300)
    with Checkpoint.open(path) as ckpt:  # a rename carries it; a full rewrite writes it back
        ckpt.rename("w", "weight")
        ckpt.transpose("b", 0, 0)
        ckpt.write(tmp_path / "out.pt", None)
    with Checkpoint.open(tmp_path / "out.pt") as ckpt:
        assert set(ckpt.tensors()) == {"weight", "b"} and ckpt.schema()["weight"]["shape"] == [2, 3]
        with pytest.raises(BadInput, match="DTensor is not one of torch's allow-listed globals"):
            ckpt.materialize()  # rebuilding it would run torch.distributed's classes: not without the user


CYCLES_EVERYWHERE = """
import sys
from ckptmigrate.checkpoint.lazy import Checkpoint
with Checkpoint.open(sys.argv[1]) as ckpt:
    assert ckpt.config["name"] == "run", ckpt.config
    sd = ckpt.materialize()
    assert sd["loop"][0] is not None and float(sd["w"].sum()) == 2.0
print("ok")
"""


def test_cycles_with_a_wide_fan_out_cost_one_visit_per_edge(tmp_path: Path) -> None:
    """A dict whose ten values are itself, in the hyper-parameters and in the state dict: every
    walker (config lookup, materialize, digest) stops where a cycle closes instead of expanding 10**20 paths."""
    import sys

    fan: dict[str, Any] = {}
    for i in range(10):
        fan[str(i)] = fan
    loop: list[Any] = []
    loop.append(loop)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "loop": loop}, "hyper_parameters": {"name": "run", "fan": fan}},
               path)
    proc = subprocess.run([sys.executable, "-c", CYCLES_EVERYWHERE, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert integrity.compute(Checkpoint.open(path))["payload"]
