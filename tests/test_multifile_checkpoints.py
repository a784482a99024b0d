"""User story: "my model is a sharded Hugging Face directory, or a torch.distributed.checkpoint
directory from 2 ranks — ckptmigrate reads, stamps, migrates, verifies and loads it as one checkpoint."

Fixtures are written by the real writers: huggingface_hub's ``save_torch_state_dict`` (what
transformers uses; safetensors and ``.bin`` shards) and ``torch.distributed.checkpoint.save`` (one
process without a process group, and two ranks over gloo with a tensor sharded as a DTensor). What
ckptmigrate writes is read back by the real readers: ``safetensors``, ``torch.load`` and ``dcp.load``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import ckptmigrate
from ckptmigrate import formats
from tests.dcp_writers import write_dcp_two_ranks

huggingface_hub = pytest.importorskip("huggingface_hub")


@pytest.fixture(autouse=True)
def outside_the_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load`` without ``migrations=`` reads no chain (the repo's pyproject names the example's)."""
    monkeypatch.chdir(tmp_path)


def model_state(prefix: str = "") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    sd = {f"{prefix}layers.{i}.weight": torch.randn(32, 48, generator=gen) for i in range(6)}
    sd[f"{prefix}layers.0.bias"] = torch.randn(32, generator=gen).to(torch.bfloat16)
    sd[f"{prefix}head.weight"] = torch.randn(10, 32, generator=gen)
    return sd


def write_hf(directory: Path, sd: dict[str, torch.Tensor], *, safe: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    huggingface_hub.save_torch_state_dict(sd, directory, max_shard_size=16_000, safe_serialization=safe)
    return directory


def write_dcp(directory: Path, sd: dict[str, Any]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group, assuming a single process"
        dcp.save(sd, checkpoint_id=directory)
    return directory


def hashes(directory: Path) -> dict[str, tuple[int, int, str]]:
    """(inode, mtime_ns, sha256) of every file: what a metadata-only write must leave as it was."""
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file():
            st = p.stat()
            out[p.name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """What transformers' loader does: every shard the index names, read with safetensors or torch."""
    index_path = next(directory.glob("*.index.json"))
    index = json.loads(index_path.read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(directory / shard) if shard.endswith(".safetensors") else \
            torch.load(directory / shard, weights_only=True)
        assert not set(part) & set(out)
        out.update(part)
    assert set(out) == set(index["weight_map"])
    return out


def dcp_load(directory: Path, template: dict[str, Any]) -> dict[str, Any]:
    state = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else
                 dcp_template(v) if isinstance(v, dict) else 0) for k, v in template.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=directory)
    return state


def dcp_template(d: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) for k, v in d.items()}


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), k


