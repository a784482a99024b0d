"""Just enough of the zip format to read and write torch checkpoints without touching tensor bytes.

Reading is :mod:`ckptmigrate.formats.zipread` (re-exported here). Records are stored (never
compressed) and their data is aligned to 64 bytes, as ``torch.save`` does, so
``torch.load(mmap=True)`` can map them. A writer can copy a record's bytes from another file with
``os.copy_file_range`` or point the central directory at a record that already sits in the file
being appended to: that is what makes renames cost only metadata.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from typing import BinaryIO

from ckptmigrate.formats import native, zipformat, zipread
from ckptmigrate.formats.zipformat import CENTRAL, EOCD, EOCD64, LOCAL, LOCATOR64, MAX16, MAX32, PAGE, ByteSource, pread
from ckptmigrate.formats.zipformat import Entries as Entries
from ckptmigrate.formats.zipformat import ZipEntry as ZipEntry
from ckptmigrate.formats.zipformat import ZipFormatError as ZipFormatError
from ckptmigrate.formats.zipread import read_archive
from ckptmigrate.storage.rawio import copy_range, write_all

ALIGNMENT = 64
_encode = native.load("_encode")  # its central_directory: the records below, packed in C


def live_length(fd: ByteSource, file_size: int) -> int:
    """The length of the archive a reader that follows the end record's offsets (torch) sees:
    ``file_size``, or, after an in-place append was interrupted (see :meth:`ZipWriter.close_appended`),
    the length before that append: the file then ends with a copy of the bytes that end it there."""
    if file_size < 2 * APPEND_END:
        return file_size
    end = pread(fd, APPEND_END, file_size - APPEND_END)
    record = end[-EOCD.size :]
    if len(end) != APPEND_END or record[:4] != b"PK\x05\x06":
        return file_size
    _sig, _disk, _cd_disk, _n_disk, _n, cd_size, cd_offset, comment = EOCD.unpack(record)
    if comment:
        return file_size
    if end[:4] == b"PK\x06\x07":  # a zip64 locator: readers take the directory from its record
        live = LOCATOR64.unpack(end[: LOCATOR64.size])[2] + EOCD64.size + APPEND_END
    else:
        live = cd_offset + cd_size + EOCD.size
    if live == file_size or not APPEND_END <= live < file_size - APPEND_END:
        return file_size
    return live if pread(fd, APPEND_END, live - APPEND_END) == end else file_size


def read_entries(fh: BinaryIO, file_size: int) -> Entries:
    """The records of the archive, by :func:`ckptmigrate.formats.zipread.read_archive`: the one strict
    parse, which refuses any archive torch's miniz and another zip reader could read differently.

    A file whose in-place append was interrupted is read as torch reads it: the archive before it
    (:func:`live_length`; the dead tail is accepted only when it ends with a copy of the archive's end).
    """
    src = byte_source(fh)
    return read_archive(src, live_length(src, file_size))


def read_appended_entries(fh: BinaryIO, file_size: int, base: Entries, base_length: int) -> Entries:
    """:func:`read_entries` of a file an in-place append extended from the archive of its first
    ``base_length`` bytes, read as ``base`` (:func:`ckptmigrate.formats.zipread.read_appended`:
    only the appended bytes are parsed). The append must be complete: torch reads the new archive."""
    src = byte_source(fh)
    if live_length(src, file_size) != file_size:
        raise ZipFormatError("the file still ends as the archive it was appended to: the append is incomplete")
    return zipread.read_appended(src, file_size, base, base_length)


def read_record(fh: BinaryIO, entry: ZipEntry, *, check_crc: bool = True) -> bytes:
    return zipformat.read_record(byte_source(fh), entry, check_crc=check_crc)


def byte_source(fh: BinaryIO) -> ByteSource:
    """What the zip reader reads ``fh`` through: a remote object's ranges, else its descriptor."""
    return fh if hasattr(fh, "pread") else fh.fileno()


#: A record the central directory lists: (name as UTF-8, local header offset, size, CRC-32). A
#: tuple, not an object: an append lists every record of the file again, tens of thousands of them.
_Written = tuple[bytes, int, int, int]


class ZipLayout:
    """Where records go and what their headers and the central directory are: the layout a
    :class:`ZipWriter` writes to a file and a :class:`ckptmigrate.formats.zipstream.ZipEmitter`
    sends in order, byte for byte the same."""

    def __init__(self, pos: int = 0) -> None:
        self._pos = pos
        self._entries: list[_Written] = []

    @property
    def position(self) -> int:
        return self._pos

    def _header(self, name: bytes, size: int, crc: int) -> bytes:
        zip64 = size >= MAX32
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        base = self._pos + LOCAL.size + len(name) + len(extra) + 4
        pad = (-base) % ALIGNMENT
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        shown = MAX32 if zip64 else size
        head = LOCAL.pack(
            0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0, crc, shown, shown, len(name), len(extra)
        )
        return head + name + extra

    def reuse(self, name: str, header_offset: int, size: int, crc: int) -> None:
        """List a record that already sits in this file at ``header_offset`` (written earlier)."""
        self._entries.append((name.encode("utf-8"), header_offset, size, crc))

    def reuse_all(self, names: Iterable[str], header_offsets: Iterable[int], sizes: Iterable[int],
                  crcs: Iterable[int]) -> None:
        """:meth:`reuse` of many records at once (an append lists every record of the file again)."""
        self._entries.extend(zip(map(str.encode, names), header_offsets, sizes, crcs, strict=True))

    def _finish(self, entry: _Written, data_offset: int) -> None:
        self._entries.append(entry)
        self._pos = data_offset + entry[2]

    def end(self) -> bytes:
        """What :meth:`ZipWriter.close` writes after the last record: padding, the central directory
        and the end records."""
        pad, directory = self._directory(EOCD.size)
        return bytes(pad) + directory

    def _directory(self, whole: int) -> tuple[int, bytes]:
        """(padding, central directory + end records) for records that end at the current position;
        the padding keeps the last ``whole`` bytes inside one page, so a single write of them lands
        whole or not at all (a killed write stops at a page boundary)."""
        cd = _encode.central_directory(self._entries) if _encode is not None else None
        if cd is None:  # not compiled, or a record needs zip64
            pack = CENTRAL.pack
            cd = b"".join([
                pack(0x02014B50, 20, 20, 0, 0, 0, 0, crc, size, size, len(name), 0, 0, 0, 0, 0, offset) + name
                if size < MAX32 and offset < MAX32 else _central_zip64(name, offset, size, crc)
                for name, offset, size, crc in self._entries
            ])
        n = len(self._entries)
        zip64 = n >= MAX16 or self._pos >= MAX32 - PAGE or len(cd) >= MAX32
        between = EOCD64.size + LOCATOR64.size if zip64 else 0
        end_at = self._pos + len(cd) + between + EOCD.size
        pad = (-(end_at - whole)) % PAGE if (end_at - whole) % PAGE + whole > PAGE else 0
        cd_start = self._pos + pad
        cd_end = cd_start + len(cd)
        tail = b""
        if zip64:
            tail += EOCD64.pack(0x06064B50, 44, 45, 45, 0, 0, n, n, len(cd), cd_start)
            tail += LOCATOR64.pack(0x07064B50, 0, cd_end, 1)
            eocd = EOCD.pack(0x06054B50, 0, 0, MAX16, MAX16, MAX32, MAX32, 0)
        else:
            eocd = EOCD.pack(0x06054B50, 0, 0, n, n, len(cd), cd_start, 0)
        return pad, cd + tail + eocd


class ZipWriter(ZipLayout):
    """Write stored, 64-byte-aligned records and a central directory (zip64 when needed).

    ``fh`` must be positioned where the first new record goes; records already in the file can be
    listed again with :meth:`reuse` without rewriting them. With ``deferred`` nothing is written
    until :meth:`close_appended` (the in-place append, which must know the final length first).
    An archive embedded in a larger file (a DCP ``.distcp`` chunk) starts at ``origin``: its offsets
    count from there, as a reader of that slice expects.
    """

    def __init__(self, fh: BinaryIO, *, deferred: bool = False, origin: int = 0) -> None:
        if deferred and origin:
            raise ValueError("an in-place append writes a whole file, not an embedded archive")
        super().__init__(fh.tell() - origin)
        self._fh = fh
        self._fd = fh.fileno()
        self._origin = origin
        self._deferred: list[tuple[int, bytes] | tuple[int, int, int, int]] | None = [] if deferred else None

    def _write(self, data: bytes, offset: int) -> None:
        if self._deferred is None:
            write_all(self._fd, data, self._origin + offset)
        else:
            self._deferred.append((offset, data))

    def _begin(self, name: str, size: int, crc: int) -> tuple[_Written, int]:
        raw = name.encode("utf-8")
        header = self._header(raw, size, crc)
        entry = (raw, self._pos, size, crc)
        self._write(header, self._pos)
        return entry, self._pos + len(header)

    def add_bytes(self, name: str, data: bytes) -> None:
        entry, data_offset = self._begin(name, len(data), zlib.crc32(data))
        self._write(data, data_offset)
        self._finish(entry, data_offset)

    def add_stream(self, name: str, size: int, chunks: Iterable[memoryview | bytes]) -> None:
        """Write ``size`` bytes from ``chunks``; the CRC is computed on the way and patched in."""
        if self._deferred is not None:
            raise ValueError("a deferred (appending) writer takes only small records and copies")
        entry, data_offset = self._begin(name, size, 0)
        crc = 0
        written = 0
        for chunk in chunks:
            crc = zlib.crc32(chunk, crc)
            view = memoryview(chunk).cast("B")
            write_all(self._fd, view, self._origin + data_offset + written)
            written += len(view)
        if written != size:
            raise ValueError(f"record {name!r}: expected {size} bytes, got {written}")
        write_all(self._fd, struct.pack("<I", crc), self._origin + entry[1] + 14)
        self._finish((entry[0], entry[1], size, crc), data_offset)

    def add_copy(self, name: str, src_fd: int, src_offset: int, size: int, crc: int) -> None:
        entry, data_offset = self._begin(name, size, crc)
        if self._deferred is None:
            copy_range(src_fd, self._fd, src_offset, size, self._origin + data_offset)
        else:
            self._deferred.append((src_fd, src_offset, size, data_offset))
        self._finish(entry, data_offset)

    def add_copies(self, name: str, runs: list[tuple[int, int, int]], crc: int) -> None:
        """One record whose bytes are ``runs`` ((file descriptor, offset, length)) one after another,
        copied by the kernel; ``crc`` is recorded as given (0 when not known, as ``torch.save``
        writes it with CRC computation off — torch does not check it)."""
        if self._deferred is not None:
            raise ValueError("a deferred (appending) writer takes only small records and copies")
        entry, data_offset = self._begin(name, sum(n for _fd, _off, n in runs), crc)
        at = self._origin + data_offset
        for src_fd, src_offset, n in runs:
            copy_range(src_fd, self._fd, src_offset, n, at)
            at += n
        self._finish(entry, data_offset)

    def close(self, *, durable: bool = False) -> int:
        """Write the central directory; return the file's final length.

        The end-of-directory record, the last thing a reader looks for, is written on its own and
        never across a page boundary, so a process killed mid-write leaves it whole or absent; with
        ``durable`` the directory before it is on disk first.
        """
        pad, directory = self._directory(EOCD.size)
        write_all(self._fd, bytes(pad) + directory[: -EOCD.size], self._origin + self._pos)
        if durable:
            os.fsync(self._fd)
        end = self._pos + pad + len(directory)
        write_all(self._fd, directory[-EOCD.size :], self._origin + end - EOCD.size)
        if os.fstat(self._fd).st_size > self._origin + end:
            os.ftruncate(self._fd, self._origin + end)
        self._fh.seek(self._origin + end)
        return end

    def close_appended(self, live_end: int) -> int:
        """Finish an in-place append begun at ``live_end``, the end of the archive as it is; return
        the new length. Readable by torch at every instant, whatever bytes the new records hold:

        1. the last :data:`APPEND_END` bytes of the archive (its end record, and its zip64 locator or
           the directory's last bytes) are copied, as they are, to where the new archive will end:
           one write inside one page that moves the end of the file. A reader that looks for the
           end record in the last 64 KiB (miniz, which torch uses; Python's zipfile) finds this copy
           first — it is the last signature in the file, so a signature inside the new records is
           never reached — and the copy points, by absolute offsets, at the old directory: the file
           reads as it was;
        2. the new records, padding, central directory and zip64 end record fill the gap, and are
           fsynced;
        3. the last :data:`APPEND_END` bytes of the new archive replace the copy in one write inside
           one page, and are fsynced: the file now reads as the new archive.

        The layout this leaves (a strict reader accepts exactly this; ``[a, b)`` are file offsets)::

            [0, live_end)       the archive as it was: its records, its central directory and end
                                records, byte for byte (earlier appends leave the same shape inside)
            [live_end, R)       new records, each a local header (64-byte aligned data, the 0x4246
                                padding extra field) and its data, back to back; the central
                                directory lists these and records of [0, live_end) by offset;
                                records of [0, live_end) it no longer lists are dead bytes
            [R, C)              zero padding, fewer than 4096 bytes
            [C, E - 22)         the new central directory, then (zip64) its end record and locator
            [E - 22, E)         the end record, no comment; E is the file length

        Killed during step 2 the file is ``[0, live_end)``, then zeros or a prefix of the new bytes,
        then the copy of step 1 at ``[E - 42, E)``: torch reads the old archive; zipfile (which
        expects the directory right before the end record) does not, and ckptmigrate reads it as the
        old archive (:func:`live_length`) and cuts the tail off before it next writes.
        """
        if self._deferred is None:
            raise ValueError("close_appended needs a deferred writer")
        pad, directory = self._directory(APPEND_END)
        end = self._pos + pad + len(directory)
        old_end = os.pread(self._fd, APPEND_END, live_end - APPEND_END)
        if len(old_end) != APPEND_END or old_end[-EOCD.size : -EOCD.size + 4] != b"PK\x05\x06":
            raise ZipFormatError("the archive does not end with its end record; it cannot be appended to")
        write_all(self._fd, old_end, end - APPEND_END)
        os.fsync(self._fd)
        for op in self._deferred:
            if len(op) == 2:
                write_all(self._fd, op[1], op[0])
            else:
                src_fd, src_offset, size, dst_offset = op
                copy_range(src_fd, self._fd, src_offset, size, dst_offset)
        write_all(self._fd, bytes(pad) + directory[:-APPEND_END], self._pos)
        os.fsync(self._fd)
        write_all(self._fd, directory[-APPEND_END:], end - APPEND_END)
        os.fsync(self._fd)
        self._fh.seek(end)
        return end


def _central_zip64(name: bytes, offset: int, size: int, crc: int) -> bytes:
    """The central directory entry of a record of 4 GiB or more, or beyond 4 GiB: its size and
    offset in the zip64 extra field."""
    extra_fields: list[int] = []
    if size >= MAX32:
        extra_fields += [size, size]
    if offset >= MAX32:
        extra_fields.append(offset)
    extra = struct.pack(f"<HH{len(extra_fields)}Q", 1, 8 * len(extra_fields), *extra_fields)
    size32 = MAX32 if size >= MAX32 else size
    off32 = MAX32 if offset >= MAX32 else offset
    return CENTRAL.pack(
        0x02014B50, 45, 45, 0, 0, 0, 0, crc, size32, size32, len(name), len(extra), 0, 0, 0, 0, off32,
    ) + name + extra


#: Bytes at the end of an archive written in one piece when appending: the end record and the 20
#: bytes before it (the zip64 locator, or the directory's last bytes), what a reader reads first.
APPEND_END = EOCD.size + LOCATOR64.size
