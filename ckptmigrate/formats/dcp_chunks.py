"""The chunks of a ``.distcp`` file: each a whole ``torch.save`` archive embedded at an offset. Its
records are found in two ``pread``s (its head and its tail, the edges), every batch of them asked
for at once when the file is an object read by range, and its ``data.pkl`` read by the restricted
unpickler, so a tensor becomes a reference to its bytes in the ``.distcp`` file.

:mod:`ckptmigrate.formats.dcp` reads the ``.metadata`` that says where the chunks are.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ckptmigrate.formats import pickled
from ckptmigrate.formats.pickle_scan import PickleFormatError
from ckptmigrate.formats.pickled import StandIn
from ckptmigrate.tensors.refs import Source, Storage, TensorRef

_LOCAL = struct.Struct("<4s5H3I2H")
_CENTRAL = struct.Struct("<4s6H3I5H2I")
_EOCD = struct.Struct("<4s4H2IH")
_LOCATOR64 = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQ2H2I4Q")
#: How much of an embedded archive's head and tail is read at once (its small records and directory).
_EDGE = 4096


class DcpFormatError(ValueError):
    """A DCP checkpoint's ``.metadata`` or one of its chunks is malformed (``dcp.DcpFormatError``)."""


class _Archive:
    """The records of one ``torch.save`` archive embedded in a file at ``base``, read in two
    ``pread``s when it is as torch writes it (its head: ``data.pkl`` and the local headers before
    the storages; its tail: the end records and the central directory)."""

    def __init__(self, source: Source, base: int, length: int, what: str) -> None:
        self.source, self.base, self.length, self.what = source, base, length, what
        self.head = self.pread(min(length, _EDGE), 0)
        tail_at = max(0, length - _EDGE)
        tail = self.head if tail_at == 0 else self.pread(length - tail_at, tail_at)
        count, cd_size, cd_off = self._end(tail, tail_at)
        directory = tail[cd_off - tail_at : cd_off - tail_at + cd_size] if cd_off >= tail_at \
            else self.pread(cd_size, cd_off)
        self.records: dict[str, tuple[int, int]] = {}
        pos = 0
        for _ in range(count):
            if pos + _CENTRAL.size > len(directory) or directory[pos : pos + 4] != b"PK\x01\x02":
                raise self.error("its central directory is malformed")
            fields = _CENTRAL.unpack_from(directory, pos)
            method, csize, usize, nlen, xlen, clen, offset = fields[4], *fields[8:13], fields[16]
            raw_name = directory[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]
            name = raw_name.decode("utf-8", "replace")
            extra = directory[pos + _CENTRAL.size + nlen : pos + _CENTRAL.size + nlen + xlen]
            usize, csize, offset = _zip64(extra, [usize, csize, offset])
            pos += _CENTRAL.size + nlen + xlen + clen
            if method != 0 or csize != usize:
                raise DcpFormatError(f"{what}: record {name!r} is compressed")
            if name in self.records:
                raise DcpFormatError(f"{what}: record {name!r} is in it twice")
            local = self.head[offset : offset + _LOCAL.size] if offset + _LOCAL.size <= len(self.head) \
                else self.pread(_LOCAL.size, offset)
            if local[:4] != b"PK\x03\x04":
                raise DcpFormatError(f"{what}: record {name!r} has no local header")
            start = offset + _LOCAL.size + sum(struct.unpack_from("<HH", local, 26))
            if start + usize > length:
                raise DcpFormatError(f"{what}: record {name!r} runs past its chunk")
            self.records[name] = (start, usize)

    def error(self, problem: str) -> DcpFormatError:
        return DcpFormatError(f"{self.what} is not a torch.save archive ({problem})")

    def pread(self, n: int, at: int) -> bytes:
        if at < 0 or n < 0 or at + n > self.length:
            raise self.error("a structure lies outside it")
        data = self.source.pread(n, self.base + at)
        if len(data) != n:
            raise self.error("it is truncated")
        return data

    def _end(self, tail: bytes, tail_at: int) -> tuple[int, int, int]:
        """(entries, directory size, directory offset) from the end records, zip64 or not."""
        if len(tail) < _EOCD.size:
            raise self.error("too short")
        sig, _disk, _cd_disk, _here, count, cd_size, cd_off, comment = _EOCD.unpack_from(tail, len(tail) - _EOCD.size)
        if sig != b"PK\x05\x06" or comment:
            raise self.error("no end record at its end")
        if 0xFFFF in (count,) or 0xFFFFFFFF in (cd_size, cd_off):
            at = len(tail) - _EOCD.size - _LOCATOR64.size
            if at < 0 or tail[at : at + 4] != b"PK\x06\x07":
                raise self.error("no zip64 locator")
            eocd64 = _LOCATOR64.unpack_from(tail, at)[2]
            block = tail[eocd64 - tail_at : eocd64 - tail_at + _EOCD64.size] if eocd64 >= tail_at \
                else self.pread(_EOCD64.size, eocd64)
            if len(block) != _EOCD64.size or block[:4] != b"PK\x06\x06":
                raise self.error("no zip64 end record")
            count, cd_size, cd_off = _EOCD64.unpack(block)[7:10]
        if cd_off + cd_size > self.length:
            raise self.error("its central directory lies outside it")
        return count, cd_size, cd_off

    def read(self, name: str) -> bytes:
        start, size = self.records[name]
        return self.head[start : start + size] if start + size <= len(self.head) else self.pread(size, start)


