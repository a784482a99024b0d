"""User story: "a rename that only rewrites metadata is checked against what torch will load, cheaply."

After a metadata-only write (the in-place append, or ``-o`` copying the records), ckptmigrate reads
the written file back as torch reads it — the strict zip parse — and compares its ``data.pkl``,
its envelope and the storage records the pickle names with what it meant to write, instead of
unpickling it all again. These tests write real files and then damage them as a faulty disk, a
concurrent writer or a writer bug would — a flipped byte of ``data.pkl`` (its CRC no longer
holds), a different ``data.pkl`` with a valid CRC, an envelope that is not the one written, a
storage record pointing at other bytes, a missing record — and check that each is caught, naming
the problem, and that an intact write passes.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.formats import torchzip, zipio


def written(tmp_path: Path) -> tuple[Checkpoint, torchzip.Pickled, bytes, Path]:
    """A file renamed in place by the metadata-only append, with what that append meant to write."""
    path = tmp_path / "model.pt"
    torch.save({f"module.layer{i}.weight": torch.full((3,), float(i)) for i in range(50)}, path)
    ckpt = Checkpoint.open(path)
    ckpt.unwrap("module.")
    pickled = torchzip.Pickled(ckpt.payload())
    envelope = torchzip.envelope_bytes({"revision": "r1", "note": "x" * 5000})  # compressed: > 4 KiB
    c = ckpt.container
    assert c.source is not None
    assert torchzip.append_in_place(path, c.source, c.records, c.prefix, pickled, envelope)
    return ckpt, pickled, envelope, path


def verify(ckpt: Checkpoint, pickled: torchzip.Pickled, envelope: bytes | None, path: Path) -> str | None:
    c = ckpt.container
    return torchzip.verify_metadata_only(path, c.records, c.prefix, pickled, envelope)


def record(path: Path, name: str) -> zipio.ZipEntry:
    with open(path, "rb") as fh:
        return zipio.read_entries(fh, os.fstat(fh.fileno()).st_size)[name]


def test_an_intact_append_reads_back_and_loads(tmp_path: Path) -> None:
    ckpt, pickled, envelope, path = written(tmp_path)
    assert verify(ckpt, pickled, envelope, path) is None
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == [f"layer{i}.weight" for i in range(50)]
    assert all(float(loaded[f"layer{i}.weight"][0]) == i for i in range(50))


def test_a_flipped_byte_of_data_pkl_is_caught(tmp_path: Path) -> None:
    ckpt, pickled, envelope, path = written(tmp_path)
    entry = record(path, f"{ckpt.container.prefix}/data.pkl")
    with open(path, "r+b") as fh:
        fh.seek(entry.data_offset + entry.size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x20]))
    assert verify(ckpt, pickled, envelope, path) == "its data.pkl is not the one written"


def test_another_data_pkl_with_a_valid_crc_is_caught(tmp_path: Path) -> None:
    ckpt, _pickled, envelope, path = written(tmp_path)
    other = {**ckpt.payload(), "epoch": 3}  # the same tensors in another payload, pickled as validly
    assert verify(ckpt, torchzip.Pickled(other), envelope, path) == "its data.pkl is not the one written"


def test_an_envelope_that_is_not_the_one_written_is_caught(tmp_path: Path) -> None:
    ckpt, pickled, _envelope, path = written(tmp_path)
    assert verify(ckpt, pickled, torchzip.envelope_bytes({"revision": "r2"}), path) == \
        "its envelope is not the one written"
    assert verify(ckpt, pickled, None, path) == "its envelope is not the one written"


def test_a_storage_record_with_other_bytes_is_caught(tmp_path: Path) -> None:
    ckpt, pickled, envelope, path = written(tmp_path)
    prefix = ckpt.container.prefix
    key, _storage = pickled.plan.records[7]
    entry = record(path, f"{prefix}/data/{key}")
    # the record's bytes change, and its CRC with them (in its header, data descriptor and directory
    # entry): a valid archive that torch would load with other values for the tensor
    with open(path, "rb") as fh:
        data = fh.read()
    old_crc = struct.pack("<I", entry.crc)
    new = bytearray(data)
    new[entry.data_offset : entry.data_offset + 4] = b"\x00\x00\x80\x7f"  # inf
    new_crc = struct.pack("<I", zlib.crc32(new[entry.data_offset : entry.data_offset + entry.size]))
    count = 0
    start = 0
    while (at := bytes(new).find(old_crc, start)) >= 0:
        new[at : at + 4] = new_crc
        count += 1
        start = at + 4
    assert count >= 2
    path.write_bytes(bytes(new))
    assert record(path, f"{prefix}/data/{key}").crc != entry.crc
    assert verify(ckpt, pickled, envelope, path) == f"its storage record data/{key} is not the one written"


def test_a_file_that_is_no_longer_an_archive_is_caught(tmp_path: Path) -> None:
    ckpt, pickled, envelope, path = written(tmp_path)
    shutil.copyfile(path, tmp_path / "copy.pt")
    with open(path, "r+b") as fh:
        fh.truncate(os.fstat(fh.fileno()).st_size - 10)
    problem = verify(ckpt, pickled, envelope, path)
    assert problem is not None and "end" in problem
    assert verify(ckpt, pickled, envelope, tmp_path / "copy.pt") is None


@pytest.mark.parametrize("in_place", [True, False])
def test_a_rename_through_the_api_passes_its_read_back(tmp_path: Path, in_place: bool) -> None:
    path = tmp_path / "model.pt"
    torch.save({f"module.layer{i}.weight": torch.full((3,), float(i)) for i in range(20)}, path)
    ckpt = Checkpoint.open(path)
    ckpt.unwrap("module.")
    dest = path if in_place else tmp_path / "out.pt"
    size = path.stat().st_size
    ckpt.write(dest, None)
    ckpt.close()
    if in_place:
        assert path.stat().st_size > size  # appended, not rewritten
    assert list(torch.load(dest, weights_only=True)) == [f"layer{i}.weight" for i in range(20)]
