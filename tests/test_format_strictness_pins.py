"""User story: "When ckptmigrate refuses a checkpoint, it names the rule the file breaks — the same rule
whether I open it from Python or from the command line — and what torch loads, it reads."

Each strictness rule of the readers in ``formats/`` (the zip reader, the safetensors header, the
pickle scan, the verdict on a pickle's globals) is played in-process here, one lie per case, and the
refusal must name that rule; the layouts torch and other zip writers really produce must be read,
and read as ``torch.load`` reads them. ``tests/test_zip_strict.py`` plays the attacks through the CLI
as a subprocess, where a mutant of the reader (``mutmut``, README "Mutation testing") cannot be
seen. The files are real: ``torch.save`` and ``safetensors`` output, changed field by field or
rebuilt structure by structure (``zipcraft``); where the rule is torch's, torch is asked too.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import zipcraft
from test_zip_strict import (
    a_compressed_data_pkl,
    a_record_outside_the_archive_folder,
    a_storage_record_longer_than_its_storage,
    a_torchscript_archive,
    a_version_torch_refuses,
    bytes_after_the_end_record,
    bytes_between_records,
    data_descriptor_disagrees,
    directory_not_where_the_end_record_says,
    local_header_asks_for_encryption,
    local_header_names_another_record,
    local_header_sizes_disagree,
    more_entries_than_counted,
    name_with,
    names_equal_ignoring_case,
    nul_in_a_name,
    two_local_headers_for_one_entry,
)
from zipcraft import Rec, layout_of

from ckptmigrate import formats
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.formats import pickle_scan, safetensors_io, zipdirectory, zipread
from ckptmigrate.tensors.refs import Source

EOCD = struct.Struct("<IHHHHIIH")
EOCD64 = struct.Struct("<IQHHIIQQQQ")
LOCATOR64 = struct.Struct("<IIQI")
#: Where each field of a central directory entry starts.
CENTRAL_AT = {"needed": 6, "flags": 8, "method": 10, "crc": 16, "csize": 20, "usize": 24, "disk": 34, "eattr": 38,
              "offset": 42}
#: Where each field of a local header starts.
LOCAL_AT = {"needed": 4, "flags": 6, "method": 8, "crc": 14, "csize": 18, "usize": 22}

#: Each attack (a test id without escapes: mutmut reruns tests by id in one process, where pytest
#: does not find an id it had to escape) and the words of the one rule that must refuse it.
RULES: list[tuple[str, Callable[[], bytes], str]] = [
    ("nul in a name", nul_in_a_name, "has a NUL byte in its name"),
    ("names equal ignoring case", names_equal_ignoring_case, "have the same name ignoring case"),
    ("more entries than counted", more_entries_than_counted, "counted entries (zipfile reads them, miniz does not)"),
    ("directory not where the end record says", directory_not_where_the_end_record_says,
     "the central directory is not where the end record says"),
    ("bytes between records", bytes_between_records, "are no zip structure"),
    ("local header names another record", local_header_names_another_record,
     "its local header names 'archive/data/9'"),
    ("local header sizes disagree", local_header_sizes_disagree, "its local header 8 bytes"),
    ("local header asks for encryption", local_header_asks_for_encryption,
     "needs zip features torch does not write (flags 0x0001)"),
    ("data descriptor disagrees", data_descriptor_disagrees, "its data descriptor says 12 bytes"),
    ("a compressed data.pkl", a_compressed_data_pkl, "is compressed (method 8)"),
    ("bytes after the end record", bytes_after_the_end_record, "7 bytes follow the archive's end record"),
    ("backslashes", name_with(b"archive\\data\\x"), "non-canonical name"),
    ("a dot-dot part", name_with(b"archive/../x"), "non-canonical name"),
    ("absolute", name_with(b"/archive/x"), "non-canonical name"),
    ("an empty part", name_with(b"archive//x"), "non-canonical name"),
    ("a dot part", name_with(b"archive/./x"), "non-canonical name"),
    ("a trailing slash", name_with(b"archive/x/"), "non-canonical name"),
    ("utf-8", name_with(b"archive/\xc3\xa9"), "a control or non-ASCII byte"),
    ("a control byte", name_with(b"archive/x\x1f"), "a control or non-ASCII byte"),
    ("a delete byte", name_with(b"archive/x\x7f"), "a control or non-ASCII byte"),
    ("a space in a dot-dot name", name_with(b"archive/my model/../x"), "non-canonical name"),
    ("a tilde in a dot-dot name", name_with(b"archive/~/../x"), "non-canonical name"),
    ("a top-level record", name_with(b"x"), "'x' is not inside the archive's folder"),
    ("an absolute top-level record", name_with(b"/x"), "'/x' is not inside the archive's folder"),
    ("a record outside the archive folder", a_record_outside_the_archive_folder,
     "is outside the archive folder 'archive'"),
    ("two local headers for one entry", two_local_headers_for_one_entry, "share a local header"),
    ("a version torch refuses", a_version_torch_refuses, "holds no archive version torch reads"),
    ("a torchscript archive", a_torchscript_archive, "TorchScript"),
    ("a storage record longer than its storage", a_storage_record_longer_than_its_storage,
     "holds 48 bytes, its storage is 16"),
]


def refusal(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    with pytest.raises(BadInput) as info, Checkpoint.open(path):
        pass
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@pytest.mark.parametrize(("attack", "rule"), [(attack, rule) for _, attack, rule in RULES],
                         ids=[name for name, _, _ in RULES])
def test_each_attack_is_refused_in_process_by_its_own_rule(
    attack: Callable[[], bytes], rule: str, tmp_path: Path
) -> None:
    assert rule in refusal(attack(), tmp_path)


# -- a real torch.save file with one field changed ------------------------------------------------


PAYLOAD = {"w": torch.arange(4.0), "b": torch.ones(3, dtype=torch.int64)}


def saved() -> bytes:
    """What torch.save writes (zip64 end records included)."""
    buf = io.BytesIO()
    torch.save(PAYLOAD, buf)
    return buf.getvalue()


def plain() -> bytes:
    """torch.save's records in an archive with only the 32-bit end record."""
    return layout_of(PAYLOAD).build()


def put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def central_entries(data: bytes) -> dict[bytes, int]:
    """Where the central directory entry of each record starts, by name."""
    *_, cd_size, cd_offset, _comment = EOCD.unpack(data[-22:])
    out, pos = {}, cd_offset
    while pos < cd_offset + cd_size:
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        out[data[pos + 46 : pos + 46 + nlen]] = pos
        pos += 46 + nlen + xlen + clen
    return out


def local_header(data: bytes, suffix: bytes) -> int:
    name, at = next((n, at) for n, at in central_entries(data).items() if n.endswith(suffix))
    return int(struct.unpack_from("<I", data, at + 42)[0])


def end_field(data: bytes, field: int, fmt: str, value: int) -> bytes:
    """``data`` with field ``field`` (a byte offset) of its end record set to ``value``."""
    return put(data, len(data) - 22 + field, fmt, value)


def zip64_field(data: bytes, field: int, fmt: str, value: int) -> bytes:
    """``data`` (torch.save's: zip64 end records always) with field ``field`` of its zip64 end record set."""
    return put(data, len(data) - 22 - 20 - 56 + field, fmt, value)


def locator_field(data: bytes, field: int, fmt: str, value: int) -> bytes:
    return put(data, len(data) - 22 - 20 + field, fmt, value)


