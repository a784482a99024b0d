"""User story: "The file I verified is the file torch loads." ckptmigrate reads a zip archive with one
strict parser and refuses every archive that torch's miniz and another zip reader (Python's
``zipfile``, a streaming reader) could read differently — and still reads everything torch.save and
ckptmigrate's own writers produce, superseded records of in-place appends included.

Each attack is a real archive built structure by structure (``zipcraft``) from the records of a
real ``torch.save`` file, refused by ``ckptmigrate inspect`` as a subprocess with exit 2 and one
line. For the attacks that split readers, the test first shows the split is real: ``torch.load``
returns one thing while ``zipfile`` (what ckptmigrate read before) sees another.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zipcraft
from zipcraft import Layout, Rec, central_entry, layout_of, records_of

from ckptmigrate import formats
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.formats.zipio import ZipWriter

Cli = Callable[..., subprocess.CompletedProcess[str]]
A = {"w": torch.arange(4.0)}
B = {"w": torch.full((4,), 666.0)}


def rec(layout: Layout, suffix: str) -> Rec:
    return next(r for r in layout.recs if r.name.endswith(suffix.encode()))


def torch_sees(path: Path) -> object:
    try:
        return torch.load(path, weights_only=True)["w"].tolist()
    except Exception as exc:  # noqa: BLE001 - which error torch raises is not the point
        return f"torch fails: {type(exc).__name__}"


def zipfile_sees(path: Path) -> object:
    try:
        with zipfile.ZipFile(path) as zf:
            return struct.unpack("<4f", zf.read("archive/data/0"))
    except Exception as exc:  # noqa: BLE001
        return f"zipfile fails: {type(exc).__name__}"


# -- the attacks ----------------------------------------------------------------------------------


def nul_in_a_name() -> bytes:
    """zipfile cuts ``archive/data.pkl\\0x`` at the NUL; miniz's lookup of ``archive/data.pkl`` misses it."""
    layout = layout_of(A)
    rec(layout, "data.pkl").name = b"archive/data.pkl\x00x"
    return layout.build()


def names_equal_ignoring_case() -> bytes:
    """A second ``archive/DATA/0`` holding other values: miniz's case-blind binary search may take it."""
    layout = layout_of(A)
    layout.recs.insert(0, Rec(b"archive/DATA/0", rec(layout_of(B), "data/0").data))
    layout.recs[0], layout.recs[1] = layout.recs[1], layout.recs[0]
    return layout.build()


def more_entries_than_counted() -> bytes:
    """The end record counts one entry fewer than the directory holds: zipfile reads it, miniz not."""
    layout = layout_of(A)
    layout.count = len(layout.recs) - 1
    return layout.build()


def a_polyglot_of_two_archives() -> bytes:
    """Archive B appended to archive A: zipfile shifts B's offsets by A's length and reads B; miniz
    takes them as they are and reads A's records through B's directory."""
    return layout_of(A).build() + layout_of(B).build()


def a_polyglot_of_two_different_archives() -> bytes:
    return layout_of(A).build() + layout_of({**B, "extra": torch.ones(3)}).build()


def directory_not_where_the_end_record_says() -> bytes:
    layout = layout_of(A)
    layout.after_directory = b"\x00" * 46
    return layout.build()


def directory_offset_points_elsewhere() -> bytes:
    layout = layout_of(A)
    layout.cd_offset = 0
    return layout.build()


def bytes_between_records() -> bytes:
    layout = layout_of(A)
    layout.between[3] = b"hidden payload, read by no central directory"
    return layout.build()


def local_header_names_another_record() -> bytes:
    layout = layout_of(A)
    rec(layout, "data/0").local_name = b"archive/data/9"
    return layout.build()


def local_header_sizes_disagree() -> bytes:
    layout = layout_of(A)
    r = rec(layout, "data/0")
    r.local_fields = (r.crc, 8, 8)
    return layout.build()


def local_header_asks_for_encryption() -> bytes:
    layout = layout_of(A)
    rec(layout, "data/0").flags = 0x0001
    return layout.build()