def migrations(tmp_path: Path, body: str) -> Path:
    root = tmp_path / "mig"
    (root / "versions").mkdir(parents=True)
    (root / "versions" / "0001_first.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n' + textwrap.indent(body, "    ") + "\n")
    return root


# --- reading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_hf_sharded_directory_is_one_checkpoint(tmp_path: Path, cli: Any, safe: bool) -> None:
    sd = model_state()
    directory = write_hf(tmp_path / "hf", sd, safe=safe)
    index = next(directory.glob("*.index.json"))
    assert len(json.loads(index.read_text())["weight_map"]) == len(sd)
    shards = sorted(p.name for p in directory.iterdir() if p.name != index.name)
    assert len(shards) > 1

    for name in (directory, index):
        info = json.loads(cli("inspect", name, "--keys", "--json", check=True).stdout)
        assert info["container"] == "hf-sharded"
        assert info["path"] == str(index)
        assert info["tensors"] == len(sd)
        assert info["files"] == shards
        assert {k: v["shape"] for k, v in info["keys"].items()} == {k: list(v.shape) for k, v in sd.items()}
        assert info["keys"]["layers.0.bias"]["dtype"] == "bfloat16"

    ckpt = ckptmigrate.load(directory, migrations=None)
    same(ckpt.materialize(), sd)


def test_dcp_single_process_directory(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    directory = write_dcp(tmp_path / "dcp", {"model": sd, "epoch": 3})
    info = json.loads(cli("inspect", directory, "--keys", "--json", check=True).stdout)
    assert info["container"] == "dcp"
    assert info["layout"] == "key:model"
    assert info["extras"] == ["epoch"]
    assert set(info["keys"]) == set(sd)
    assert cli("inspect", directory / ".metadata", "--json", check=True).stdout == cli(
        "inspect", directory, "--json", check=True).stdout

    ckpt = ckptmigrate.load(directory, migrations=None)
    same(ckpt.materialize(), sd)
    assert ckpt.extras == {"epoch": 3}


def test_dcp_from_two_ranks_with_a_sharded_tensor(tmp_path: Path, cli: Any) -> None:
    directory = write_dcp_two_ranks(tmp_path / "dcp2", tmp_path)
    assert sorted(p.name for p in directory.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    info = json.loads(cli("inspect", directory, "--keys", "--json", check=True).stdout)
    assert info["keys"]["enc.weight"]["shape"] == [8, 6]
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(8, 6, generator=gen)
    ckpt = ckptmigrate.load(directory, migrations=None)
    got = ckpt.materialize()
    assert torch.equal(got["enc.weight"], full)
    assert torch.equal(got["enc.bias"], torch.arange(6, dtype=torch.float32))
    assert ckpt.extras == {"step": 41}


def test_load_state_dict_from_a_directory(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    write_hf(tmp_path / "hf", {k: v.clone() for k, v in model.state_dict().items()})
    write_dcp(tmp_path / "dcp", {k: v.clone() for k, v in model.state_dict().items()})
    for directory in (tmp_path / "hf", tmp_path / "dcp"):
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        report = ckptmigrate.load_state_dict(fresh, directory, migrations=None)
        assert not report.missing and not report.unexpected
        same(fresh.state_dict(), model.state_dict())


# --- stamping: only the index / the envelope file --------------------------------------------------


def test_stamp_hf_writes_only_the_index(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    directory = write_hf(tmp_path / "hf", sd)
    before = hashes(directory)
    cli("stamp", directory, "--tag", "run=42", check=True)
    after = hashes(directory)
    index = "model.safetensors.index.json"
    assert {k: v for k, v in after.items() if k != index} == {k: v for k, v in before.items() if k != index}
    assert json.loads((directory / index).read_text())["metadata"]["ckptmigrate"]["tags"] == {"run": "42"}
    assert cli("current", directory, check=True).stdout.strip() == "stamped, no revision"
    same(hf_tensors(directory), sd)


def test_stamp_dcp_adds_one_file_dcp_load_ignores(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    directory = write_dcp(tmp_path / "dcp", dict(sd))
    before = hashes(directory)
    cli("stamp", directory, "--tag", "run=42", check=True)
    after = hashes(directory)
    added = set(after) - set(before)
    assert {k: after[k] for k in before} == before
    assert len(added) == 1 and added.pop().startswith(".ckptmigrate-")
    env = formats.read_envelope(directory)[1]
    assert env is not None and env["tags"] == {"run": "42"}
    same(dcp_load(directory, sd), sd)


# --- migrating as one ----------------------------------------------------------------------------------


def test_rename_upgrade_of_hf_shards_lands_as_one(tmp_path: Path, cli: Any) -> None:
    sd = model_state("module.")
    directory = write_hf(tmp_path / "hf", sd)
    mig = migrations(tmp_path, 'ckpt.unwrap()\nckpt.rename_regex(r"layers\\.(\\d+)\\.(.*)", r"blocks.\\1.\\2")')
    old_files = set(hashes(directory))
    out = cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup")
    assert out.returncode == 0, out.stderr
    assert "1 written" not in out.stdout or "failed" not in out.stdout
    want = {k.removeprefix("module.").replace("layers.", "blocks."): v for k, v in sd.items()}
    same(hf_tensors(directory), want)
    files = set(hashes(directory))
    assert files == old_files  # transformers' names again, the old shards gone, no leftover
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert index["metadata"]["ckptmigrate"]["revision"] == "0001"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())

    back = cli("downgrade", directory, "--migrations", mig, "--to", "base", "--no-backup")
    assert back.returncode == 0, back.stderr
    same(hf_tensors(directory), sd)


def test_upgrade_with_backup_keeps_the_old_index_and_shards(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    directory = write_hf(tmp_path / "hf", sd)
    mig = migrations(tmp_path, 'ckpt.rename("head.weight", "classifier.weight")')
    cli("upgrade", directory, "--migrations", mig, "--from", "base", check=True)
    backup = directory / "model.safetensors.index.json.bak"
    assert backup.exists()
    old = ckptmigrate.load(backup, migrations=None)
    same(old.materialize(), sd)
    new = hf_tensors(directory)
    assert "classifier.weight" in new and "head.weight" not in new


def test_directory_of_checkpoints_upgrades_each_sharded_model_once(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    write_hf(tmp_path / "runs" / "a", sd)
    write_dcp(tmp_path / "runs" / "b", dict(sd))
    mig = migrations(tmp_path, 'ckpt.rename("head.weight", "classifier.weight")')
    out = cli("upgrade", tmp_path / "runs", "--migrations", mig, "--from", "base", "--no-backup", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    rows = results if isinstance(results, list) else results["files"]
    assert sorted(Path(r["path"]).name for r in rows) == ["b", "model.safetensors.index.json"]
    assert all(r["written"] for r in rows)


@pytest.mark.parametrize("ranks", [1, 2])
def test_dcp_rename_rewrites_only_metadata(tmp_path: Path, cli: Any, ranks: int) -> None:
    if ranks == 1:
        directory = write_dcp(tmp_path / "dcp", {"model": model_state(), "step": 41})
        old_key, new_key = "model.head.weight", "model.classifier.weight"
    else:
        directory = write_dcp_two_ranks(tmp_path / "dcp", tmp_path)
        old_key, new_key = "model.enc.weight", "model.encoder.weight"
    before = ckptmigrate.load(directory, migrations=None)
    want = dict(before.materialize())
    want[new_key.split(".", 1)[1]] = want.pop(old_key.split(".", 1)[1])
    data_before = {k: v for k, v in hashes(directory).items() if k.endswith(".distcp")}
    mig = migrations(tmp_path, f'ckpt.rename("{old_key.split(".", 1)[1]}", "{new_key.split(".", 1)[1]}")')

    cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup", check=True)

    assert {k: v for k, v in hashes(directory).items() if k.endswith(".distcp")} == data_before
    template = {"model": {k: torch.zeros_like(v) for k, v in want.items()}, "step": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(template, checkpoint_id=directory)
    same(template["model"], want)
    assert template["step"] == 41
    assert formats.read_envelope(directory)[1]["revision"] == "0001"  # type: ignore[index]
    assert not [p for p in os.listdir(directory) if "journal" in p or "tmp" in p]


def test_dcp_tensor_change_writes_one_new_file_and_keeps_the_rest(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    directory = write_dcp(tmp_path / "dcp", dict(sd))
    data_before = {k: v for k, v in hashes(directory).items() if k.endswith(".distcp")}
    mig = migrations(tmp_path, 'ckpt.transpose("head.weight", 0, 1)\nckpt.rename("layers.1.weight", "l1.weight")')
    cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup", check=True)
    after = {k: v for k, v in hashes(directory).items() if k.endswith(".distcp")}
    assert {k: after[k] for k in data_before} == data_before
    assert len(after) == len(data_before) + 1
    want = dict(sd)
    want["head.weight"] = sd["head.weight"].t().contiguous()
    want["l1.weight"] = want.pop("layers.1.weight")
    same(dcp_load(directory, want), want)


def test_verify_digests_every_shard(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    hf = write_hf(tmp_path / "hf", sd)
    dc = write_dcp(tmp_path / "dcp", dict(sd))
    for directory in (hf, dc):
        cli("stamp", directory, "--digest", check=True)
        assert cli("verify", directory).returncode == 0
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    victim = "layers.3.weight"
    shard = hf / index["weight_map"][victim]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8 : 8 + n])[victim]["data_offsets"][0]
    raw[8 + n + begin + 5] ^= 0x40
    shard.write_bytes(raw)
    out = cli("verify", hf)
    assert out.returncode == 1
    assert f"changed: {victim}" in out.stderr + out.stdout
    assert f"shards changed: {shard.name}\n" in out.stderr + out.stdout


def test_verify_a_dcp_tensor_sharded_across_ranks(tmp_path: Path, cli: Any) -> None:
    directory = write_dcp_two_ranks(tmp_path / "dcp2", tmp_path)
    cli("stamp", directory, "--digest", check=True)
    assert cli("verify", directory).returncode == 0
    rank1 = directory / "__1_0.distcp"
    raw = bytearray(rank1.read_bytes())
    ckpt = ckptmigrate.load(directory, migrations=None)
    part = ckpt.state_dict.entries["enc.weight"].chunks[1][1]
    raw[part.storage.offset + 1] ^= 0x01
    ckpt.close()
    rank1.write_bytes(raw)
    out = cli("verify", directory)
    assert out.returncode == 1
    assert "changed: enc.weight" in out.stderr and "shards changed: __1_0.distcp\n" in out.stderr


def test_upgrade_out_of_place_writes_a_new_directory_and_leaves_the_source(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    hf = write_hf(tmp_path / "hf", sd)
    dc = write_dcp(tmp_path / "dcp", dict(sd))
    mig = migrations(tmp_path, 'ckpt.rename("head.weight", "classifier.weight")')
    want = dict(sd)
    want["classifier.weight"] = want.pop("head.weight")
    for src, read in ((hf, hf_tensors), (dc, lambda d: dcp_load(d, want))):
        before = hashes(src)
        out = tmp_path / f"{src.name}-new"
        cli("upgrade", src, "--migrations", mig, "--from", "base", "-o", out, check=True)
        assert hashes(src) == before
        same(read(out), want)
        assert formats.read_envelope(out)[1]["revision"] == "0001"  # type: ignore[index]


def test_diff_and_check_see_a_directory_as_one_checkpoint(tmp_path: Path, cli: Any) -> None:
    from ckptmigrate.example import current_model

    model = current_model()
    write_hf(tmp_path / "hf", {k: v.clone() for k, v in model.state_dict().items()})
    write_dcp(tmp_path / "dcp", {k: v.clone() for k, v in model.state_dict().items()})
    root = Path(__file__).resolve().parent.parent
    for directory in (tmp_path / "hf", tmp_path / "dcp"):
        out = cli("diff", directory, cwd=root)
        assert out.returncode == 0 and "same schema" in out.stdout, out.stderr
    shrunk = {k: v.clone() for k, v in model.state_dict().items()}
    dropped = sorted(shrunk)[0]
    del shrunk[dropped]
    write_hf(tmp_path / "hf-short", shrunk)
    out = cli("diff", tmp_path / "hf-short", "--json", cwd=root)
    assert dropped in out.stdout


# --- sharded safetensors: headers rewritten in place --------------------------------------------------


def data_sections(directory: Path) -> dict[str, tuple[int, str]]:
    """(inode, sha256 of the bytes after the header) of every shard."""
    out = {}
    for p in sorted(directory.glob("model-*.safetensors")):
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        out[p.name] = (p.stat().st_ino, hashlib.sha256(raw[8 + n:]).hexdigest())
    return out


def test_rename_in_place_rewrites_only_shard_headers(tmp_path: Path, cli: Any) -> None:
    sd = model_state("module.")
    directory = write_hf(tmp_path / "hf", sd)
    before = data_sections(directory)
    mig = migrations(tmp_path, "ckpt.unwrap()")
    cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup", check=True)
    assert data_sections(directory) == before  # same files, same data bytes: only headers changed
    same(hf_tensors(directory), {k.removeprefix("module."): v for k, v in sd.items()})
    assert sorted(os.listdir(directory)) == sorted([*before, "model.safetensors.index.json"])


def test_a_header_that_does_not_fit_is_rewritten_with_slack_then_fits(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    directory = write_hf(tmp_path / "hf", sd)
    before = data_sections(directory)
    long = "encoder.stack_of_transformer_layers_with_a_much_longer_name."
    mig = migrations(tmp_path, f'ckpt.rename_prefix("layers.", "{long}")')
    cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup", check=True)
    after = data_sections(directory)
    assert sorted(after) == sorted(before)  # transformers' names again
    assert all(after[n][0] != before[n][0] for n in after)  # new files: the headers did not fit
    want = {k.replace("layers.", long): v for k, v in sd.items()}
    same(hf_tensors(directory), want)
    for shard in after:  # written with room to grow, data on a page boundary
        (n,) = struct.unpack("<Q", (directory / shard).read_bytes()[:8])
        assert (8 + n) % 4096 == 0
    (mig / "versions" / "0002_more.py").write_text(
        'revision = "0002"\ndown_revision = "0001"\n\n\ndef upgrade(ckpt):\n'
        f'    ckpt.rename_prefix("{long}", "{long}even_longer_than_before.")\n')
    cli("upgrade", directory, "--migrations", mig, "--no-backup", check=True)
    assert data_sections(directory) == after  # the slack took it: in place
    same(hf_tensors(directory), {k.replace(long, f"{long}even_longer_than_before."): v for k, v in want.items()})


def test_a_swap_of_names_is_not_written_in_place(tmp_path: Path, cli: Any) -> None:
    sd = model_state()
    directory = write_hf(tmp_path / "hf", sd)
    before = data_sections(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    a, b = [k for k, v in index.items() if v == index["layers.0.weight"]][:2]
    mig = migrations(tmp_path, f'ckpt.rename("{a}", "tmp")\nckpt.rename("{b}", "{a}")\nckpt.rename("tmp", "{b}")')
    cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup", check=True)
    after = data_sections(directory)
    assert after[index[a]][0] != before[index[a]][0]
    want = dict(sd)
    want[a], want[b] = sd[b], sd[a]
    same(hf_tensors(directory), want)