def read_refusal(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    with pytest.raises(BadInput) as info:
        formats.read(path)
    return str(info.value)


def reads_as_torch_loads(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    with Checkpoint.open(path) as ckpt:
        ours = {k: v.clone() for k, v in ckpt.materialize().items()}
    theirs = torch.load(path, weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())


END_RECORD_LIES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("on disk 1", lambda d: end_field(d, 4, "<H", 1), "spans several disks"),
    ("directory on disk 1", lambda d: end_field(d, 6, "<H", 1), "spans several disks"),
    ("a count on this disk unlike the total", lambda d: end_field(d, 8, "<H", 3), "spans several disks"),
    ("a comment length with no comment", lambda d: end_field(d, 20, "<H", 3), "has a comment that does not end"),
    ("no records", lambda d: end_field(end_field(d, 8, "<H", 0), 10, "<H", 0), "holds no records"),
    ("more records than the directory can hold",
     lambda d: end_field(end_field(d, 8, "<H", 1000), 10, "<H", 1000), "1000 entries cannot fit"),
    ("a zip64 marker for the offset", lambda d: end_field(d, 16, "<I", 0xFFFFFFFF),
     "zip64 markers without zip64 end records"),
    ("a zip64 marker for the size", lambda d: end_field(d, 12, "<I", 0xFFFFFFFF),
     "zip64 markers without zip64 end records"),
    ("a zip64 marker for the count", lambda d: end_field(end_field(d, 8, "<H", 0xFFFF), 10, "<H", 0xFFFF),
     "zip64 markers without zip64 end records"),
]


@pytest.mark.parametrize(("lie", "rule"), [(lie, rule) for _, lie, rule in END_RECORD_LIES],
                         ids=[name for name, _, _ in END_RECORD_LIES])
def test_an_end_record_that_lies_is_refused_by_its_rule(
    lie: Callable[[bytes], bytes], rule: str, tmp_path: Path
) -> None:
    assert rule in read_refusal(lie(plain()), tmp_path)


def test_zip64_end_records_that_agree_are_read_as_torch_reads_them(tmp_path: Path) -> None:
    """torch.save's zip64 records, with the 32-bit fields equal to theirs or set to the 0xFFFF.. marker."""
    assert saved()[-42:-38] == b"PK\x06\x07"
    data = saved()
    reads_as_torch_loads(data, tmp_path)
    for field, fmt, marker in ((8, "<H", 0xFFFF), (10, "<H", 0xFFFF), (12, "<I", 0xFFFFFFFF),
                               (16, "<I", 0xFFFFFFFF)):
        data = end_field(data, field, fmt, marker)
    reads_as_torch_loads(data, tmp_path)


ZIP64_LIES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("a locator on disk 1", lambda d: locator_field(d, 4, "<I", 1), "zip64 locator spans several disks"),
    ("a locator counting 2 disks", lambda d: locator_field(d, 16, "<I", 2), "zip64 locator spans several disks"),
    ("a locator pointing 8 bytes early", lambda d: locator_field(d, 8, "<Q", len(d) - 22 - 20 - 56 - 8),
     "is not right before its locator"),
    ("a record of the wrong size", lambda d: zip64_field(d, 4, "<Q", 52), "zip64 end record is malformed"),
    ("a record needing version 4.6", lambda d: zip64_field(d, 14, "<H", 46), "zip64 end record is malformed"),
    ("a record without its signature", lambda d: zip64_field(d, 0, "<I", 0x06054B50),
     "zip64 end record is malformed"),
    ("a record on disk 1", lambda d: zip64_field(d, 16, "<I", 1), "zip64 end record spans several disks"),
    ("a record with its directory on disk 1", lambda d: zip64_field(d, 20, "<I", 1),
     "zip64 end record spans several disks"),
    ("a record counting fewer on this disk", lambda d: zip64_field(d, 24, "<Q", 1),
     "zip64 end record spans several disks"),
    ("a count unlike the 32-bit one", lambda d: zip64_field(zip64_field(d, 24, "<Q", 3), 32, "<Q", 3),
     "differs from its zip64 end record's"),
    ("a size unlike the 32-bit one", lambda d: zip64_field(d, 40, "<Q", 8), "differs from its zip64 end record's"),
    ("an offset unlike the 32-bit one", lambda d: zip64_field(d, 48, "<Q", 8), "differs from its zip64 end record's"),
]


@pytest.mark.parametrize(("lie", "rule"), [(lie, rule) for _, lie, rule in ZIP64_LIES],
                         ids=[name for name, _, _ in ZIP64_LIES])
def test_zip64_end_records_that_lie_are_refused_by_their_rule(
    lie: Callable[[bytes], bytes], rule: str, tmp_path: Path
) -> None:
    assert rule in read_refusal(lie(saved()), tmp_path)


def central_field(data: bytes, suffix: bytes, field: str, value: int) -> bytes:
    at = next(at for name, at in central_entries(data).items() if name.endswith(suffix))
    return put(data, at + CENTRAL_AT[field], "<I" if field in ("crc", "csize", "usize", "eattr", "offset") else "<H",
               value)


CENTRAL_LIES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("a record needing version 4.6", lambda d: central_field(d, b"data/0", "needed", 46),
     "needs zip features torch does not write"),
    ("an encrypted record", lambda d: central_field(d, b"data/0", "flags", 0x0809),
     "needs zip features torch does not write (flags 0x0809)"),
    ("a deflated record", lambda d: central_field(d, b"data/0", "method", 8), "is compressed (method 8)"),
    ("a record on disk 1", lambda d: central_field(d, b"data/0", "disk", 1), "another disk or the directory attribute"),
    ("a directory", lambda d: central_field(d, b"data/0", "eattr", 0x10), "another disk or the directory attribute"),
    ("a compressed size unlike the size", lambda d: central_field(d, b"data/0", "csize", 17),
     "record 'archive/data/0' has inconsistent sizes"),
    ("a zip64 size marker without its field", lambda d: central_field(d, b"data/0", "usize", 0xFFFFFFFF),
     "is 0xFFFFFFFF but no zip64 field gives it"),
    ("a CRC unlike the data descriptor's", lambda d: central_field(d, b"data/0", "crc", 0x12345678),
     "its data descriptor says"),
]


@pytest.mark.parametrize(("lie", "rule"), [(lie, rule) for _, lie, rule in CENTRAL_LIES],
                         ids=[name for name, _, _ in CENTRAL_LIES])
def test_a_directory_entry_that_lies_is_refused_by_its_rule(
    lie: Callable[[bytes], bytes], rule: str, tmp_path: Path
) -> None:
    """Each field of torch.save's own entry for a tensor record, changed."""
    assert rule in read_refusal(lie(saved()), tmp_path)


def local_field(data: bytes, suffix: bytes, field: str, value: int) -> bytes:
    return put(data, local_header(data, suffix) + LOCAL_AT[field], "<H" if field in ("needed", "flags", "method")
               else "<I", value)


def descriptor_field(data: bytes, suffix: bytes, index: int, value: int) -> bytes:
    """Field ``index`` (1: CRC, 2: compressed size, 3: size) of the record's data descriptor."""
    at = local_header(data, suffix)
    nlen, xlen = struct.unpack_from("<HH", data, at + 26)
    size = next(len(r.data) for r in layout_of(PAYLOAD).recs if r.name.endswith(suffix))
    return put(data, at + 30 + nlen + xlen + size + 4 * index, "<I", value)


