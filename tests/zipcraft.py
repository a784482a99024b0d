"""Zip archives built structure by structure, for the tests that attack the zip reader.

Each knob makes one structure lie in one way; everything else is what ``torch.save`` writes, with
the records of a real ``torch.save`` file.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

LOCAL = struct.Struct("<IHHHHHIIIHH")
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
EOCD = struct.Struct("<IHHHHIIH")


def records_of(payload: Any) -> list[tuple[str, bytes]]:
    """(name, bytes) of every record ``torch.save`` writes for ``payload``, in its order."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


@dataclass
class Rec:
    name: bytes
    data: bytes
    local_name: bytes | None = None
    flags: int = 0
    method: int = 0
    local_fields: tuple[int, int, int] | None = None  # (crc, compressed size, size) in the local header
    after: bytes = b""  # bytes right after the data (a data descriptor)
    central: bool = True  # listed in the central directory
    central_offset: int | None = None  # a lie about where the local header is
    local_extra: bytes = b""  # the local header's extra field
    central_extra: bytes = b""  # the central directory entry's extra field
    comment: bytes = b""  # the central directory entry's comment

    @property
    def crc(self) -> int:
        return zlib.crc32(self.data)


@dataclass
class Layout:
    recs: list[Rec]
    between: dict[int, bytes] = field(default_factory=dict)  # bytes inserted before record i
    count: int | None = None  # the end record's entry count
    cd_offset: int | None = None  # the end record's directory offset
    before_directory: bytes = b""  # bytes between the last record and the directory
    after_directory: bytes = b""  # bytes between the directory and the end record
    comment: bytes = b""
    trailer: bytes = b""  # bytes after the end record
    extra_central: bytes = b""  # raw bytes appended to the central directory

    def build(self) -> bytes:
        out = bytearray()
        offsets = []
        for i, r in enumerate(self.recs):
            out += self.between.get(i, b"")
            offsets.append(len(out))
            name = r.local_name if r.local_name is not None else r.name
            crc, csize, usize = r.local_fields or (r.crc, len(r.data), len(r.data))
            out += LOCAL.pack(0x04034B50, 20, r.flags, r.method, 0, 0, crc, csize, usize, len(name),
                              len(r.local_extra)) + name + r.local_extra
            out += r.data + r.after
        cd = bytearray()
        listed = 0
        for r, offset in zip(self.recs, offsets, strict=True):
            if not r.central:
                continue
            listed += 1
            at = offset if r.central_offset is None else r.central_offset
            cd += CENTRAL.pack(0x02014B50, 20, 20, r.flags, r.method, 0, 0, r.crc, len(r.data), len(r.data),
                               len(r.name), len(r.central_extra), len(r.comment), 0, 0, 0, at)
            cd += r.name + r.central_extra + r.comment
        cd += self.extra_central
        out += self.before_directory
        cd_at = len(out)
        out += cd + self.after_directory
        count = listed if self.count is None else self.count
        at = cd_at if self.cd_offset is None else self.cd_offset
        out += EOCD.pack(0x06054B50, 0, 0, count, count, len(cd), at, len(self.comment)) + self.comment
        return bytes(out + self.trailer)


def layout_of(payload: Any, prefix: str = "archive") -> Layout:
    return Layout([Rec(name.replace("archive", prefix, 1).encode(), data) for name, data in records_of(payload)])


def central_entry(name: bytes, data: bytes, offset: int) -> bytes:
    return CENTRAL.pack(0x02014B50, 20, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(name),
                        0, 0, 0, 0, 0, offset) + name
