"""User story: "our migrations dropped half the layers of a DCP checkpoint and replaced one tensor;
the .distcp files still hold the old bytes. `ckptmigrate compact` gives the disk back, and the
checkpoint still loads and verifies as before."

The checkpoint is written by ``torch.distributed.checkpoint.save`` and read back with ``dcp.load``;
ckptmigrate runs as a real subprocess.
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp


def write_dcp(directory: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    sd = {f"layers.{i}.weight": torch.randn(64, 32, generator=gen) for i in range(6)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group, assuming a single process"
        dcp.save(dict(sd), checkpoint_id=directory)
    return sd


def chain(tmp_path: Path) -> Path:
    root = tmp_path / "mig"
    (root / "versions").mkdir(parents=True)
    body = 'ckpt.drop(r"layers\\.[01]\\..*")\nckpt.transpose("layers.2.weight", 0, 1)'
    (root / "versions" / "0001_first.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n' + textwrap.indent(body, "    ") + "\n")
    return root


def files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.iterdir()}


def loaded(directory: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: torch.zeros_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=directory)
    return state


def test_compact_reclaims_the_chunks_migrations_left_behind(tmp_path: Path, cli: Any) -> None:
    directory = tmp_path / "step-100"
    full = write_dcp(directory)
    mig = chain(tmp_path)
    cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup", check=True)
    cli("stamp", directory, "--migrations", mig, "--digest", check=True)
    migrated = {k: v for k, v in full.items() if not k.startswith(("layers.0.", "layers.1."))}
    migrated["layers.2.weight"] = full["layers.2.weight"].t().contiguous()
    names_before = {n for n in files(directory) if n.endswith(".distcp")}
    size_before = sum(files(directory).values())

    out = cli("compact", directory, check=True)

    after = files(directory)
    assert f"{size_before:,} -> {sum(after.values()):,} bytes" in out.stdout
    # the dropped and the replaced chunks are gone: the files shrink by at least their bytes
    dead = sum(t.nbytes for k, t in full.items() if k not in migrated or k == "layers.2.weight")
    assert sum(after.values()) <= size_before - dead
    assert {n for n in after if n.endswith(".distcp")} == names_before  # the names the digests record
    got = loaded(directory, migrated)
    for key, want in migrated.items():
        assert torch.equal(got[key], want), key
    assert cli("verify", directory).returncode == 0
    assert cli("current", directory, check=True).stdout.strip() == "0001"
    assert not [n for n in after if "journal" in n or n.endswith(".part")]

    again = cli("compact", directory, check=True)  # nothing left to reclaim
    assert f"{sum(after.values()):,} -> {sum(after.values()):,} bytes" in again.stdout


def test_compact_into_a_new_directory_leaves_the_source_alone(tmp_path: Path, cli: Any) -> None:
    directory = tmp_path / "step-100"
    full = write_dcp(directory)
    mig = chain(tmp_path)
    cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup", check=True)
    source = {p.name: p.read_bytes() for p in directory.iterdir()}

    cli("compact", directory, "-o", tmp_path / "small", check=True)

    assert {p.name: p.read_bytes() for p in directory.iterdir()} == source
    assert sum(files(tmp_path / "small").values()) < sum(len(b) for b in source.values())
    kept = {k: v for k, v in full.items() if not k.startswith(("layers.0.", "layers.1.", "layers.2."))}
    got = loaded(tmp_path / "small", kept)
    for key, want in kept.items():
        assert torch.equal(got[key], want), key


def test_a_sharded_model_has_nothing_to_reclaim_and_is_left_alone(tmp_path: Path, cli: Any) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    directory = tmp_path / "hub"
    directory.mkdir()
    huggingface_hub.save_torch_state_dict(write_dcp(tmp_path / "unused"), directory, max_shard_size=20_000)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}
    total = sum(len(b) for _i, _m, b in before.values())

    out = cli("compact", directory, check=True)

    assert f"{total:,} -> {total:,} bytes" in out.stdout
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()} == before