LOCAL_LIES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("needing version 4.6", lambda d: local_field(d, b"data/0", "needed", 46), "its local header asks for"),
    ("deflated", lambda d: local_field(d, b"data/0", "method", 8), "its local header asks for"),
    ("encrypted", lambda d: local_field(d, b"data/0", "flags", 0x0809), "its local header asks for"),
    ("without the data descriptor flag", lambda d: local_field(d, b"data/0", "flags", 0x0800),
     "the central directory says 16 bytes"),
    ("with a CRC of its own", lambda d: local_field(d, b"data/0", "crc", 1), "the central directory says 16 bytes"),
    ("naming another record", lambda d: local_name(d, b"data/0", b"archive/data/9"),
     "its local header names 'archive/data/9'"),
    ("a data descriptor with another CRC", lambda d: descriptor_field(d, b"data/0", 1, 1), "its data descriptor says"),
    ("a data descriptor with another size", lambda d: descriptor_field(d, b"data/0", 3, 12),
     "its data descriptor says 12 bytes"),
    ("a data descriptor with another compressed size", lambda d: descriptor_field(d, b"data/0", 2, 12),
     "its data descriptor says"),
]


def local_name(data: bytes, suffix: bytes, name: bytes) -> bytes:
    at = local_header(data, suffix)
    nlen = struct.unpack_from("<H", data, at + 26)[0]
    assert len(name) == nlen
    return data[: at + 30] + name + data[at + 30 + nlen :]


@pytest.mark.parametrize(("lie", "rule"), [(lie, rule) for _, lie, rule in LOCAL_LIES],
                         ids=[name for name, _, _ in LOCAL_LIES])
def test_a_local_header_that_lies_is_refused_by_its_rule(
    lie: Callable[[bytes], bytes], rule: str, tmp_path: Path
) -> None:
    """torch.save's own local header (and data descriptor) of a tensor record, one field changed."""
    assert rule in read_refusal(lie(saved()), tmp_path)


def with_record(**knobs: object) -> Callable[[], bytes]:
    """torch.save's records with the tensor record's headers changed by zipcraft ``knobs``."""

    def build() -> bytes:
        layout = layout_of(PAYLOAD)
        r = next(r for r in layout.recs if r.name.endswith(b"data/0"))
        for knob, value in knobs.items():
            setattr(r, knob, value)
        return layout.build()

    return build


def field(tag: int, body: bytes) -> bytes:
    return struct.pack("<HH", tag, len(body)) + body


EXTRA_FIELD_LIES: list[tuple[str, Callable[[], bytes], str]] = [
    ("a timestamp field in a local header", with_record(local_extra=field(0x5455, b"\x01" + bytes(4))),
     "an extra field of type 0x5455, which torch does not write"),
    ("two padding fields in a local header", with_record(local_extra=field(0x4246, bytes(4)) * 2),
     "two extra fields of type 0x4246"),
    ("a local extra field cut short", with_record(local_extra=b"\x01\x00\x08"), "its extra field is malformed"),
    ("a local extra field longer than it is", with_record(local_extra=struct.pack("<HH", 0x4246, 9) + bytes(4)),
     "its extra field runs past its end"),
    ("a padding field in the directory", with_record(central_extra=field(0x4246, bytes(4))),
     "an extra field of type 0x4246, which torch does not write"),
    ("a zip64 field for no marker in the directory", with_record(central_extra=field(1, struct.pack("<Q", 16))),
     "its zip64 field does not match the fields it replaces"),
    ("a comment in the directory", with_record(comment=b"hello"), "has a comment, another disk or the directory"),
    ("a local zip64 field too short for its markers", with_record(
        local_fields=(0, 0xFFFFFFFF, 0xFFFFFFFF), local_extra=field(1, struct.pack("<Q", 16))),
     "its zip64 field does not match the fields it replaces"),
    ("local zip64 sizes that differ", with_record(
        local_fields=(0, 0xFFFFFFFF, 0xFFFFFFFF), local_extra=field(1, struct.pack("<QQ", 16, 17))),
     "its local header has inconsistent sizes"),
]


@pytest.mark.parametrize(("build", "rule"), [(build, rule) for _, build, rule in EXTRA_FIELD_LIES],
                         ids=[name for name, _, _ in EXTRA_FIELD_LIES])
def test_an_extra_field_torch_does_not_write_is_refused_by_its_rule(
    build: Callable[[], bytes], rule: str, tmp_path: Path
) -> None:
    assert rule in read_refusal(build(), tmp_path)


def test_the_extra_fields_torch_and_zip64_writers_write_are_read(tmp_path: Path) -> None:
    """A local header's padding field, or its sizes in a zip64 field (longer than the markers need,
    as zip64 writers write it), are read as torch reads them."""
    reads_as_torch_loads(with_record(local_extra=field(0x4246, bytes(20)))(), tmp_path)
    size = next(len(r.data) for r in layout_of(PAYLOAD).recs if r.name.endswith(b"data/0"))
    crc = next(r.crc for r in layout_of(PAYLOAD).recs if r.name.endswith(b"data/0"))
    zip64 = field(1, struct.pack("<QQ", size, size))
    reads_as_torch_loads(with_record(local_fields=(crc, 0xFFFFFFFF, 0xFFFFFFFF), local_extra=zip64)(), tmp_path)
    padding = field(0x4246, bytes(8))
    for extra in (zip64 + padding, padding + zip64, padding + field(1, b"")):
        reads_as_torch_loads(with_record(local_fields=(crc, 0xFFFFFFFF, 0xFFFFFFFF) if len(extra) > 16 else None,
                                         local_extra=extra)(), tmp_path)


def test_a_directory_entry_with_its_sizes_and_offset_in_a_zip64_field_is_read(tmp_path: Path) -> None:
    """All three of an entry's 32-bit fields set to the marker, their values in its zip64 field, in order."""
    data = with_record()()
    size = next(len(r.data) for r in layout_of(PAYLOAD).recs if r.name.endswith(b"data/0"))
    offset = local_header(data, b"data/0")
    data = with_record(central_extra=field(1, struct.pack("<QQQ", size, size, offset)))()
    for name in ("usize", "csize", "offset"):
        data = central_field(data, b"data/0", name, 0xFFFFFFFF)
    reads_as_torch_loads(data, tmp_path)


def with_version(text: bytes, name: bytes = b"archive/version") -> bytes:
    layout = layout_of(PAYLOAD)
    r = next(r for r in layout.recs if r.name.endswith(b"/version"))
    r.name, r.data = name, text
    return layout.build()


def torch_loads(data: bytes, tmp_path: Path) -> bool:
    path = tmp_path / "torch.pt"
    path.write_bytes(data)
    try:
        torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal
        return False
    return True


def ckptmigrate_reads(data: bytes, tmp_path: Path) -> bool:
    path = tmp_path / "ours.pt"
    path.write_bytes(data)
    try:
        formats.read(path)
    except BadInput as exc:
        assert "no archive version torch reads" in str(exc)
        return False
    return True


VERSION_TEXTS = {"1": b"1", "3 and a newline": b"3\n", "a space, a plus sign and 3": b" +3\n",
                 "a tab and 10x": b"\t10x", "10": b"10", "0": b"0", "11": b"11", "-3": b"-3", "a plus sign": b"+",
                 "x3": b"x3"}


