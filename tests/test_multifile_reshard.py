"""User story: "we split the fused attention weights of a sharded Hugging Face model, and re-plan its
shards on the way — the new tensors stay where their source was, and no shard passes the size we ask."

The models are written by huggingface_hub's ``save_torch_state_dict`` (what transformers uses) and
read back shard by shard with ``safetensors``, as transformers' loader does; ckptmigrate runs as a
real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

huggingface_hub = pytest.importorskip("huggingface_hub")

INDEX = "model.safetensors.index.json"


def model() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {name: torch.randn(32, 48, generator=gen) for name in ("embed.weight", "attn.qkv.weight",
                                                                  "mlp.fc.weight", "head.weight")}


def save_hf(directory: Path, sd: dict[str, torch.Tensor], max_shard_size: int) -> Path:
    directory.mkdir()
    huggingface_hub.save_torch_state_dict(sd, directory, max_shard_size=max_shard_size)
    return directory


def index(directory: Path) -> dict[str, Any]:
    return json.loads((directory / INDEX).read_text())


def loaded(directory: Path) -> dict[str, torch.Tensor]:
    """Every shard the index names, read with safetensors; the index and the shards must agree."""
    weight_map = index(directory)["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = load_file(directory / shard)
        assert not set(part) & set(out)
        out.update(part)
    assert set(out) == set(weight_map)
    return out


def chain(tmp_path: Path, body: str) -> Path:
    root = tmp_path / "mig"
    (root / "versions").mkdir(parents=True)
    (root / "versions" / "0001_first.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n' + textwrap.indent(body, "    ") + "\n")
    return root


def test_split_parts_stay_in_the_shard_of_the_tensor_they_come_from(tmp_path: Path, cli: Any) -> None:
    sd = model()
    one_each = sd["embed.weight"].nbytes + 100  # every tensor a shard of its own
    hf = save_hf(tmp_path / "hf", sd, one_each)
    before = index(hf)["weight_map"]
    assert len(set(before.values())) == 4
    # split along the columns: the parts are computed, not views of the stored bytes
    mig = chain(tmp_path, 'ckpt.split("attn.qkv.weight", ["attn.q.weight", "attn.k.weight", "attn.v.weight"], dim=1)')

    cli("upgrade", hf, "--migrations", mig, "--from", "base", "--no-backup", check=True)

    after = index(hf)["weight_map"]
    parts = ["attn.q.weight", "attn.k.weight", "attn.v.weight"]
    shard = after[parts[0]]
    assert {after[p] for p in parts} == {shard}
    # alone in their shard, as their source was; not with the key before them
    assert [k for k, s in after.items() if s == shard] == parts
    assert len(set(after.values())) == 4
    got = loaded(hf)
    for part, want in zip(parts, sd["attn.qkv.weight"].split(16, dim=1), strict=True):
        assert torch.equal(got[part], want)
    for key in ("embed.weight", "mlp.fc.weight", "head.weight"):
        assert torch.equal(got[key], sd[key])
    assert {p.name for p in hf.iterdir()} == {INDEX, *after.values()}


def test_upgrade_re_plans_the_shards_to_max_shard_size(tmp_path: Path, cli: Any) -> None:
    sd = model()
    tensor = sd["embed.weight"].nbytes
    hf = save_hf(tmp_path / "hf", sd, tensor + 100)
    mig = chain(tmp_path, 'ckpt.rename_regex(r"(.*)\\.weight", r"\\1.w")')

    out = cli("upgrade", hf, "--migrations", mig, "--from", "base", "--no-backup",
              "--max-shard-size", f"{2 * tensor + 100}B")

    assert out.returncode == 0, out.stderr
    weight_map = index(hf)["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) == 2
    for shard in shards:
        data = sum(t.nbytes for t in load_file(hf / shard).values())
        assert data <= 2 * tensor + 100
    got = loaded(hf)
    assert set(got) == {k.removesuffix(".weight") + ".w" for k in sd}
    for key, want in sd.items():
        assert torch.equal(got[key.removesuffix(".weight") + ".w"], want)
    assert index(hf)["metadata"]["total_size"] == 4 * tensor
    assert {p.name for p in hf.iterdir()} == {INDEX, *shards}  # the old four shards are gone
    assert cli("current", hf, check=True).stdout.strip() == "0001"


def test_max_shard_size_is_refused_for_a_checkpoint_without_shards(tmp_path: Path, cli: Any) -> None:
    directory = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(model(), checkpoint_id=directory)
    snapshot = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}
    mig = chain(tmp_path, 'ckpt.rename("head.weight", "lm_head.weight")')

    out = cli("upgrade", directory, "--migrations", mig, "--from", "base", "--max-shard-size", "5GB")

    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert str(directory) in lines[0] and "--max-shard-size" in lines[0]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()} == snapshot
