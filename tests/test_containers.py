"""User story: "whatever ckptmigrate writes, torch and safetensors read back exactly as I gave it."

The writers behind every stamp and migration — :func:`ckptmigrate.formats.write_container`,
:meth:`Checkpoint.write`, the metadata-only rewrite and the zip writer under them — must keep
every dtype, view, shared storage, empty tensor and scalar intact, produce archives other zip
readers accept with ``mmap``-able 64-byte aligned records, leave tensor records byte-identical
when only metadata changes, and never leave a half-written file behind.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptmigrate import formats
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.formats import torchzip
from ckptmigrate.formats.zipio import ALIGNMENT, ZipWriter
from ckptmigrate.storage.atomic import TEMP_PREFIX, atomic_write

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "bool": torch.bool,
    "uint8": torch.uint8,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "complex64": torch.complex64,
}
ENVELOPE = {"format_version": 1, "note": "written by test_containers"}


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    """Deterministic, non-trivial values of ``dtype`` (no NaN, so torch.equal is meaningful)."""
    gen = torch.Generator().manual_seed(1234)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype in (torch.int64, torch.uint8):
        return torch.randint(0, 200, shape, generator=gen).to(dtype)
    if dtype == torch.complex64:
        return torch.randn(shape, generator=gen, dtype=torch.complex64)
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


def assert_tensor_same(got: Any, want: torch.Tensor, key: str = "") -> None:
    assert isinstance(got, torch.Tensor), f"{key}: {type(got)}"
    assert got.dtype == want.dtype, key
    assert got.shape == want.shape, key
    assert got.device == want.device, key
    assert torch.equal(got, want), key


def mixed_payload() -> dict[str, torch.Tensor]:
    """Every shape of tensor a state dict holds: dtypes, views, tied weights, empties, scalars."""
    base = sample(torch.float32, (4, 6))
    payload = {f"dtype.{name}": sample(dtype) for name, dtype in DTYPES.items()}
    payload.update({
        "tied.embedding": base,
        "tied.head": base.detach(),  # a state dict holds tied weights as two views of one storage
        "view.transposed": base.t(),
        "view.row": base[2],
        "empty.vector": torch.empty(0),
        "empty.matrix": torch.empty(0, 7, dtype=torch.float16),
        "scalar.float": torch.tensor(2.5),
        "scalar.int": torch.tensor(7, dtype=torch.int64),
    })
    return payload


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --- write_container and Checkpoint.write ---------------------------------------------------------


@pytest.mark.parametrize("name", list(DTYPES))
def test_torch_zip_round_trips_every_dtype(tmp_path: Path, name: str) -> None:
    want = {"x": sample(DTYPES[name]), "scalar": sample(DTYPES[name], ())}
    path = tmp_path / f"{name}.pt"
    with open(path, "wb") as fh:
        formats.write_container(fh, "torch-zip", want, None)
    for mmap in (False, True):
        got = torch.load(path, mmap=mmap)
        assert list(got) == list(want)
        for key in want:
            assert_tensor_same(got[key], want[key], key)


def test_torch_zip_keeps_views_tied_weights_empties_and_scalars(tmp_path: Path) -> None:
    want = mixed_payload()
    path = tmp_path / "mixed.pt"
    with open(path, "wb") as fh:
        formats.write_container(fh, "torch-zip", want, ENVELOPE)
    got = torch.load(path)
    for key, value in want.items():
        assert_tensor_same(got[key], value, key)
    assert shares_storage(got["tied.embedding"], got["tied.head"])
    assert got["tied.embedding"].data_ptr() == got["tied.head"].data_ptr()
    assert shares_storage(got["view.transposed"], got["tied.embedding"])
    # the same views of the same storage that torch.save itself would have written
    reference = tmp_path / "reference.pt"
    torch.save(want, reference)
    expected = torch.load(reference)
    for key in want:
        assert got[key].stride() == expected[key].stride(), key
        assert got[key].storage_offset() == expected[key].storage_offset(), key
    assert formats.read_envelope(path) == ("torch-zip", ENVELOPE)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-source", "legacy-source"])
def test_rewriting_a_read_checkpoint_keeps_every_tensor_and_sharing(tmp_path: Path, legacy: bool) -> None:
    """Tensors read as references (not torch tensors) are copied from the source file."""
    original = mixed_payload()
    if legacy:  # the legacy format has no storage class for float8
        del original["dtype.float8_e4m3fn"]
    source = tmp_path / "source.pt"
    torch.save(original, source, _use_new_zipfile_serialization=not legacy)
    want = torch.load(source)
    container = formats.read(source)
    try:
        out = tmp_path / "rewritten.pt"
        with open(out, "wb") as fh:
            formats.write_container(fh, "torch-zip", container.payload, ENVELOPE, template=container)
    finally:
        container.close()
    got = torch.load(out)
    assert list(got) == list(want)
    for key in want:
        assert_tensor_same(got[key], want[key], key)
        assert got[key].stride() == want[key].stride(), key
    assert shares_storage(got["tied.embedding"], got["tied.head"])
    assert shares_storage(got["view.transposed"], got["view.row"])


def test_safetensors_writer_round_trips_dtypes_and_views(tmp_path: Path) -> None:
    want = {k: v for k, v in mixed_payload().items() if not k.startswith("tied.head")}
    path = tmp_path / "mixed.safetensors"
    with open(path, "wb") as fh:
        formats.write_container(fh, "safetensors", want, ENVELOPE)
    got = load_file(path)
    assert sorted(got) == sorted(want)  # safetensors orders tensors by offset; empties tie
    for key, value in want.items():
        assert_tensor_same(got[key], value, key)
    assert formats.read_envelope(path) == ("safetensors", ENVELOPE)


def test_checkpoint_write_round_trips_to_zip_and_safetensors(tmp_path: Path) -> None:
    want = {k: v for k, v in mixed_payload().items() if not k.startswith("tied.")}
    source = tmp_path / "source.safetensors"
    save_file({k: v.contiguous() for k, v in want.items()}, source, metadata={"owner": "me"})
    with Checkpoint.open(source) as ckpt:
        as_zip = ckpt.write(tmp_path / "out.pt", None, fmt="torch-zip")
        as_st = ckpt.write(tmp_path / "out.safetensors", None)
    from_zip, from_st = torch.load(as_zip), load_file(as_st)
    for key, value in want.items():
        assert_tensor_same(from_zip[key], value, key)
        assert_tensor_same(from_st[key], value, key)
    assert formats.read(as_st).metadata == {"owner": "me"}


# --- ZipWriter ------------------------------------------------------------------------------------


def data_offsets(path: Path) -> dict[str, int]:
    """name → data offset, from zipfile and the local headers: the writer is checked by a parser of
    its own (the strict reader, which refuses a preamble or a sparse gap, has its own tests)."""
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        offsets = {}
        for info in zf.infolist():
            fh.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", fh.read(4))
            offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
        return offsets


def test_zip_writer_archive_is_valid_and_64_byte_aligned(tmp_path: Path) -> None:
    donor = tmp_path / "donor.bin"
    donor_bytes = bytes(range(256)) * 5
    donor.write_bytes(b"x" * 13 + donor_bytes)
    path = tmp_path / "a.zip"
    records = {
        "arc/data.pkl": b"\x80\x02}q\x00.",
        "arc/odd-length-name-x": b"1",
        "arc/empty": b"",
        "arc/data/0": bytes(1000),
        "arc/data/1": os.urandom(333),
    }
    streamed = os.urandom(4096 + 17)
    with open(path, "wb") as fh:
        fh.write(b"preamble")  # the writer starts wherever the file is positioned
        writer = ZipWriter(fh)
        for name, data in records.items():
            writer.add_bytes(name, data)
        writer.add_stream("arc/streamed", len(streamed), [streamed[:100], memoryview(streamed[100:])])
        with open(donor, "rb") as src:
            writer.add_copy("arc/copied", src.fileno(), 13, len(donor_bytes), zlib.crc32(donor_bytes))
        end = writer.close()
    assert end == path.stat().st_size
    records.update({"arc/streamed": streamed, "arc/copied": donor_bytes})
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert {name: zf.read(name) for name in zf.namelist()} == records
    offsets = data_offsets(path)
    assert set(offsets) == set(records)
    assert all(offset % ALIGNMENT == 0 for offset in offsets.values()), offsets


def test_zip_writer_reuse_lists_a_record_already_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with open(path, "w+b") as fh:
        writer = ZipWriter(fh)
        writer.add_bytes("arc/data/0", b"tensor bytes")
        first_end = writer.close()
    header_offset = 0
    with open(path, "r+b") as fh:  # append a new directory that points at the old record
        fh.seek(first_end)
        writer = ZipWriter(fh)
        writer.reuse("arc/data/0", header_offset, len(b"tensor bytes"), zlib.crc32(b"tensor bytes"))
        writer.add_bytes("arc/data.pkl", b"new")
        writer.close()
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert zf.read("arc/data/0") == b"tensor bytes"
        assert zf.read("arc/data.pkl") == b"new"


@pytest.mark.parametrize("size", range(4096 - 200, 4096 + 40, 3))
def test_zip_writer_end_record_never_straddles_a_page(tmp_path: Path, size: int) -> None:
    """A kill mid-write stops at a page boundary: the end record must land whole or not at all."""
    path = tmp_path / "a.zip"
    with open(path, "wb") as fh:
        writer = ZipWriter(fh)
        writer.add_bytes("arc/data.pkl", bytes(size))
        end = writer.close()
    eocd = end - 22
    assert eocd % 4096 + 22 <= 4096, eocd
    with zipfile.ZipFile(path) as zf:
        assert zf.read("arc/data.pkl") == bytes(size)


def test_zip_writer_switches_to_zip64_beyond_65535_records(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    count = 0xFFFF + 2
    with open(path, "wb") as fh:
        writer = ZipWriter(fh)
        for i in range(count):
            writer.add_bytes(f"r/{i}", i.to_bytes(3, "little"))
        writer.close()
    tail = path.read_bytes()[-200:]
    assert b"PK\x06\x06" in tail and b"PK\x06\x07" in tail  # zip64 end record and locator
    with zipfile.ZipFile(path) as zf:
        assert len(zf.infolist()) == count
        assert zf.read(f"r/{count - 1}") == (count - 1).to_bytes(3, "little")
    offsets = data_offsets(path)
    assert len(offsets) == count
    assert all(offset % ALIGNMENT == 0 for offset in offsets.values())


def test_zip_writer_zip64_offsets_past_4_gib(tmp_path: Path) -> None:
    """Records that start past 4 GiB need zip64 offsets; a sparse file makes that cheap."""
    path = tmp_path / "far.zip"
    start = (1 << 32) + 100
    with open(path, "wb") as fh:
        os.pwrite(fh.fileno(), b"\0", start - 1)
        if os.fstat(fh.fileno()).st_blocks * 512 > 64 << 20:
            pytest.skip("this file system does not store sparse files")
        fh.seek(start)
        writer = ZipWriter(fh)
        writer.add_bytes("arc/data.pkl", b"payload")
        writer.add_bytes("arc/data/0", b"x" * 100)
        writer.close()
    try:
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None
            assert zf.read("arc/data/0") == b"x" * 100
        offsets = data_offsets(path)
        assert all(o > start and o % ALIGNMENT == 0 for o in offsets.values())
    finally:
        path.unlink()


# --- metadata-only rewrite ------------------------------------------------------------------------


def tensor_records(path: Path) -> dict[str, tuple[int, bytes]]:
    """name → (data offset, bytes) of every storage record of a torch zip file."""
    offsets = data_offsets(path)
    with zipfile.ZipFile(path) as zf:
        return {
            name: (offsets[name], zf.read(name))
            for name in zf.namelist() if "/data/" in name
        }


def test_metadata_only_rewrite_keeps_tensor_records_byte_identical(tmp_path: Path) -> None:
    source = tmp_path / "source.pt"
    torch.save({f"layer{i}.weight": sample(torch.float32, (8, 8 + i)) for i in range(4)}, source)
    want = torch.load(source)
    before = tensor_records(source)
    out = tmp_path / "renamed.pt"
    container = formats.read(source)
    try:
        renamed = {k.replace("layer", "block"): v for k, v in container.payload.items()}
        with open(out, "wb") as fh:
            torchzip.write_metadata_only(
                fh, container.source, container.records, container.prefix, renamed, ENVELOPE
            )
    finally:
        container.close()
    assert tensor_records(out) == before  # same names, same bytes, same place in the file
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    got = torch.load(out, mmap=True)
    assert list(got) == [k.replace("layer", "block") for k in want]
    for key, value in want.items():
        assert_tensor_same(got[key.replace("layer", "block")], value, key)
    assert formats.read_envelope(out) == ("torch-zip", ENVELOPE)


def test_metadata_only_rewrite_refuses_tensors_from_elsewhere(tmp_path: Path) -> None:
    source = tmp_path / "source.pt"
    torch.save({"w": torch.ones(3)}, source)
    container = formats.read(source)
    try:
        payload = {"w": container.payload["w"], "new": torch.zeros(2)}
        needs_source = "needs every tensor to be in the source file"
        with open(tmp_path / "out.pt", "wb") as fh, pytest.raises(ValueError, match=needs_source):
            torchzip.write_metadata_only(
                fh, container.source, container.records, container.prefix, payload, None
            )
    finally:
        container.close()


# --- atomic_write ---------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_atomic_write_keeps_the_original_when_the_block_raises(tmp_path: Path) -> None:
    dest = tmp_path / "model.pt"
    dest.write_bytes(b"original bytes")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), atomic_write(dest) as fh:
        fh.write(b"half a new file")
        raise Boom
    assert dest.read_bytes() == b"original bytes"
    assert leftovers(tmp_path) == []


def test_atomic_write_creates_nothing_when_the_block_raises(tmp_path: Path) -> None:
    dest = tmp_path / "new.pt"
    with pytest.raises(KeyboardInterrupt), atomic_write(dest) as fh:
        fh.write(b"partial")
        raise KeyboardInterrupt
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_atomic_write_replaces_and_keeps_the_file_mode(tmp_path: Path) -> None:
    dest = tmp_path / "model.pt"
    dest.write_bytes(b"old")
    dest.chmod(0o640)
    with atomic_write(dest) as fh:
        fh.write(b"new")
        assert dest.read_bytes() == b"old"  # nobody sees the new bytes before the block ends
    assert dest.read_bytes() == b"new"
    assert dest.stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path) == []


def test_atomic_write_through_a_symlink_replaces_its_target(tmp_path: Path) -> None:
    """``latest.pt -> epoch10.pt`` stays a link to the rewritten checkpoint."""
    target = tmp_path / "runs" / "epoch10.pt"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "latest.pt"
    link.symlink_to(target)
    with atomic_write(link) as fh:
        fh.write(b"new")
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert target.read_bytes() == b"new"
    assert leftovers(tmp_path) == [] and leftovers(target.parent) == []
