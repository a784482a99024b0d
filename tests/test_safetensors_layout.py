"""What a safetensors file ckptmigrate writes looks like, byte for byte where the format and the
README promise it: an 8-byte little-endian header length, the header JSON padded with spaces to a
multiple of 8, the envelope as one compact string in ``__metadata__``, tensors back to back in
header order; and, for the shards of a sharded model, room in the header (at least the slack asked
for, or a quarter of the JSON) with the data starting on a 4 KiB boundary, so a later rename can
rewrite the header in place. The real ``safetensors`` reader must agree on every tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from ckptmigrate.formats import safetensors_io


def tensors(name_length: int = 4) -> dict[str, torch.Tensor]:
    """A few tensors; ``name_length`` varies the header's length, so every residue modulo 8 is seen."""
    torch.manual_seed(0)
    return {
        "n" * name_length: torch.zeros(2),
        "embed.weight": torch.randn(7, 3),
        "head.bias": torch.randn(5).to(torch.float16),
        "big": torch.arange(5 << 20, dtype=torch.int32),  # 20 MiB: more than one streamed chunk
        "mask": torch.tensor([True, False, True]),
        "flag": torch.tensor([True]),  # one byte: the smallest tensor a writer can drop
    }


def write(path: Path, slack: int = 0, envelope: dict[str, Any] | None = None, name_length: int = 4) -> bytes:
    with path.open("wb") as fh:
        safetensors_io.write(fh, tensors(name_length), envelope, {"format": "pt"}, slack=slack)
    return path.read_bytes()


def split(data: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8:8 + n], data[8 + n:]


@pytest.mark.parametrize("name_length", range(1, 9))
@pytest.mark.parametrize("slack", [0, 1024, 100_000])
def test_header_padding_room_and_data_layout(tmp_path: Path, slack: int, name_length: int) -> None:
    data = write(tmp_path / "m.safetensors", slack, name_length=name_length)
    n, header, body = split(data)
    text = header.rstrip(b" ")
    parsed = json.loads(text)
    assert n % 8 == 0
    assert set(header[len(text):]) <= {ord(" ")}
    if slack:
        assert (8 + n) % 4096 == 0, "the data starts on a 4 KiB boundary"
        assert n - len(text) >= max(slack, len(text) // 4), "room for a longer header"
    else:
        assert n - len(text) < 8, "no room asked for: only the padding to 8 bytes"

    want = tensors(name_length)
    assert [k for k in parsed if k != "__metadata__"] == list(want)
    offset = 0
    for name, tensor in want.items():
        entry = parsed[name]
        size = tensor.numel() * tensor.element_size()
        assert entry["data_offsets"] == [offset, offset + size], name
        assert entry["shape"] == list(tensor.shape), name
        assert body[offset:offset + size] == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name
        offset += size
    assert len(body) == offset, "nothing after the last tensor"

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in want.items():
            assert torch.equal(f.get_tensor(name), tensor), name


def test_the_envelope_is_one_compact_string_in_the_metadata(tmp_path: Path) -> None:
    envelope = {"revision": "0004", "lineage": "example", "tags": {"run": "42", "note": "a b"}}
    data = write(tmp_path / "m.safetensors", envelope=envelope)
    _n, header, _body = split(data)
    stored = json.loads(header)["__metadata__"][safetensors_io.ENVELOPE_KEY]
    assert json.loads(stored) == envelope
    assert ", " not in stored and ": " not in stored, "compact JSON, as docs/format.md says"
    assert stored.index('"lineage"') < stored.index('"revision"') < stored.index('"tags"'), "keys sorted"
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[safetensors_io.ENVELOPE_KEY]) == envelope
