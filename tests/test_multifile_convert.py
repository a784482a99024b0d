"""User story: "consolidate my 2-rank DCP checkpoint into one safetensors file, reshard a model for the
Hub, or turn it back into a DCP directory — without loading it all into memory."

``ckptmigrate convert SRC DST --to torch|safetensors|hf-sharded|dcp`` copies tensor bytes (the kernel
copies every contiguous run; a tensor sharded across ranks is assembled one at a time) and carries
the envelope with a ``convert`` history entry. Every result is read back by the real reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from ckptmigrate import formats
from tests.dcp_writers import two_rank_tensors, write_dcp_two_ranks

huggingface_hub = pytest.importorskip("huggingface_hub")

def two_ranks(directory: Path, tmp_path: Path, dim: int = 0) -> dict[str, torch.Tensor]:
    write_dcp_two_ranks(directory, tmp_path, dim)
    return two_rank_tensors()


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    sd = {f"layers.{i}.weight": torch.randn(64, 80, generator=gen) for i in range(5)}
    sd["embed.weight"] = torch.randn(100, 64, generator=gen).to(torch.float16)
    return sd


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), k


def hf_read(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads(next(directory.glob("*.index.json")).read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in set(index["weight_map"].values()):
        out.update(load_file(directory / shard))
    return out


def dcp_read(directory: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    got = {k: torch.zeros_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(got, checkpoint_id=directory)
    return got


def test_two_rank_dcp_to_one_safetensors_file(tmp_path: Path, cli: Any) -> None:
    src = tmp_path / "step-41"
    want = two_ranks(src, tmp_path)
    cli("stamp", src, "--tag", "run=7", check=True)
    refused = cli("convert", src, tmp_path / "model.safetensors", "--to", "safetensors")
    assert refused.returncode == 2 and "--state-dict-only" in refused.stderr
    assert not (tmp_path / "model.safetensors").exists()

    cli("convert", src, tmp_path / "model.safetensors", "--to", "safetensors", "--state-dict-only", check=True)
    same(load_file(tmp_path / "model.safetensors"), want)
    env = formats.read_envelope(tmp_path / "model.safetensors")[1]
    assert env is not None and env["tags"] == {"run": "7"}
    assert env["history"][-1]["action"] == "convert" and env["history"][-1]["from_container"] == "dcp"

    cli("convert", src, tmp_path / "full.pt", "--to", "torch", check=True)
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert full["step"] == 41
    same(full["model"], want)


def test_a_tensor_sharded_along_columns_is_assembled(tmp_path: Path, cli: Any) -> None:
    """Chunks that are not blocks of whole rows are not one byte run: the tensor is assembled."""
    src = tmp_path / "step-41"
    want = two_ranks(src, tmp_path, dim=1)
    chunks = formats.read(src).parts.metadata.state["state_dict_metadata"]["model.enc.weight"].state["chunks"]
    assert [c.state["offsets"].args[0] for c in chunks] == [(0, 0), (0, 3)]  # split along dim 1
    cli("convert", src, tmp_path / "model.safetensors", "--to", "safetensors", "--state-dict-only", check=True)
    same(load_file(tmp_path / "model.safetensors"), want)
    cli("convert", src, tmp_path / "full.pt", "--to", "torch", check=True)
    same(torch.load(tmp_path / "full.pt", weights_only=True)["model"], want)


def test_single_file_to_hf_shards_and_back(tmp_path: Path, cli: Any) -> None:
    sd = state()
    save_file(sd, tmp_path / "model.safetensors")
    limit = 30_000
    cli("convert", tmp_path / "model.safetensors", tmp_path / "hub", "--to", "hf-sharded",
        "--max-shard-size", f"{limit}B", check=True)
    shards = sorted((tmp_path / "hub").glob("model-*.safetensors"))
    assert len(shards) > 2
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        part = load_file(shard)
        assert len(part) == 1 or sum(v.numel() * v.element_size() for v in part.values()) <= limit
    same(hf_read(tmp_path / "hub"), sd)
    index = json.loads((tmp_path / "hub" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())

    cli("convert", tmp_path / "hub", tmp_path / "back.pt", "--to", "torch", check=True)
    same(torch.load(tmp_path / "back.pt", weights_only=True), sd)


def test_hf_shards_to_dcp_and_back(tmp_path: Path, cli: Any) -> None:
    sd = state()
    (tmp_path / "hf").mkdir()
    huggingface_hub.save_torch_state_dict(sd, tmp_path / "hf", max_shard_size=25_000)
    cli("convert", tmp_path / "hf", tmp_path / "dcp", "--to", "dcp", check=True)
    same(dcp_read(tmp_path / "dcp", sd), sd)
    cli("convert", tmp_path / "dcp", tmp_path / "again", "--to", "hf-sharded", check=True)
    same(hf_read(tmp_path / "again"), sd)


def test_convert_to_dcp_copies_the_tensor_bytes_without_torch(tmp_path: Path) -> None:
    """Each tensor becomes the ``torch.save`` archive DCP stores, written around its bytes, which the
    kernel copies: torch is never imported (no tensor went through ``torch.save``), and ``dcp.load``
    reads every tensor back, tied weights and a view into a shared storage included."""
    sd = state()
    (tmp_path / "hf").mkdir()
    huggingface_hub.save_torch_state_dict(sd, tmp_path / "hf", max_shard_size=25_000)
    base = torch.arange(40, dtype=torch.float32)
    tied = {"emb.weight": base, "head.weight": base, "tail": base[8:], "scale": torch.ones(3, dtype=torch.bfloat16)}
    torch.save(tied, tmp_path / "tied.pt")
    convert = ("import sys; from ckptmigrate import api\n"
               "for src, dst in zip(sys.argv[1::2], sys.argv[2::2]): api.convert(src, dst, to='dcp')\n"
               "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    done = subprocess.run([sys.executable, "-c", convert, str(tmp_path / "hf"), str(tmp_path / "dcp"),
                           str(tmp_path / "tied.pt"), str(tmp_path / "tied-dcp")],
                          capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "no torch"
    same(dcp_read(tmp_path / "dcp", sd), sd)
    same(dcp_read(tmp_path / "tied-dcp", tied), {k: v.clone() for k, v in tied.items()})


def test_convert_refuses_its_own_source_and_an_existing_dcp(tmp_path: Path, cli: Any) -> None:
    sd = state()
    save_file(sd, tmp_path / "m.safetensors")
    out = cli("convert", tmp_path / "m.safetensors", tmp_path / "m.safetensors", "--to", "torch")
    assert out.returncode == 2 and "onto itself" in out.stderr
    cli("convert", tmp_path / "m.safetensors", tmp_path / "d", "--to", "dcp", check=True)
    out = cli("convert", tmp_path / "m.safetensors", tmp_path / "d", "--to", "dcp")
    assert out.returncode == 2 and "already holds a DCP checkpoint" in out.stderr
    out = cli("convert", tmp_path / "m.safetensors", tmp_path / "h", "--to", "hf-sharded", "--max-shard-size", "lots")
    assert out.returncode == 2 and "not a size" in out.stderr
