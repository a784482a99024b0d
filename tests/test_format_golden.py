"""A release engineer's files keep verifying: the format is pinned by golden values and old files.

The architecture hash and the content digest are recomputed here from docs/format.md by an
independent implementation (hashlib and json only) and compared both with ckptmigrate and with the
values this format version first produced: a change to either serialisation fails here before a
single stamped file in the world stops verifying. The checkpoints in tests/fixtures/format-v1/ were
stamped, signed and migrated by format version 1 (scripts/make_format_fixtures.py); every later
version must read, verify and downgrade them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.checkpoint.envelope import architecture_hash
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.release import integrity

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "format-v1"

SCHEMA = {
    "encoder.weight": {"shape": [4, 3], "dtype": "float32"},
    "encoder.bias": {"shape": [4], "dtype": "float32"},
    "scale": {"shape": [], "dtype": "bfloat16"},
    "décodeur.poids": {"shape": [2, 2, 1], "dtype": "float8_e4m3fn"},
}
#: What format version 1 gave for SCHEMA; fixed forever.
ARCH_HASH_V1 = "sha256:34a02a199dfaee2492dddbdf4236d25a7de4e1084c0b1969676be6a7762c4b30"
#: What format version 1 gave for golden_state_dict() saved by torch.save; fixed forever.
OVERALL_V1 = {
    "sha256": "sha256:9f0d1a395f43d8fef8245c3afbaf8de044269ba68e5930ea179e00d89411e968",
    "blake3": "blake3:9eb0791e43f32b142874b0748d6181d72b4c068312b95c535640a22faa58f4c8",
}


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def spec_arch_hash(schema: dict[str, dict[str, Any]]) -> str:
    lines = b"".join(
        f"{key}\t{','.join(str(d) for d in schema[key]['shape'])}\t{schema[key]['dtype']}\n".encode()
        for key in sorted(schema)
    )
    return "sha256:" + hashlib.sha256(lines).hexdigest()


def golden_state_dict() -> OrderedDict[str, torch.Tensor]:
    full = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    return OrderedDict([
        ("layer.weight", full),
        ("layer.bias", torch.linspace(-1, 1, 4)),
        ("view", full[1:3, :2]),  # a view: its digest covers only its elements
        ("steps", torch.tensor(7, dtype=torch.int64)),
    ])


def spec_overall_sha256(sd: OrderedDict[str, torch.Tensor]) -> str:
    """docs/format.md's digest of a torch.save'd bare state dict, written from the page."""
    h = lambda data: hashlib.sha256(data)  # noqa: E731 - the page's H
    tensors = {}
    entries = []
    for key, t in sd.items():
        start = t.storage_offset() * t.element_size()
        last = t.storage_offset() + sum((d - 1) * s for d, s in zip(t.shape, t.stride(), strict=True))
        raw = bytes(t.untyped_storage())[start:(last + 1) * t.element_size()] if t.numel() else b""
        header = canonical({"key": key, "dtype": str(t.dtype).removeprefix("torch."),
                            "shape": list(t.shape), "stride": list(t.stride())})
        tensors[key] = h(b"ckptmigrate-tensor-v1\0" + header + b"\0" + h(raw).digest()).hexdigest()
        no_extra = ["dict", "dict", [], ["NoneType", None]]
        entries.append([["str", key], ["state_dict", key, False, no_extra]])
    payload = h(canonical([["dict", "OrderedDict", entries, ["NoneType", None]], []])).hexdigest()
    overall = h(b"ckptmigrate-digest-v1\n" + canonical({"payload": payload, "tensors": sorted(tensors.items())}))
    return "sha256:" + overall.hexdigest()


def test_architecture_hash_is_the_one_on_the_page() -> None:
    assert architecture_hash(SCHEMA) == spec_arch_hash(SCHEMA) == ARCH_HASH_V1
    reordered = dict(reversed(list(SCHEMA.items())))
    assert architecture_hash(reordered) == ARCH_HASH_V1


@pytest.mark.parametrize("alg", ["sha256", "blake3"])
def test_content_digest_is_the_one_on_the_page(tmp_path: Path, alg: str) -> None:
    sd = golden_state_dict()
    path = tmp_path / "golden.pt"
    torch.save(sd, path)
    with Checkpoint.open(path) as ckpt:
        digest = integrity.compute(ckpt, alg=alg)
    if alg == "sha256":
        assert digest["overall"] == spec_overall_sha256(sd)
    assert digest["overall"] == OVERALL_V1[alg]


@pytest.mark.parametrize("name", ["era1-signed.pth", "head-migrated.pth", "stamped.safetensors"])
def test_files_stamped_by_format_v1_still_verify(name: str) -> None:
    result = integrity.verify(FIXTURES / name, FIXTURES / "signer.pub.pem" if name.endswith(".pth") else None)
    assert result.ok, result.problems
    out = subprocess.run([sys.executable, "-m", "ckptmigrate", "inspect", "--json", str(FIXTURES / name)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["envelope"]["format_version"] == 1


def test_a_format_v1_file_changed_by_one_byte_fails_verification(tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.pth"
    shutil.copyfile(FIXTURES / "era1-signed.pth", tampered)
    with Checkpoint.open(tampered) as ckpt:
        ref = next(iter(ckpt.tensors().values()))
        offset = ref.storage.offset
    data = bytearray(tampered.read_bytes())
    data[offset] ^= 0x01
    tampered.write_bytes(bytes(data))
    assert not integrity.verify(tampered, FIXTURES / "signer.pub.pem").ok


def test_a_file_migrated_by_format_v1_walks_back_to_its_original(tmp_path: Path) -> None:
    back = tmp_path / "back.pth"
    subprocess.run([sys.executable, "-m", "ckptmigrate", "downgrade", str(FIXTURES / "head-migrated.pth"),
                    "--to", "0001", "-o", str(back), "--migrations", str(ROOT / "migrations")],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    original = torch.load(FIXTURES / "era1.pth", weights_only=True)
    restored = torch.load(back, weights_only=True)
    assert list(restored) == list(original)
    for key, tensor in original.items():
        assert torch.equal(restored[key], tensor), key