def _zip64(extra: bytes, values: list[int]) -> list[int]:
    """Sizes and offset from a zip64 extra field, for those whose 32-bit field is 0xFFFFFFFF."""
    if 0xFFFFFFFF not in values:
        return values
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if tag == 1:
            wide = iter(struct.unpack_from(f"<{size // 8}Q", extra, pos + 4))
            return [next(wide, v) if v == 0xFFFFFFFF else v for v in values]
        pos += 4 + size
    return values


#: A chunk's archive pickle -> the tensor it gave, already checked (chunks of one shape pickle alike).
Templates = dict[bytes, TensorRef]


def read_embedded(source: Source, base: int, length: int, what: str, templates: Templates | None = None) -> Any:
    """The object a ``torch.save`` archive embedded at ``base`` holds, tensors as references into ``source``."""
    if base < 0 or length < 0 or base + length > source.size:
        raise DcpFormatError(f"{what} lies outside {os.path.basename(source.path)}")
    archive = _Archive(source, base, length, what)
    pkl = [n for n in archive.records if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise DcpFormatError(f"{what} holds no torch.save payload")
    prefix = pkl[0][: -len("/data.pkl")]
    raw = archive.read(pkl[0])
    template = templates.get(raw) if templates is not None else None
    storages: dict[str, Storage] = {}
    if template is not None:  # the same pickle read before: the same tensor, on a storage of its own
        obj: Any = replace(template, storage=replace(template.storage, source=None, offset=None), extra={})
        storages[obj.storage.key] = obj.storage
    else:
        try:
            obj = pickled.load(raw, storages)
        except PickleFormatError as exc:
            raise DcpFormatError(f"{what}: {exc}") from None
        if templates is not None and isinstance(obj, TensorRef) and not obj.extra and len(storages) == 1:
            templates[raw] = obj
    for key, storage in storages.items():
        record = archive.records.get(f"{prefix}/data/{key}")
        if record is None or record[1] < storage.nbytes:
            raise DcpFormatError(f"{what}: storage data/{key} is missing or short")
        storage.source, storage.offset = source, base + record[0]
    return obj


def prefetch_archives(storage_data: dict[Any, tuple[StandIn, StandIn]], source_of: Callable[[str], Source]) -> None:
    """Of objects read by range, the edges of every chunk's archive (its records and its directory)
    asked for in one batch per file, neighbours merged: a request per file, not two per chunk."""
    wanted: dict[str, list[tuple[int, int]]] = {}
    for _index, info in storage_data.values():
        st = info.state
        base, length = st["offset"], st["length"]
        edges = [(base, min(length, _EDGE)), (base + max(0, length - _EDGE), min(length, _EDGE))]
        wanted.setdefault(st["relative_path"], []).extend(edges)
    for rel, ranges in wanted.items():
        remote = source_of(rel).remote
        if remote is not None:
            remote.prefetch(ranges)