@pytest.mark.parametrize("text", VERSION_TEXTS.values(), ids=VERSION_TEXTS.keys())
def test_the_archive_version_is_read_as_torch_reads_it(text: bytes, tmp_path: Path) -> None:
    """torch reads the version record's leading integer and refuses one outside the versions it knows."""
    data = with_version(text)
    assert ckptmigrate_reads(data, tmp_path) == torch_loads(data, tmp_path)


def test_the_version_record_is_looked_for_where_newer_torch_writes_it_too(tmp_path: Path) -> None:
    reads_as_torch_loads(with_version(b"3\n", b"archive/.data/version"), tmp_path)
    assert "has no version record" in read_refusal(with_version(b"3\n", b"archive/versions"), tmp_path)


def with_record_data(suffix: bytes, data: bytes, *, crc: int | None = None) -> bytes:
    """torch.save's records with one record's bytes replaced (its CRC in both headers: ``crc``, else theirs)."""
    layout = layout_of(PAYLOAD)
    r = next(r for r in layout.recs if r.name.endswith(suffix))
    r.data = data
    if crc is not None:
        r.local_fields = (crc, len(data), len(data))
    return layout.build()


def test_the_records_torch_reads_first_are_checked_as_torch_checks_them(tmp_path: Path) -> None:
    assert "byteorder record" in read_refusal(with_record_data(b"byteorder", b"big"), tmp_path)
    assert ".storage_alignment record is not a number" in read_refusal(
        with_record_data(b".storage_alignment", b"sixty-four"), tmp_path)
    reads_as_torch_loads(with_record_data(b".storage_alignment", b"64\n"), tmp_path)


@pytest.mark.parametrize("suffix", [
    b"/version", b"/byteorder", b".format_version", b".data/serialization_id",
    b".storage_alignment",
])
def test_a_record_torch_reads_first_with_a_wrong_crc_is_refused(suffix: bytes, tmp_path: Path) -> None:
    """A flipped byte in a small record torch checks before the payload (both headers keep the old CRC)."""
    layout = layout_of(PAYLOAD)
    r = next(r for r in layout.recs if r.name.endswith(suffix))
    flipped = bytes([r.data[0] ^ 0x01]) + r.data[1:]
    data = with_record_data(suffix, flipped, crc=r.crc)
    data = central_field(data, suffix, "crc", r.crc)
    assert f"{r.name.decode()}' fails its CRC check" in read_refusal(data, tmp_path)


def with_layout(**knobs: object) -> bytes:
    layout = layout_of(PAYLOAD)
    for knob, value in knobs.items():
        setattr(layout, knob, value)
    return layout.build()


def test_names_that_miniz_and_zipfile_could_read_two_ways_are_refused(tmp_path: Path) -> None:
    layout = layout_of(PAYLOAD)
    layout.recs.append(Rec(b"archive/data/0", b"\x00" * 16))
    assert "record 'archive/data/0' appears twice" in read_refusal(layout.build(), tmp_path)
    layout = layout_of(PAYLOAD)
    layout.recs.insert(1, Rec(b"", b"x"))
    assert "has an empty name" in read_refusal(layout.build(), tmp_path)


def test_what_is_not_a_whole_zip_archive_is_refused_by_its_rule(tmp_path: Path) -> None:
    data = plain()
    assert "too short to be a zip archive" in read_refusal(data[:97], tmp_path)
    assert "no end-of-central-directory record: it is truncated" in read_refusal(data[:98], tmp_path)
    assert "no end-of-central-directory record: it is truncated" in read_refusal(data[:-10], tmp_path)
    path = tmp_path / "junk.pt"  # not sniffed as a zip by formats.read: the archive reader itself
    path.write_bytes(b"\x00" * 4 + data[4:])
    with open(path, "rb") as fh, pytest.raises(zipread.ZipFormatError, match="does not start with a zip local header"):
        zipread.read_archive(fh.fileno(), len(data))


def test_zero_padding_of_less_than_a_page_before_the_directory_is_read_more_is_refused(tmp_path: Path) -> None:
    """ckptmigrate pads to a page before a directory it appends; anything else there is unexplained."""
    reads_as_torch_loads(with_layout(before_directory=bytes(4095)), tmp_path)
    assert "are not the padding before a central directory" in read_refusal(
        with_layout(before_directory=bytes(4096)), tmp_path)
    assert "are not the padding before a central directory" in read_refusal(
        with_layout(before_directory=bytes(10) + b"hidden"), tmp_path)


def test_a_directory_larger_than_the_bound_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """The directory is read whole: one claiming more than MAX_DIRECTORY bytes is refused from the end
    record alone (a sparse file whose end record says so)."""
    data = plain()
    sig, disk, cd_disk, n_disk, n, _size, cd_offset, comment = EOCD.unpack(data[-22:])
    eocd = cd_offset + zipdirectory.MAX_DIRECTORY + 1
    path = tmp_path / "model.pt"
    with open(path, "wb") as fh:
        fh.write(data[:-22])
        fh.seek(eocd)
        fh.write(EOCD.pack(sig, disk, cd_disk, n_disk, n, zipdirectory.MAX_DIRECTORY + 1, cd_offset, comment))
    with pytest.raises(BadInput, match="is more than ckptmigrate reads"):
        formats.read(path)


# -- safetensors: a header that lies ------------------------------------------------------------------


def safetensors_parts() -> tuple[dict[str, Any], bytes]:
    """(header, data section) of what the safetensors library writes for two tensors and metadata."""
    raw = safetensors.torch.save({"a": torch.arange(4.0), "b": torch.ones(3, dtype=torch.int64)},
                                 metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def safetensors_with(change: Callable[[dict[str, Any]], object] | None = None, *, header: bytes | None = None,
                     data: Callable[[bytes], bytes] = lambda d: d) -> bytes:
    parsed, section = safetensors_parts()
    if change is not None:
        change(parsed)
    text = json.dumps(parsed).encode() if header is None else header
    return struct.pack("<Q", len(text)) + text + data(section)


def set_in(entry: str, key: str, value: object) -> Callable[[dict[str, Any]], object]:
    return lambda h: h[entry].__setitem__(key, value)


def span(h: dict[str, Any], name: str) -> list[int]:
    return list(h[name]["data_offsets"])


def in_order() -> list[str]:
    """The tensors in the order of their bytes in the data section."""
    header, _ = safetensors_parts()
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: span(header, k))