def data_descriptor_disagrees() -> bytes:
    layout = layout_of(A)
    r = rec(layout, "data/0")
    r.flags, r.local_fields = 0x0008, (0, 0, 0)
    r.after = struct.pack("<IIII", 0x08074B50, r.crc, len(r.data) - 4, len(r.data) - 4)
    return layout.build()


def a_compressed_data_pkl() -> bytes:
    layout = layout_of(A)
    r = rec(layout, "data.pkl")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = deflate.compress(r.data) + deflate.flush()
    r.method, crc, size = 8, r.crc, len(r.data)
    r.data = packed
    r.local_fields = (crc, len(packed), size)
    return layout.build()


def a_second_end_record_in_the_comment() -> bytes:
    """The comment holds an end record of its own: each reader picks a different one."""
    layout = layout_of(A)
    layout.comment = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, 46, 0, 0)
    return layout.build()


def bytes_after_the_end_record() -> bytes:
    layout = layout_of(A)
    layout.trailer = b"\x00" * 7
    return layout.build()


def an_extra_directory_entry_for_an_unlisted_record() -> bytes:
    layout = layout_of(A)
    layout.extra_central = central_entry(b"archive/data/0", rec(layout_of(B), "data/0").data, 0)
    return layout.build()


def name_with(name: bytes) -> Callable[[], bytes]:
    def build() -> bytes:
        layout = layout_of(A)
        layout.recs.insert(1, Rec(name, b"x"))
        return layout.build()

    build.__name__ = f"a record named {name!r}"
    return build


def a_record_outside_the_archive_folder() -> bytes:
    return name_with(b"other/x")()


def two_local_headers_for_one_entry() -> bytes:
    """The directory points two names at one local header (the overlapping-record zip bomb)."""
    layout = layout_of(A)
    layout.recs.append(Rec(b"archive/data/1", rec(layout, "data/0").data))
    layout.recs[-1].central_offset = 0
    return layout.build()


def a_version_torch_refuses() -> bytes:
    layout = layout_of(A)
    rec(layout, "/version").data = b"99\n"
    return layout.build()


def a_torchscript_archive() -> bytes:
    layout = layout_of(A)
    layout.recs.insert(1, Rec(b"archive/constants.pkl", b"\x80\x02)."))
    return layout.build()


def a_storage_record_longer_than_its_storage() -> bytes:
    """torch.load refuses it (without mmap); with mmap it reads the first bytes: refuse, as torch does."""
    layout = layout_of(A)
    rec(layout, "data/0").data += bytes(32)
    return layout.build()


