"""User story: "A checkpoint sent to a bucket as it is made is the very file ckptmigrate writes on disk."

The streamed torch zip (formats/zipstream) of a payload — storages kept from the file read, tensors
computed, tied weights, many small records, a compressed envelope — joined piece by piece is equal,
byte for byte, to what :func:`torchzip.write` writes for the same payload and serialization id; its
announced length is its length. The object as it will be (storage/pieces.Planned) reads back as a
checkpoint before anything is committed, from the pieces held, and a read of a new tensor's bytes
that were not held is an error, never bytes made up.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.formats import torchzip, zipstream
from ckptmigrate.storage.pieces import Kept, Planned, merged
from ckptmigrate.tensors.refs import Deferred, Source

SID = b"0123456789" * 4


class LocalObject:
    """A local file read as a remote object is: by ``pread``."""

    def __init__(self, path: Path) -> None:
        self.url = str(path)
        self._data = path.read_bytes()
        self.size = len(self._data)

    def pread(self, n: int, offset: int) -> bytes:
        return self._data[offset : offset + n]

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Everything is at hand."""


def source_file(tmp_path: Path) -> Path:
    torch.manual_seed(5)
    state: dict[str, Any] = {f"layer.{i}.bias": torch.randn(100 + i) for i in range(40)}
    state["embed.weight"] = torch.randn(300, 256)
    state["lm_head.weight"] = state["embed.weight"]  # tied: one storage, one record
    state["big.weight"] = torch.randn(512, 512)
    path = tmp_path / "src.pt"
    torch.save(state, path)
    return path


def migrated(payload: dict[str, Any]) -> dict[str, Any]:
    """Some storages kept, some computed: small ones (~24 KB: held whole for the read-back, whose
    walk reads across them) and a large one."""
    out = dict(payload)
    for i in range(0, 40, 3):
        out[f"layer.{i}.bias"] = Deferred((3000 + i,), "float64", lambda i=i: torch.full((3000 + i,), float(i),
                                                                                         dtype=torch.float64))
    out["big.weight"] = Deferred((512, 512), "float32", lambda: torch.ones(512, 512) * 3)
    out["added"] = torch.arange(10)
    return out


def streamed(tmp_path: Path, envelope: dict[str, Any] | None) -> tuple[bytes, bytes, int, Planned, Source]:
    src = Source(source_file(tmp_path))
    payload, _env, _storages, prefix, entries = torchzip.read(src)
    payload = migrated(payload)
    written = io.BytesIO()
    with open(tmp_path / "local.pt", "wb") as fh:
        torchzip.write(fh, payload, envelope, prefix=prefix, serialization_id=SID)
    archive = zipstream.records(torchzip.Pickled(payload), None if envelope is None else
                                torchzip.envelope_bytes(envelope), prefix, SID)
    assert zipstream.refusal(archive, src) is None
    planned = Planned(LocalObject(tmp_path / "src.pt"))  # type: ignore[arg-type]
    headers = {e.data_offset: e.data_offset - e.header_offset for e in entries.values()}
    for piece in zipstream.emit(archive, src, planned, headers):
        written.write(src.pread(piece.size, piece.start) if isinstance(piece, Kept) else piece)
    return written.getvalue(), (tmp_path / "local.pt").read_bytes(), zipstream.total_size(archive), planned, src


@pytest.mark.parametrize("envelope", [None, {"revision": "c2", "schema": {f"k{i}": i for i in range(2000)}}],
                         ids=["no-envelope", "compressed-envelope"])
def test_the_streamed_archive_is_the_written_file(tmp_path: Path, envelope: dict[str, Any] | None) -> None:
    sent, local, total, planned, _src = streamed(tmp_path, envelope)
    assert sent == local
    assert total == len(local) == planned.size
    loaded = torch.load(io.BytesIO(sent), weights_only=True)
    assert torch.equal(loaded["big.weight"], torch.ones(512, 512) * 3)
    assert loaded["lm_head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()


def test_the_object_to_be_reads_back_from_the_pieces_held(tmp_path: Path) -> None:
    sent, _local, _total, planned, _src = streamed(tmp_path, None)
    with Checkpoint.open(tmp_path / "object.pt", remote=planned) as again:
        assert again.schema()["big.weight"] == {"shape": [512, 512], "dtype": "float32"}
        assert again.schema()["layer.3.bias"] == {"shape": [3003], "dtype": "float64"}
    with zipfile.ZipFile(io.BytesIO(sent)) as zf:  # the computed 1 MiB record: its middle was not held
        info = next(i for i in zf.infolist() if i.file_size == 512 * 512 * 4)
    n, m = struct.unpack("<HH", sent[info.header_offset + 26 : info.header_offset + 30])
    middle = info.header_offset + 30 + n + m + info.file_size // 2
    with pytest.raises(BadInput, match="does not hold"):
        planned.pread(1024, middle)
    assert planned.pread(64, 0) == sent[:64]


def test_records_kept_where_they_were_are_one_range_with_their_headers(tmp_path: Path) -> None:
    _sent, local, _total, _planned, _src = streamed(tmp_path, None)
    (tmp_path / "again.pt").write_bytes(local)  # what ckptmigrate wrote, migrated once more
    src = Source(tmp_path / "again.pt")
    payload, _env, _storages, prefix, entries = torchzip.read(src)
    payload["big.weight"] = Deferred((512, 512), "float32", lambda: torch.ones(512, 512) * 4)
    archive = zipstream.records(torchzip.Pickled(payload), None, prefix, SID)
    headers = {e.data_offset: e.data_offset - e.header_offset for e in entries.values()}
    pieces = list(merged(zipstream.emit(archive, src, Planned(LocalObject(tmp_path / "again.pt")),  # type: ignore[arg-type]
                                        headers)))
    kept = [p for p in pieces if isinstance(p, Kept)]
    by_header = {e.header_offset: e for e in entries.values()}
    assert kept and all(k.start in by_header for k in kept)  # each run starts at a local header
    # the records before and after the changed one: two runs, every other storage record in them
    assert len(kept) == 2
    storages = [e for e in entries.values() if "/data/" in e.name and e.size != 512 * 512 * 4]
    assert sum(k.size for k in kept) == sum(e.data_offset - e.header_offset + e.size for e in storages)
    out = b"".join(src.pread(p.size, p.start) if isinstance(p, Kept) else bytes(p) for p in pieces)
    assert torch.equal(torch.load(io.BytesIO(out), weights_only=True)["big.weight"], torch.ones(512, 512) * 4)