SAFETENSORS_LIES: list[tuple[str, bytes | Callable[[], bytes], str]] = [
    ("header not JSON", lambda: safetensors_with(header=b"{not json"), "header is not valid JSON"),
    ("header not UTF-8", lambda: safetensors_with(header=b'{"\xff":1}'), "header is not valid JSON"),
    ("header nested too deeply", lambda: safetensors_with(header=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
     "header is nested too deeply"),
    ("metadata of a number", lambda: safetensors_with(lambda h: h["__metadata__"].__setitem__("epochs", 3)),
     "__metadata__ must map strings to strings"),
    ("metadata a list of strings", lambda: safetensors_with(lambda h: h.__setitem__("__metadata__", ["a"])),
     "__metadata__ must map strings to strings"),
    ("an unknown dtype", lambda: safetensors_with(set_in("a", "dtype", "F33")), "'a' has a malformed header entry"),
    ("no dtype", lambda: safetensors_with(lambda h: h["a"].pop("dtype")), "'a' has a malformed header entry"),
    ("a shape of a number", lambda: safetensors_with(set_in("a", "shape", 4)), "'a' has a malformed header entry"),
    ("three offsets", lambda: safetensors_with(set_in("a", "data_offsets", [0, 8, 16])),
     "'a' has a malformed header entry"),
    ("a negative dimension", lambda: safetensors_with(set_in("a", "shape", [-4])), "'a' has an invalid shape [-4]"),
    ("a fractional dimension", lambda: safetensors_with(set_in("a", "shape", [4.0])), "'a' has an invalid shape"),
    ("offsets backwards", lambda: safetensors_with(lambda h: h["a"].__setitem__("data_offsets", span(h, "a")[::-1])),
     "'a' has offsets"),
    ("a negative offset", lambda: safetensors_with(set_in("a", "data_offsets", [-1, 15])), "'a' has offsets"),
    ("an offset as a string", lambda: safetensors_with(lambda h: h["a"].__setitem__(
        "data_offsets", [str(span(h, "a")[0]), span(h, "a")[1]])), "'a' has offsets"),
    ("an end past the data", lambda: safetensors_with(lambda h: h["a"].__setitem__(
        "data_offsets", [span(h, "a")[0], span(h, "a")[1] + 1])), "'a' has offsets"),
    ("a shape its bytes do not hold", lambda: safetensors_with(set_in("a", "shape", [2])),
     "'a': offsets do not match its shape and dtype"),
    ("a dtype its bytes do not hold", lambda: safetensors_with(set_in("a", "dtype", "F64")),
     "'a': offsets do not match its shape and dtype"),
    ("bytes no tensor uses before the first", lambda: safetensors_with(
        lambda h: [h[k].__setitem__("data_offsets", [b + 8, e + 8]) for k in ("a", "b") for b, e in [span(h, k)]],
        data=lambda d: bytes(8) + d),
     f"the data section starts with 8 bytes no tensor uses (before {in_order()[0]!r})"),
    ("two tensors overlapping", lambda: safetensors_with(lambda h: h[in_order()[1]].__setitem__(
        "data_offsets", [x - 4 for x in span(h, in_order()[1])]), data=lambda d: d[:-4]),
     f"tensors {in_order()[0]!r} and {in_order()[1]!r} overlap in the data section"),
    ("a gap between two tensors", lambda: safetensors_with(lambda h: h[in_order()[1]].__setitem__(
        "data_offsets", [x + 8 for x in span(h, in_order()[1])]), data=lambda d: d + bytes(8)),
     f"a gap of 8 bytes no tensor uses between tensors {in_order()[0]!r} and {in_order()[1]!r}"),
    ("bytes after the last tensor", lambda: safetensors_with(data=lambda d: d + bytes(3)),
     "holds 3 bytes after the last tensor"),
]


@pytest.mark.parametrize(("build", "rule"), [(build, rule) for _, build, rule in SAFETENSORS_LIES],
                         ids=[name for name, _, _ in SAFETENSORS_LIES])
def test_a_safetensors_header_that_lies_is_refused_by_its_rule(
    build: Callable[[], bytes], rule: str, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(build())
    with pytest.raises(BadInput) as info:
        formats.read(path)
    assert rule in str(info.value)


def test_what_the_sniffer_lets_through_is_still_checked_by_the_safetensors_reader(tmp_path: Path) -> None:
    """formats.read sniffs 8 bytes and a ``{`` first; the reader itself (which the sharded and remote
    readers call too) refuses a file shorter than its length field, a header longer than the file or
    the limit, and a header that is not an object."""
    cases = {
        b"\x02\x00\x00": "shorter than a safetensors header",
        struct.pack("<Q", 3) + b"[1]": "header is not a JSON object",
        struct.pack("<Q", 3) + b"{}": "header length 3 is larger than the file",
        struct.pack("<Q", safetensors_io.MAX_HEADER + 1) + b"{}": "exceeds the limit of 100,000,000 bytes",
        struct.pack("<Q", (1 << 64) - 1) + b"{}": "exceeds the limit of 100,000,000 bytes",
    }
    for raw, rule in cases.items():
        path = tmp_path / "model.safetensors"
        path.write_bytes(raw)
        with closing(Source(path)) as source, pytest.raises(safetensors_io.SafetensorsFormatError, match=rule):
            safetensors_io.read(source)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(safetensors.torch.save({}))  # a header that fills the file: no tensors
    with closing(Source(empty)) as source:
        tensors, envelope, metadata, _ = safetensors_io.read(source)
    assert (dict(tensors), envelope, metadata) == ({}, None, {})


def test_the_envelope_in_a_safetensors_header_is_read_or_refused_by_its_rule(tmp_path: Path) -> None:
    """The envelope is one JSON object in a string under __metadata__["ckptmigrate"]; ``read`` and the
    quick ``read_envelope`` (what ``current`` reads) give it back or refuse it the same way."""
    envelope = {"revision": "0002", "tags": {"a": "b"}}

    def read_both(metadata: object) -> list[object]:
        path = tmp_path / "model.safetensors"
        path.write_bytes(safetensors_with(lambda h: h.__setitem__("__metadata__", metadata)))
        out: list[object] = []
        for read in (lambda s: safetensors_io.read(s)[1], safetensors_io.read_envelope):
            with closing(Source(path)) as source:
                try:
                    out.append(read(source))
                except safetensors_io.SafetensorsFormatError as exc:
                    out.append(str(exc))
        return out

    assert read_both({"format": "pt", "ckptmigrate": json.dumps(envelope)}) == [envelope, envelope]
    assert read_both({"format": "pt"}) == [None, None]
    assert read_both({}) == [None, None]
    not_an_object = read_both({"ckptmigrate": "[1]"})
    assert not_an_object == ["the ckptmigrate envelope in __metadata__ is not a JSON object"] * 2
    too_deep = read_both({"ckptmigrate": "[" * 10_000 + "]" * 10_000})
    assert all("the ckptmigrate envelope in __metadata__ is refused" in str(m) for m in too_deep), too_deep
    not_a_string = read_both({"ckptmigrate": {"revision": "0002"}})
    assert "must map strings to strings" in str(not_a_string[0])
    assert not_a_string[1] == "the ckptmigrate envelope in __metadata__ is not a string"


# -- the pickle scan: what the C unpickler must not be handed ------------------------------------------


def nested(depth: int, leaf: object = 1, width: int = 1) -> object:
    """A tuple ``depth`` deep; ``width`` 2 or 3 nests through (t, 1) or (t, 1, 2)."""
    value = leaf
    for _ in range(depth):
        value = (value, 1, 2)[:width]
    return value


def scan_verdict(data: bytes) -> str | None:
    try:
        pickle_scan.scan(data)
    except pickle_scan.PickleFormatError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_tuples_nested_deeper_than_the_bound_are_refused_by_every_opcode_that_builds_them(
    protocol: int, width: int
) -> None:
    """Protocol 0 and 1 build tuples with MARK ... TUPLE, later ones with TUPLE1..3; each is followed."""
    deepest = pickle.dumps(nested(pickle_scan.MAX_DEPTH, width=width), protocol=protocol)
    too_deep = pickle.dumps(nested(pickle_scan.MAX_DEPTH + 1, width=width), protocol=protocol)
    assert scan_verdict(deepest) is None
    assert scan_verdict(too_deep) == f"the pickle nests tuples more than {pickle_scan.MAX_DEPTH} deep"


def visits(value: object, cache: dict[int, int] | None = None) -> int:
    """How many elements hashing ``value`` visits: every element of every tuple in it, shared or not."""
    cache = {} if cache is None else cache
    if not isinstance(value, tuple):
        return 1
    if id(value) not in cache:
        cache[id(value)] = 1 + sum(visits(item, cache) for item in value)
    return cache[id(value)]


def shared(levels: int) -> tuple[object, ...]:
    value: tuple[object, ...] = (1,)
    for _ in range(levels):
        value = (value, value)
    return value


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_tuples_shared_so_often_that_hashing_one_visits_over_the_bound_are_refused(protocol: int) -> None:
    """``t = (t, t)`` twenty times is 200 bytes of pickle and a million elements to hash."""
    levels = next(n for n in range(64) if visits(shared(n)) > pickle_scan.MAX_SHARED_VISITS)
    below, above = pickle.dumps(shared(levels - 1), protocol=protocol), pickle.dumps(shared(levels), protocol=protocol)
    assert scan_verdict(below) is None
    assert scan_verdict(above) is not None and "the pickle shares tuples so often" in scan_verdict(above)


def test_the_scan_follows_tuples_through_the_memo() -> None:
    """A tuple put in the memo and got back keeps its depth (a get is no fresh start)."""
    deep = nested(pickle_scan.MAX_DEPTH)
    assert scan_verdict(pickle.dumps([deep, (deep,)], protocol=2)) is not None
    assert scan_verdict(pickle.dumps([deep, deep], protocol=2)) is None


PROTO2 = b"\x80\x02"
MEMO_PUTS = {
    "BINPUT": lambda i: b"q" + bytes([i]), "LONG_BINPUT": lambda i: b"r" + struct.pack("<I", i),
    "PUT": lambda i: b"p" + str(i).encode() + b"\n",
}


@pytest.mark.parametrize("put", MEMO_PUTS.values(), ids=MEMO_PUTS.keys())
def test_a_memo_index_past_the_opcodes_read_is_refused(put: Callable[[int], bytes]) -> None:
    """The unpickler grows its memo to twice the index: ``LONG_BINPUT 2**31`` asks for 32 GiB."""
    ops = 3  # PROTO, EMPTY_LIST, the put
    assert scan_verdict(PROTO2 + b"]" + put(ops) + b".") is None
    refused = scan_verdict(PROTO2 + b"]" + put(200) + b".")
    assert refused == f"the pickle stores memo entry 200 after {ops:,} opcodes"


ARGUMENTS = {
    "BINUNICODE": b"X" + struct.pack("<I", 1 << 30) + b"abc",
    "BINBYTES": b"B" + struct.pack("<I", 1 << 30) + b"abc",
    "BINBYTES8": b"\x8e" + struct.pack("<Q", 1 << 40) + b"abc",
    "SHORT_BINBYTES": b"C" + bytes([200]) + b"abc",
    "BINSTRING": b"T" + struct.pack("<i", 1 << 30) + b"abc",
}


@pytest.mark.parametrize("argument", ARGUMENTS.values(), ids=ARGUMENTS.keys())
def test_an_argument_longer_than_the_bytes_left_is_refused_before_it_is_allocated(argument: bytes) -> None:
    verdict = scan_verdict(PROTO2 + b"](" + argument + b"e.")
    assert verdict is not None and verdict.startswith("the pickle is truncated")


def test_the_pickles_python_and_torch_write_are_accepted() -> None:
    """Every protocol, memo puts past 255 (LONG_BINPUT), shared and nested values within the bounds."""
    values = [str(i) for i in range(300)]
    payload = {"values": values, "again": values, "nested": nested(50), "shared": shared(10), "bytes": b"x" * 300}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert scan_verdict(pickle.dumps(payload, protocol=protocol)) is None, protocol
    buf = io.BytesIO()
    torch.save({f"layer{i}.weight": torch.ones(2, 3) for i in range(300)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        data_pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert scan_verdict(data_pkl) is None


# -- the verdict on a file's pickles, as `inspect --json` reports it ------------------------------------


def test_the_pickle_verdict_reports_the_fields_the_readme_documents(tmp_path: Path) -> None:
    """`inspect --json` gives ``pickle.weights_only``, ``pickle.unsafe_globals`` and ``pickle.called``
    (README); torch's own verdict on the same files decides weights_only."""
    safe, unsafe = tmp_path / "safe.pt", tmp_path / "unsafe.pt"
    torch.save({"w": torch.ones(2), "classes": {1, 2}}, safe)
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1), "kind": argparse.ArgumentParser}, unsafe)
    for path in (safe, unsafe):
        with Checkpoint.open(path) as ckpt:
            verdict = ckpt.pickle_safety().to_dict()
        torch_says = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        assert verdict["weights_only"] is (not torch_says)
        assert verdict["unsafe_globals"] == torch_says
        assert set(verdict) == {"weights_only", "unsafe_globals", "called"}
        assert verdict["called"] == (["argparse.Namespace"] if torch_says else [])


# -- what an in-place append leaves behind -------------------------------------------------------------


def appended(tmp_path: Path) -> tuple[Path, int]:
    """A torch.save file after one in-place rename by ckptmigrate (its old data.pkl, directory and end
    records superseded), and where the superseded end record starts."""
    path = tmp_path / "model.pt"
    torch.save(PAYLOAD, path)
    first_end = path.stat().st_size
    with Checkpoint.open(path) as ckpt:
        ckpt.rename("w", "v")
        ckpt.write(path, None)
    reads_as_torch_loads(path.read_bytes(), tmp_path)
    return path, first_end - 22


def test_a_superseded_directory_must_describe_records_that_precede_it(tmp_path: Path) -> None:
    path, old_end = appended(tmp_path)
    raw = bytearray(path.read_bytes())
    *_, cd_size, cd_offset, _comment = EOCD.unpack(raw[old_end : old_end + 22])
    first = raw.index(b"PK\x01\x02", cd_offset)  # the superseded entry of the old data.pkl, at offset 0
    assert raw[first + 46 :].startswith(b"model/data.pkl")
    for offset in (local_header(bytes(raw), b".format_version"), 1):  # another record's header, or none
        struct.pack_into("<I", raw, first + 42, offset)
        assert "where no such record precedes it" in read_refusal(bytes(raw), tmp_path)


def test_a_superseded_record_is_held_to_the_rules_of_a_listed_one(tmp_path: Path) -> None:
    path, _old_end = appended(tmp_path)
    raw = path.read_bytes()
    nlen = struct.unpack_from("<H", raw, 26)[0]
    old_name = raw[30 : 30 + nlen]  # the superseded data.pkl, at offset 0
    folder = old_name.split(b"/")[0]
    outside = raw[:30] + b"x" * len(folder) + old_name[len(folder) :] + raw[30 + nlen :]
    assert "a superseded record at offset 0" in read_refusal(outside, tmp_path)
    assert "is outside the archive folder" in read_refusal(outside, tmp_path)
    descriptor = raw.index(b"PK\x07\x08")  # the superseded data.pkl's data descriptor
    unexplained = raw[:descriptor] + bytes(4) + raw[descriptor + 4 :]
    assert "has no data descriptor: bytes the archive does not explain" in read_refusal(unexplained, tmp_path)


def with_superseded_directory(padding: int = 0, appended: bool = True) -> bytes:
    """torch.save's records, ``padding`` zero bytes, their directory and end record (now superseded),
    then — as an in-place write appends — a new ``data.pkl`` (unless not ``appended``: a write that
    changed only the directory) and the live directory listing it with the old records."""
    old = with_layout(before_directory=bytes(padding))
    offsets, at = {}, 0
    for r in layout_of(PAYLOAD).recs:
        offsets[r.name] = (at, r.data)
        at += 30 + len(r.name) + len(r.data)
    out = bytearray(old)
    if appended:
        pkl = next(r for r in layout_of(PAYLOAD).recs if r.name.endswith(b"data.pkl"))
        offsets[pkl.name] = (len(out), pkl.data)
        out += zipcraft.LOCAL.pack(0x04034B50, 20, 0, 0, 0, 0, pkl.crc, len(pkl.data), len(pkl.data),
                                   len(pkl.name), 0) + pkl.name + pkl.data
    cd = b"".join(zipcraft.central_entry(name, data, offset) for name, (offset, data) in offsets.items())
    cd_at = len(out)
    out += cd + EOCD.pack(0x06054B50, 0, 0, len(offsets), len(offsets), len(cd), cd_at, 0)
    return bytes(out)


def test_zero_padding_before_a_superseded_directory_and_a_directory_only_append_are_read(tmp_path: Path) -> None:
    reads_as_torch_loads(with_superseded_directory(), tmp_path)
    reads_as_torch_loads(with_superseded_directory(padding=100), tmp_path)
    reads_as_torch_loads(with_superseded_directory(appended=False), tmp_path)


def test_padding_that_ends_inside_the_directory_is_refused(tmp_path: Path) -> None:
    """Zeros then as many other bytes as the first directory entry: the zeros must reach the directory."""
    first_entry = 46 + len(layout_of(PAYLOAD).recs[0].name)
    assert "are not the padding before a central directory" in read_refusal(
        with_layout(before_directory=bytes(10) + b"j" * first_entry), tmp_path)


def test_a_superseded_directory_is_held_to_the_rules_of_the_live_one(tmp_path: Path) -> None:
    data = with_superseded_directory()
    old_cd = EOCD.unpack(with_layout()[-22:])[6]
    name_at = old_cd + 46  # the superseded entry of the first record
    outside = data[:name_at] + b"x" * len(b"archive") + data[name_at + len(b"archive") :]
    refusal = read_refusal(outside, tmp_path)
    assert "the superseded end record at offset" in refusal and "is outside the archive folder" in refusal


def test_a_large_state_dict_appended_in_place_is_read_through_its_superseded_directory(tmp_path: Path) -> None:
    """Two thousand records: the superseded directory is read in more than one window."""
    path = tmp_path / "model.pt"
    torch.save({f"layers.{i}.weight": torch.full((2,), float(i)) for i in range(2000)}, path)
    with Checkpoint.open(path) as ckpt:
        ckpt.rename("layers.0.weight", "layers.0.w")
        ckpt.write(path, None)
    reads_as_torch_loads(path.read_bytes(), tmp_path)


def archive_refusal(data: bytes, tmp_path: Path) -> str:
    """The zip reader's own refusal (the readers of remote and multi-file checkpoints call it too)."""
    path = tmp_path / "archive.pt"
    path.write_bytes(data)
    with open(path, "rb") as fh, pytest.raises(zipread.ZipFormatError) as info:
        zipread.read_archive(fh.fileno(), len(data))
    return str(info.value)


def test_the_zip_reader_itself_refuses_what_torch_would_not_load_as_a_checkpoint(tmp_path: Path) -> None:
    layout = layout_of(PAYLOAD)
    layout.recs.insert(1, Rec(b"archive/constants.pkl", b"\x80\x02)."))
    assert archive_refusal(layout.build(), tmp_path).startswith("a TorchScript archive (constants.pkl)")
    assert archive_refusal(with_version(b"3", b"archive/versions"), tmp_path).startswith(
        "the archive has no version record, which torch requires")
    assert archive_refusal(with_record_data(b"byteorder", b"big"), tmp_path).startswith(
        "the byteorder record is not 'little'")
    assert archive_refusal(with_record_data(b".storage_alignment", b"x"), tmp_path).startswith(
        "the .storage_alignment record is not a number")


def test_record_lookups_ignore_ascii_case_both_ways(tmp_path: Path) -> None:
    """miniz finds a record under any case of its name; so do the entries the reader returns."""
    path = tmp_path / "model.pt"
    path.write_bytes(with_version(b"3\n", b"archive/VERSION"))
    entries = formats.read(path).records
    assert entries.get("ARCHIVE/DATA.PKL") is entries["archive/data.pkl"] is entries["Archive/Data.pkl"]
    assert entries.get("archive/version") is entries["archive/VERSION"] and "ARCHIVE/VERSION" in entries
    assert entries.get("archive/nothing", "absent") == "absent" and 1 not in entries


@pytest.mark.parametrize("size", [0, 100, 65533, 65534, 65535, 65536, 65537, 300_000])
def test_a_superseded_record_sized_by_its_data_descriptor_is_read_whatever_its_size(size: int, tmp_path: Path) -> None:
    """A record no directory lists, its sizes left to its data descriptor (torch.save's way), found by
    scanning its data in growing chunks: the descriptor may sit on a chunk boundary or across one, and
    the data may hold the descriptor's signature itself (a descriptor that does not fit is skipped)."""
    data = (b"PK\x07\x08" + struct.pack("<III", 0, 1, 1) + bytes(size))[:size]
    crc = zlib.crc32(data)
    old = Rec(b"archive/old", data, flags=0x0008, local_fields=(0, 0, 0), central=False,
              after=struct.pack("<IIII", 0x08074B50, crc, size, size))
    layout = layout_of(PAYLOAD)
    layout.recs.insert(1, old)
    reads_as_torch_loads(layout.build(), tmp_path)
    layout.recs.insert(1, Rec(b"archive/before", bytes(3 << 20)))  # the record 3 MiB into the file
    reads_as_torch_loads(layout.build(), tmp_path)
    old.after = struct.pack("<IIII", 0x08074B50, crc, size + 1, size + 1)  # a descriptor that does not fit
    assert "has no data descriptor: bytes the archive does not explain" in read_refusal(layout.build(), tmp_path)


# -- torch's own layout (the padding field) is read on a fast path: it must refuse what the slow one does --

FB = field(0x4246, bytes(8))  # the padding field torch writes in every local header
W = next(r for r in layout_of(PAYLOAD).recs if r.name.endswith(b"data/0"))


def claiming(size: int) -> Callable[[], bytes]:
    """The last record, with torch's padding field, claiming ``size`` bytes in both headers."""

    def build() -> bytes:
        layout = layout_of(PAYLOAD)
        last = layout.recs[-1]
        last.local_extra, last.local_fields = FB, (last.crc, size, size)
        data = layout.build()
        suffix = last.name[-8:]
        return central_field(central_field(data, suffix, "csize", size), suffix, "usize", size)

    return build


FAST_PATH_LIES: list[tuple[str, Callable[[], bytes], str]] = [
    ("another CRC", with_record(local_extra=FB, local_fields=(W.crc ^ 1, len(W.data), len(W.data))),
     f"the central directory says {len(W.data)} bytes"),
    ("other sizes", with_record(local_extra=FB, local_fields=(W.crc, 8, 8)), "its local header 8 bytes"),
    ("sizes that differ", with_record(local_extra=FB, local_fields=(W.crc, len(W.data), 8)),
     "its local header has inconsistent sizes"),
    ("deflated", lambda: local_field(with_record(local_extra=FB)(), b"data/0", "method", 8),
     "its local header asks for"),
    ("needing version 4.6", lambda: local_field(with_record(local_extra=FB)(), b"data/0", "needed", 46),
     "its local header asks for"),
    ("encrypted", lambda: local_field(with_record(local_extra=FB)(), b"data/0", "flags", 1),
     "its local header asks for"),
    ("naming another record", lambda: local_name(with_record(local_extra=FB)(), b"data/0", b"archive/data/9"),
     "its local header names 'archive/data/9'"),
    ("data past the directory", claiming(1000), "claims 1000 bytes past the central directory"),
]


@pytest.mark.parametrize(("build", "rule"), [(build, rule) for _, build, rule in FAST_PATH_LIES],
                         ids=[name for name, _, _ in FAST_PATH_LIES])
def test_a_local_header_in_torchs_layout_that_lies_is_refused_by_its_rule(
    build: Callable[[], bytes], rule: str, tmp_path: Path
) -> None:
    assert rule in read_refusal(build(), tmp_path)


def test_torchs_layout_without_a_data_descriptor_is_read(tmp_path: Path) -> None:
    reads_as_torch_loads(with_record(local_extra=FB)(), tmp_path)


def test_bytes_between_the_records_and_the_directory_are_refused_by_what_they_are(tmp_path: Path) -> None:
    junk = with_layout(before_directory=b"junk")
    cd_offset = EOCD.unpack(junk[-22:])[6]
    assert f"4 bytes at offset {cd_offset - 4} are no zip structure" in read_refusal(junk, tmp_path)
    cut = with_layout(before_directory=b"PK\x03\x04" + bytes(10))
    assert f"a local header at offset {EOCD.unpack(cut[-22:])[6] - 14} runs into the central directory" in (
        read_refusal(cut, tmp_path))


def test_a_record_whose_local_header_hides_inside_another_records_bytes_is_refused(tmp_path: Path) -> None:
    """The directory points into the middle of a listed record: a walk from offset 0 never meets that
    header, a reader that seeks to it does."""
    hidden = zipcraft.LOCAL.pack(0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(b"x" * 8), 8, 8, 14, 0) + b"archive/hidden"
    layout = layout_of(PAYLOAD)
    layout.recs.insert(1, Rec(b"archive/blob", hidden + b"x" * 8))
    at = local_header(layout.build(), b"archive/blob") + 30 + len(b"archive/blob")
    layout.extra_central = zipcraft.central_entry(b"archive/hidden", b"x" * 8, at)
    layout.count = len(layout.recs) + 1
    assert "record 'archive/hidden' has its local header inside another record's bytes" in read_refusal(
        layout.build(), tmp_path)


def test_local_headers_longer_than_one_read_are_read(tmp_path: Path) -> None:
    """torch names the archive's folder after the file; a 490-character folder makes every local
    header longer than the block the walk reads at once."""
    layout = layout_of(PAYLOAD, prefix="p" * 490)
    reads_as_torch_loads(layout.build(), tmp_path)
    for r in layout.recs:
        r.local_extra = FB
    reads_as_torch_loads(layout.build(), tmp_path)
    layout.recs[-1].local_name = layout.recs[-1].name[:-1] + b"X"
    assert "its local header names" in read_refusal(layout.build(), tmp_path)


def test_a_local_zip64_field_that_gives_sizes_the_header_also_gives_is_read(tmp_path: Path) -> None:
    """Some zip64 writers put both sizes in the local header's zip64 field whether or not it needs them."""
    size = len(W.data)
    reads_as_torch_loads(with_record(local_extra=field(1, struct.pack("<QQ", size, size)))(), tmp_path)


@pytest.mark.parametrize("length", [509, 510, 511, 600])
def test_a_folder_name_is_read_exactly_when_torch_reads_it(length: int, tmp_path: Path) -> None:
    """torch reads the first record's name into a 512-byte buffer: a folder name that leaves no room
    for its "/" there is refused by torch ('file in archive is not in a subdirectory'), and by us."""
    data = layout_of(PAYLOAD, prefix="p" * length).build()
    if torch_loads(data, tmp_path):
        reads_as_torch_loads(data, tmp_path)
    else:
        assert "folder name is longer than" in read_refusal(data, tmp_path)


def with_comment(data: bytes, comment: bytes) -> bytes:
    return data[:-2] + struct.pack("<H", len(comment)) + comment


@pytest.mark.parametrize("length", [1, 40_000, 65_535])
def test_a_comment_of_any_length_is_read_in_a_file_of_any_size(length: int, tmp_path: Path) -> None:
    """The end record is searched for in the last 64 KiB + 22 bytes, the last one found is taken (an
    in-place append leaves an older one before it), and the comment must run exactly to the end.
    (torch itself fails on a small file with a comment near the maximum: the files here are larger.)"""
    path = tmp_path / "big.pt"
    torch.save({"w": torch.arange(40_000.0)}, path)  # larger than the 64 KiB searched
    plain_big = path.read_bytes()
    with Checkpoint.open(path) as ckpt:
        ckpt.rename("w", "v")
        ckpt.write(path, None)
    for data in (plain_big, path.read_bytes()):
        commented = with_comment(data, b"c" * length)
        reads_as_torch_loads(commented, tmp_path)
        refusal = read_refusal(commented + b"c", tmp_path)  # a byte past the comment (at the maximum: out of reach)
        assert "bytes follow the archive's end record" in refusal or (length == 65_535 and "truncated" in refusal)


def test_a_comment_torch_cannot_read_past_is_refused(tmp_path: Path) -> None:
    """torch (miniz) fails with EINVAL on a file of a few KiB whose comment is near the 65,535-byte
    maximum: the end record is out of its reach, and ckptmigrate refuses the file too."""
    data = with_comment(saved(), b"c" * 65_535)
    assert not torch_loads(data, tmp_path)
    read_refusal(data, tmp_path)


def test_a_tensor_whose_memo_gets_fetch_a_deep_tuple_is_refused_as_opcode_by_opcode() -> None:
    """The scan steps over a tensor at once only when every memo get in it fetches a plain value; a
    "storage" tag or location fetched from the memo where a tuple MAX_DEPTH deep was put makes the
    storage's tuple one level too deep, whichever way the scan reads it."""
    deep = b"K\x01" + b"\x85" * pickle_scan.MAX_DEPTH
    globals_ = (b"ctorch._utils\n_rebuild_tensor_v2\nq\x000" + b"ctorch\nFloatStorage\nq\x010"
                + b"ccollections\nOrderedDict\nq\x020" + deep + b"q\x030")
    literal_storage, literal_location = b"X\x07\x00\x00\x00storage", b"X\x03\x00\x00\x00cpu"
    for storage, location in ((b"h\x03", literal_location), (literal_storage, b"h\x03")):
        tensor = (b"h\x00((" + storage + b"h\x01X\x01\x00\x00\x000" + location + b"K\x06tQK\x00K\x06\x85K\x01\x85\x89"
                  b"h\x02)RtR")
        assert pickle_scan._TENSOR.fullmatch(tensor)  # the layout the scan steps over at once
        data = b"\x80\x02" + globals_ + b"}(X\x01\x00\x00\x00w" + tensor + b"u."
        refused = f"the pickle nests tuples more than {pickle_scan.MAX_DEPTH} deep"
        assert scan_verdict(data) == refused
        with pytest.raises(pickle_scan.PickleFormatError, match=refused):
            pickle_scan.scan(data, whole_tensors=False)
