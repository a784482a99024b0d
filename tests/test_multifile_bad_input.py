"""User story: "a shard went missing, or the index lies — ckptmigrate says which file, and writes nothing."

Each broken multi-file checkpoint starts as a real one (huggingface_hub's ``save_torch_state_dict``,
``torch.distributed.checkpoint.save``) with one thing broken. Every command that reads or writes it
must exit 2 with one line naming the file and the problem, no traceback, and leave every file of the
directory as it was.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

huggingface_hub = pytest.importorskip("huggingface_hub")

INDEX = "model.safetensors.index.json"


def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {f"layers.{i}.weight": torch.randn(40, 40, generator=gen) for i in range(4)}


def hf(tmp_path: Path) -> Path:
    directory = tmp_path / "hf"
    directory.mkdir()
    huggingface_hub.save_torch_state_dict(state(), directory, max_shard_size=14_000)
    assert len(list(directory.glob("*.safetensors"))) > 1
    return directory


def dcp_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state(), checkpoint_id=directory)
    return directory


def edit_index(directory: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    path = directory / INDEX
    index = json.loads(path.read_text())
    fn(index)
    path.write_text(json.dumps(index))


def missing_shard(tmp_path: Path) -> tuple[Path, str]:
    d = hf(tmp_path)
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.unlink()
    return d, f"names shard {victim.name}, which is missing"


def index_names_absent_file(tmp_path: Path) -> tuple[Path, str]:
    d = hf(tmp_path)
    edit_index(d, lambda ix: ix["weight_map"].update({"layers.0.weight": "model-00009-of-00009.safetensors"}))
    return d, "names shard model-00009-of-00009.safetensors, which is missing"


def index_names_a_tensor_twice(tmp_path: Path) -> tuple[Path, str]:
    d = hf(tmp_path)
    text = (d / INDEX).read_text()
    first = json.loads(text)["weight_map"]["layers.0.weight"]
    dup = f'"layers.0.weight": "{first}",'
    (d / INDEX).write_text(text.replace(dup, dup + " " + dup, 1))
    return d, "names 'layers.0.weight' twice"


def two_shards_claim_a_key(tmp_path: Path) -> tuple[Path, str]:
    d = hf(tmp_path)
    from safetensors.torch import load_file, save_file

    shards = sorted(d.glob("model-*.safetensors"))
    extra = load_file(shards[0])
    key = next(iter(extra))
    last = load_file(shards[-1])
    last[key] = extra[key]
    save_file(last, shards[-1], metadata={"format": "pt"})
    return d, f"tensor {key!r} is in two shards"


def shard_not_holding_its_key(tmp_path: Path) -> tuple[Path, str]:
    d = hf(tmp_path)
    shards = sorted(d.glob("model-*.safetensors"))
    wm = json.loads((d / INDEX).read_text())["weight_map"]
    key = next(k for k, v in wm.items() if v == shards[0].name)
    edit_index(d, lambda ix: ix["weight_map"].update({key: shards[-1].name}))
    return d, f"maps {key!r} to {shards[-1].name}, but it is in {shards[0].name}"


def metadata_not_dcp(tmp_path: Path) -> tuple[Path, str]:
    d = dcp_dir(tmp_path)
    (d / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    return d, "not a torch.distributed.checkpoint .metadata"


def metadata_names_absent_distcp(tmp_path: Path) -> tuple[Path, str]:
    d = dcp_dir(tmp_path)
    (d / "__0_0.distcp").rename(d / "elsewhere")
    return d, "names __0_0.distcp, which is missing"


def mixed_formats(tmp_path: Path) -> tuple[Path, str]:
    d = hf(tmp_path)
    other = dcp_dir(tmp_path)
    for p in other.iterdir():
        p.rename(d / p.name)
    return d, "mixes checkpoints (.metadata, model.safetensors.index.json)"


def truncated_distcp(tmp_path: Path) -> tuple[Path, str]:
    d = dcp_dir(tmp_path)
    f = d / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d, "lies outside __0_0.distcp"


CASES = [missing_shard, index_names_absent_file, index_names_a_tensor_twice, two_shards_claim_a_key,
         shard_not_holding_its_key, metadata_not_dcp, metadata_names_absent_distcp, mixed_formats, truncated_distcp]


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_broken_multifile_checkpoint_is_one_line_exit_2_nothing_written(
    tmp_path: Path, cli: Any, case: Callable[[Path], tuple[Path, str]],
) -> None:
    directory, problem = case(tmp_path)
    mig = tmp_path / "mig" / "versions"
    mig.mkdir(parents=True)
    (mig / "0001_a.py").write_text('revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
                                   '    ckpt.rename("layers.0.weight", "first.weight")\n')
    before = snapshot(directory)
    around = sorted(p.name for p in tmp_path.iterdir())
    for args in (["inspect", directory], ["stamp", directory],
                 ["upgrade", directory, "--migrations", tmp_path / "mig", "--from", "base"],
                 ["convert", directory, tmp_path / "out.safetensors", "--to", "safetensors"]):
        out = cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert problem in lines[0], lines[0]
        assert str(directory) in lines[0]
        assert snapshot(directory) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == around  # no output, lock or temporary file