ATTACKS: list[Callable[[], bytes]] = [
    nul_in_a_name, names_equal_ignoring_case, more_entries_than_counted, a_polyglot_of_two_different_archives,
    directory_not_where_the_end_record_says, directory_offset_points_elsewhere, bytes_between_records,
    local_header_names_another_record, local_header_sizes_disagree, local_header_asks_for_encryption,
    data_descriptor_disagrees, a_compressed_data_pkl, a_second_end_record_in_the_comment,
    bytes_after_the_end_record, an_extra_directory_entry_for_an_unlisted_record,
    name_with(b"archive\\data\\x"), name_with(b"archive/../x"), name_with(b"/archive/x"),
    name_with(b"archive//x"), name_with(b"archive/./x"), name_with(b"archive/x/"), name_with(b"archive/\xc3\xa9"),
    a_record_outside_the_archive_folder, two_local_headers_for_one_entry, a_version_torch_refuses,
    a_torchscript_archive, a_storage_record_longer_than_its_storage,
]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.__name__)
def test_an_archive_readers_could_read_two_ways_is_refused_in_one_line(
    attack: Callable[[], bytes], tmp_path: Path, cli: Cli
) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(attack())
    before = path.read_bytes()
    proc = cli("inspect", path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and str(path) in lines[0], proc.stderr
    assert path.read_bytes() == before


def miniz_view(path: Path) -> tuple[object, object]:
    """(record names, the tensor) as torch's miniz reader gives them."""
    try:
        names: object = sorted(torch._C.PyTorchFileReader(str(path)).get_all_records())
    except Exception as exc:  # noqa: BLE001
        names = f"fails: {type(exc).__name__}"
    return names, torch_sees(path)


def zipfile_view(path: Path) -> tuple[object, object]:
    """(record names, the tensor) as Python's zipfile — what ckptmigrate used to read with — gives them."""
    try:
        with zipfile.ZipFile(path) as zf:
            names: object = sorted(n.split("/", 1)[1] for n in zf.namelist())
    except Exception as exc:  # noqa: BLE001
        names = f"fails: {type(exc).__name__}"
    return names, zipfile_sees(path)


SPLITS = [nul_in_a_name, more_entries_than_counted, a_polyglot_of_two_archives,
          an_extra_directory_entry_for_an_unlisted_record, a_record_outside_the_archive_folder]


@pytest.mark.parametrize("attack", SPLITS, ids=lambda a: a.__name__)
def test_the_split_attacks_are_live(attack: Callable[[], bytes], tmp_path: Path) -> None:
    """torch and zipfile see different records or different weights in these files."""
    path = tmp_path / "model.pt"
    path.write_bytes(attack())
    assert miniz_view(path) != zipfile_view(path)


def test_a_polyglot_makes_torch_and_zipfile_return_different_weights(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(a_polyglot_of_two_archives())
    assert torch_sees(path) == [0.0, 1.0, 2.0, 3.0]  # A's records, through B's directory
    assert zipfile_sees(path) == (666.0,) * 4  # B's
    try:  # refused, or (B's end being byte for byte A's, as an interrupted append's is) read as torch reads it
        assert_reads_as_torch_loads(path)
    except BadInput as exc:
        assert "follow the archive's end record" in str(exc) or "not where" in str(exc)


# -- what must keep being read ------------------------------------------------------------------------


def assert_reads_as_torch_loads(path: Path) -> None:
    with Checkpoint.open(path) as ckpt:
        ours = {k: v.clone() for k, v in ckpt.materialize().items()}
    theirs = torch.load(path, weights_only=True)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape and torch.equal(ours[key], value)


def test_torch_save_and_every_layout_ckptmigrate_writes_are_read(tmp_path: Path) -> None:
    sd = {"a": torch.arange(6.0), "b": torch.ones(3, dtype=torch.int64), "c": torch.zeros(2, 2), "d": torch.eye(2)}
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    assert_reads_as_torch_loads(path)
    for old, new in (("a", "a2"), ("a2", "a")):  # in-place appends: superseded data.pkl, directories...
        size = path.stat().st_size
        with Checkpoint.open(path) as ckpt:
            ckpt.rename(old, new)
            ckpt.write(path, None)
        assert path.read_bytes()[size - 22 : size - 18] == b"PK\x05\x06"  # appended after the old end
        assert_reads_as_torch_loads(path)
    fresh = tmp_path / "fresh.pt"
    torch.save(sd, fresh)
    dropped = tmp_path / "dropped.pt"
    with Checkpoint.open(fresh) as ckpt:  # two torch records, data descriptors and all, left dead
        ckpt.drop("b")
        ckpt.drop("c")
        ckpt.write(dropped, None)
    assert_reads_as_torch_loads(dropped)
    appended = tmp_path / "appended.pt"
    shutil.copy(path, appended)
    with Checkpoint.open(appended) as ckpt:  # an out-of-place rewrite of an appended file
        ckpt.drop("d")
        ckpt.write(tmp_path / "rewritten.pt", None)
    assert_reads_as_torch_loads(tmp_path / "rewritten.pt")


def test_lookups_ignore_case_as_miniz_does(tmp_path: Path) -> None:
    """A record torch finds under another case is one we find too (names are unique ignoring case)."""
    layout = layout_of(A)
    rec(layout, "byteorder").name = b"archive/BYTEORDER"
    path = tmp_path / "model.pt"
    path.write_bytes(layout.build())
    entries = formats.read(path).records
    assert "archive/byteorder" in entries and entries.get("archive/byteorder") is entries["archive/BYTEORDER"]


def test_a_record_torch_save_wrote_with_a_data_descriptor_is_checked_against_it(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(A, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        info = zf.getinfo("model/data/0")
        name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
        descriptor = info.header_offset + 30 + name_len + extra_len + info.file_size
    assert raw[descriptor : descriptor + 4] == b"PK\x07\x08"
    assert_reads_as_torch_loads(path)
    raw[descriptor + 8] ^= 1  # its size
    path.write_bytes(bytes(raw))
    with pytest.raises(BadInput, match="data descriptor"):
        formats.read(path)


def test_a_superseded_directory_that_was_tampered_with_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(A, path)
    first_end = path.stat().st_size
    with Checkpoint.open(path) as ckpt:
        ckpt.rename("w", "v")
        ckpt.write(path, None)
    assert_reads_as_torch_loads(path)
    raw = bytearray(path.read_bytes())
    old_eocd = raw.rindex(b"PK\x05\x06", 0, first_end)
    raw[old_eocd + 10] ^= 1  # the superseded end record's entry count
    path.write_bytes(bytes(raw))
    with pytest.raises(BadInput, match="superseded"):
        formats.read(path)


def test_records_of_a_real_file_are_what_the_crafted_archives_start_from() -> None:
    names = [name for name, _ in records_of(A)]
    assert names[0] == "archive/data.pkl" and "archive/data/0" in names and "archive/version" in names


def test_records_past_4_gib_are_read_through_their_zip64_fields(tmp_path: Path) -> None:
    """A 4 GiB record (its sizes in a zip64 field) before the others puts their offsets in zip64
    fields too, and the end records in zip64 records; a sparse file makes it cheap."""
    path = tmp_path / "far.pt"
    gap = (1 << 32) + 100
    name = b"archive/pad"
    extra = struct.pack("<HHQQ", 1, 16, gap, gap)
    header = zipcraft.LOCAL.pack(0x04034B50, 45, 0, 0, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, len(name), len(extra))
    try:
        with open(path, "wb") as fh:
            fh.write(header + name + extra)
            fh.seek(fh.tell() + gap)
            writer = ZipWriter(fh)
            for record, data in records_of(A):
                writer.add_bytes(record, data)
            writer.reuse("archive/pad", 0, gap, 0)
            writer.close()
            if os.fstat(fh.fileno()).st_blocks * 512 > 64 << 20:
                pytest.skip("this file system does not store sparse files")
        entries = formats.read(path).records
        assert entries["archive/pad"].size == gap and entries["archive/data/0"].header_offset > gap
        assert_reads_as_torch_loads(path)
    finally:
        path.unlink()


def test_a_tail_after_the_end_record_is_refused_with_the_length_that_gives_the_archive_back(
    tmp_path: Path, cli: Cli
) -> None:
    """What an interrupted in-place write of an older ckptmigrate leaves: the archive, then a tail."""
    path = tmp_path / "model.pt"
    archive = layout_of(A).build()
    path.write_bytes(archive + layout_of(B).build()[:300])
    proc = cli("inspect", path)
    assert proc.returncode == 2 and f"truncate -s {len(archive)}" in proc.stderr, proc.stderr
    os.truncate(path, len(archive))
    assert cli("inspect", path).returncode == 0


def test_a_comment_without_an_end_record_in_it_is_read_one_with_one_is_refused(tmp_path: Path) -> None:
    """Every reader takes the last end record signature; a comment that holds none cannot split them."""
    path = tmp_path / "commented.pt"
    torch.save(A, path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = b"archived by a tool that writes comments"
    assert_reads_as_torch_loads(path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = b"PK\x05\x06" + bytes(18)
    with pytest.raises(BadInput, match="end record"):
        formats.read(path)
