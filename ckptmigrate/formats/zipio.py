"""Just enough of the zip format to read and write torch checkpoints without touching tensor bytes.

Records are stored (never compressed) and their data is aligned to 64 bytes, as ``torch.save``
does, so ``torch.load(mmap=True)`` can map them. A writer can copy a record's bytes from another
file with ``os.copy_file_range`` or point the central directory at a record that already sits in
the file being appended to: that is what makes renames cost only metadata.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from ckptmigrate.storage.rawio import copy_range, write_all

ALIGNMENT = 64
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_MAX32 = 0xFFFFFFFF
_MAX16 = 0xFFFF
_PAGE = 4096
#: Signatures of what may follow a record's data: a local header, the central directory, the (zip64)
#: end of central directory.
_NEXT_STRUCTURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x06\x06", b"PK\x05\x06")


class ZipFormatError(ValueError):
    """The archive is not a readable stored-zip torch checkpoint."""


@dataclass(frozen=True)
class ZipEntry:
    name: str
    header_offset: int
    data_offset: int
    size: int
    crc: int


def read_entries(fh: BinaryIO, file_size: int) -> dict[str, ZipEntry]:
    """Parse the central directory and local headers; validate that every record is in the file."""
    try:
        infos = zipfile.ZipFile(fh).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise ZipFormatError(f"not a readable zip archive ({exc})") from None
    entries: dict[str, ZipEntry] = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ZipFormatError(f"record {info.filename!r} is compressed; torch writes stored records")
        if info.compress_size != info.file_size:
            raise ZipFormatError(f"record {info.filename!r} has inconsistent sizes")
        if not 0 <= info.header_offset <= file_size - _LOCAL.size:
            # zipfile shifts every offset when the directory sits where it did not expect it:
            # bytes were cut from (or added to) the middle of the file
            raise ZipFormatError(
                f"record {info.filename!r} has its local header outside the file; "
                "the file is truncated or has bytes missing"
            )
        header = os.pread(fh.fileno(), _LOCAL.size, info.header_offset)
        if len(header) != _LOCAL.size or header[:4] != b"PK\x03\x04":
            raise ZipFormatError(f"record {info.filename!r} has no local header at its offset")
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        data_offset = info.header_offset + _LOCAL.size + name_len + extra_len
        if data_offset + info.file_size > file_size:
            raise ZipFormatError(
                f"record {info.filename!r} claims {info.file_size} bytes past the end of the file"
            )
        if info.filename in entries:
            raise ZipFormatError(f"record {info.filename!r} appears twice")
        _check_local_header(fh, info, header, data_offset)
        entries[info.filename] = ZipEntry(
            info.filename, info.header_offset, data_offset, info.file_size, info.CRC
        )
    _check_no_overlap(entries)
    return entries


def _check_local_header(fh: BinaryIO, info: zipfile.ZipInfo, header: bytes, data_offset: int) -> None:
    """The local header must name the record the central directory lists, with the same CRC and
    size: in the header itself, or (flag bit 3, as torch writes) in the data descriptor after the data."""
    flags, _method, _time, _date, crc, csize, usize, name_len, extra_len = struct.unpack_from(
        "<HHHHIIIHH", header, 6
    )
    name = os.pread(fh.fileno(), name_len + extra_len, info.header_offset + _LOCAL.size)
    try:
        local_name = name[:name_len].decode("utf-8" if flags & 0x800 else "cp437")
    except UnicodeDecodeError:
        local_name = None
    if local_name != info.orig_filename:
        raise ZipFormatError(f"record {info.filename!r}: its local header names {name[:name_len]!r:.80}")
    size = info.file_size
    if flags & 0x08 and (crc, csize, usize) == (0, 0, 0):
        _check_data_descriptor(fh, info, data_offset + size)
        return
    if (csize, usize) == (_MAX32, _MAX32):
        zip64 = _zip64_sizes(name[name_len:])
        if zip64 is None:
            raise ZipFormatError(f"record {info.filename!r}: its local header lacks its zip64 sizes")
        csize, usize = zip64
    if (crc, csize, usize) != (info.CRC, size, size):
        raise ZipFormatError(
            f"record {info.filename!r}: the central directory says {size} bytes (CRC {info.CRC:08x}), "
            f"its local header {usize} bytes (CRC {crc:08x})"
        )


def _check_data_descriptor(fh: BinaryIO, info: zipfile.ZipInfo, data_end: int) -> None:
    size = info.file_size
    tail = os.pread(fh.fileno(), 24, data_end)
    if tail[:4] in _NEXT_STRUCTURES:
        # the descriptor was overwritten by records appended right after the data (as ckptmigrate's
        # in-place writes do): the next zip structure starts where the data ends
        return
    body = tail[4:] if tail[:4] == b"PK\x07\x08" else tail
    if len(body) >= 12 and struct.unpack_from("<III", body) == (info.CRC, size, size):
        return
    if len(body) >= 20 and struct.unpack_from("<IQQ", body) == (info.CRC, size, size):
        return
    raise ZipFormatError(
        f"record {info.filename!r}: the central directory says {size} bytes (CRC {info.CRC:08x}), "
        "but no data descriptor or next record follows that many bytes of data"
    )


def _zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 1 and length >= 16 and pos + 4 + length <= len(extra):
            usize, csize = struct.unpack_from("<QQ", extra, pos + 4)
            return csize, usize
        pos += 4 + length
    return None


def _check_no_overlap(entries: dict[str, ZipEntry]) -> None:
    """Records must not share bytes: a directory listing one record many times over is the
    overlapping-file zip bomb, and would have a digest read the same bytes again and again."""
    spans = sorted((e.header_offset, e.data_offset + e.size, e.name) for e in entries.values())
    for (_start, end, name), (next_start, _end, next_name) in zip(spans, spans[1:], strict=False):
        if next_start < end:
            raise ZipFormatError(f"records {name!r} and {next_name!r} overlap")


def read_record(fh: BinaryIO, entry: ZipEntry, *, check_crc: bool = True) -> bytes:
    data = os.pread(fh.fileno(), entry.size, entry.data_offset)
    if len(data) != entry.size:
        raise ZipFormatError(f"record {entry.name!r} is truncated")
    if check_crc and zlib.crc32(data) != entry.crc:
        raise ZipFormatError(f"record {entry.name!r} fails its CRC check")
    return data


@dataclass
class _Written:
    name: bytes
    header_offset: int
    size: int
    crc: int


class ZipWriter:
    """Write stored, 64-byte-aligned records and a central directory (zip64 when needed).

    ``fh`` must be positioned where the first new record goes; records already in the file can be
    listed again with :meth:`reuse` without rewriting them.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._fd = fh.fileno()
        self._pos = fh.tell()
        self._entries: list[_Written] = []

    @property
    def position(self) -> int:
        return self._pos

    def _header(self, name: bytes, size: int, crc: int) -> bytes:
        zip64 = size >= _MAX32
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        base = self._pos + _LOCAL.size + len(name) + len(extra) + 4
        pad = (-base) % ALIGNMENT
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        shown = _MAX32 if zip64 else size
        head = _LOCAL.pack(
            0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0, crc, shown, shown, len(name), len(extra)
        )
        return head + name + extra

    def _begin(self, name: str, size: int, crc: int) -> tuple[_Written, int]:
        raw = name.encode("utf-8")
        header = self._header(raw, size, crc)
        entry = _Written(raw, self._pos, size, crc)
        write_all(self._fd, header, self._pos)
        return entry, self._pos + len(header)

    def add_bytes(self, name: str, data: bytes) -> None:
        entry, data_offset = self._begin(name, len(data), zlib.crc32(data))
        write_all(self._fd, data, data_offset)
        self._finish(entry, data_offset)

    def add_stream(self, name: str, size: int, chunks: Iterable[memoryview | bytes]) -> None:
        """Write ``size`` bytes from ``chunks``; the CRC is computed on the way and patched in."""
        entry, data_offset = self._begin(name, size, 0)
        crc = 0
        written = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            view = memoryview(chunk).cast("B")
            write_all(self._fd, view, data_offset + written)
            written += len(view)
        if written != size:
            raise ValueError(f"record {name!r}: expected {size} bytes, got {written}")
        entry.crc = crc
        write_all(self._fd, struct.pack("<I", crc), entry.header_offset + 14)
        self._finish(entry, data_offset)

    def add_copy(self, name: str, src_fd: int, src_offset: int, size: int, crc: int) -> None:
        entry, data_offset = self._begin(name, size, crc)
        copy_range(src_fd, self._fd, src_offset, size, data_offset)
        self._finish(entry, data_offset)

    def reuse(self, name: str, header_offset: int, size: int, crc: int) -> None:
        """List a record that already sits in this file at ``header_offset`` (written earlier)."""
        self._entries.append(_Written(name.encode("utf-8"), header_offset, size, crc))

    def _finish(self, entry: _Written, data_offset: int) -> None:
        self._entries.append(entry)
        self._pos = data_offset + entry.size

    def close(self, *, durable: bool = False) -> int:
        """Write the central directory; return the file's final length.

        The end-of-directory record, the last thing a reader looks for, is written on its own and
        never across a page boundary, so a process killed mid-write leaves it whole or absent; with
        ``durable`` the directory before it is on disk first (for appends to a live file).
        """
        parts: list[bytes] = []
        for e in self._entries:
            extra_fields: list[int] = []
            if e.size >= _MAX32:
                extra_fields += [e.size, e.size]
            if e.header_offset >= _MAX32:
                extra_fields.append(e.header_offset)
            extra = b""
            if extra_fields:
                extra = struct.pack(f"<HH{len(extra_fields)}Q", 1, 8 * len(extra_fields), *extra_fields)
            size32 = _MAX32 if e.size >= _MAX32 else e.size
            off32 = _MAX32 if e.header_offset >= _MAX32 else e.header_offset
            version = 45 if extra else 20
            parts.append(
                _CENTRAL.pack(
                    0x02014B50, version, version, 0, 0, 0, 0, e.crc, size32, size32,
                    len(e.name), len(extra), 0, 0, 0, 0, off32,
                )
                + e.name
                + extra
            )
        cd = b"".join(parts)
        n = len(self._entries)
        zip64 = n >= _MAX16 or self._pos >= _MAX32 - _PAGE or len(cd) >= _MAX32
        between = _EOCD64.size + _LOCATOR64.size if zip64 else 0
        eocd_at = self._pos + len(cd) + between
        pad = (-eocd_at) % _PAGE if eocd_at % _PAGE + _EOCD.size > _PAGE else 0
        cd_start = self._pos + pad
        cd_end = cd_start + len(cd)
        tail = b""
        if zip64:
            tail += _EOCD64.pack(0x06064B50, 44, 45, 45, 0, 0, n, n, len(cd), cd_start)
            tail += _LOCATOR64.pack(0x07064B50, 0, cd_end, 1)
            eocd = _EOCD.pack(0x06054B50, 0, 0, _MAX16, _MAX16, _MAX32, _MAX32, 0)
        else:
            eocd = _EOCD.pack(0x06054B50, 0, 0, n, n, len(cd), cd_start, 0)
        write_all(self._fd, bytes(pad) + cd + tail, self._pos)
        if durable:
            os.fsync(self._fd)
        write_all(self._fd, eocd, cd_end + len(tail))
        end = cd_end + len(tail) + len(eocd)
        if os.fstat(self._fd).st_size > end:
            os.ftruncate(self._fd, end)
        self._fh.seek(end)
        return end
