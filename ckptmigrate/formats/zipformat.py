"""The stored-zip structures of a torch checkpoint: their layouts, the limits torch reads them within,
and the records (:class:`ZipEntry`) a parse finds.

:mod:`ckptmigrate.formats.zipread` parses an archive out of them; its docstring has the rules.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from operator import itemgetter
from typing import Any, NamedTuple, Protocol

LOCAL = struct.Struct("<IHHHHHIIIHH")
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
EOCD = struct.Struct("<IHHHHIIH")
EOCD64 = struct.Struct("<IQHHIIQQQQ")
LOCATOR64 = struct.Struct("<IIQI")
DESCRIPTOR32 = struct.Struct("<IIII")
DESCRIPTOR64 = struct.Struct("<IIQQ")
SIG_LOCAL = b"PK\x03\x04"
SIG_CENTRAL = b"PK\x01\x02"
SIG_EOCD = b"PK\x05\x06"
SIG_EOCD64 = b"PK\x06\x06"
SIG_LOCATOR64 = b"PK\x06\x07"
SIG_DESCRIPTOR = b"PK\x07\x08"
MAX32 = 0xFFFFFFFF
MAX16 = 0xFFFF
PAGE = 4096
FLAG_DESCRIPTOR = 0x0008
FLAGS_ALLOWED = FLAG_DESCRIPTOR | 0x0800  # data descriptor, UTF-8 names (ASCII here either way)
MAX_VERSION_NEEDED = 45  # zip64; what torch's miniz and ckptmigrate write
TAG_ZIP64 = 0x0001
TAG_PADDING = 0x4246  # "FB": torch's (and ckptmigrate's) alignment padding in local headers


class Preadable(Protocol):
    """Bytes read by range: a local file's ``os.pread``, or a remote object's range requests."""

    def pread(self, n: int, offset: int) -> bytes: ...


#: Where an archive's bytes are read from: a file descriptor or a :class:`Preadable`.
ByteSource = int | Preadable


def pread(src: ByteSource, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` of ``src`` (fewer only at its end)."""
    return os.pread(src, n, offset) if isinstance(src, int) else src.pread(n, offset)


def prefetch(src: ByteSource, ranges: list[tuple[int, int]]) -> None:
    """Tell a remote ``src`` the (offset, length) ranges about to be read, so it fetches them in few
    requests; a local file needs no hint."""
    hint = getattr(src, "prefetch", None)
    if hint is not None:
        hint(ranges)


class ZipFormatError(ValueError):
    """The archive is not a readable stored-zip torch checkpoint, or could be read two ways."""


class ZipEntry(NamedTuple):
    name: str
    header_offset: int
    data_offset: int
    size: int
    crc: int


_ENTRY_NAME = itemgetter(0)  # ZipEntry.name


class Entries(dict[str, ZipEntry]):
    """Records by name; lookups ignore ASCII case, as miniz's do (names are unique ignoring case)."""

    def __init__(self) -> None:
        super().__init__()
        self._folded: dict[str, str] = {}  # lower-cased name: name, for names that are not lower case

    @classmethod
    def of(cls, entries: list[ZipEntry]) -> Entries:
        """The records ``entries``, in order (as many ``__setitem__`` calls, at once)."""
        out = cls()
        names = list(map(_ENTRY_NAME, entries))
        dict.update(out, zip(names, entries, strict=True))
        folded = list(map(str.lower, names))
        if folded != names:  # torch's names are lower case: usually none to fold
            out._folded.update((f, n) for f, n in zip(folded, names, strict=True) if f != n)
        return out

    def __setitem__(self, name: str, entry: ZipEntry) -> None:
        folded = name.lower()
        if folded != name:
            self._folded[folded] = name
        else:
            self._folded.pop(folded, None)
        super().__setitem__(name, entry)

    def _name(self, name: str) -> str:
        if dict.__contains__(self, name):  # names are unique ignoring case: an exact one is the one
            return name
        folded = name.lower()
        got = self._folded.get(folded)
        if got is not None:
            return got
        return folded if super().__contains__(folded) else name

    def __getitem__(self, name: str) -> ZipEntry:
        return super().__getitem__(self._name(name))

    def __contains__(self, name: object) -> bool:
        return super().__contains__(self._name(name) if isinstance(name, str) else name)

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(self._name(name), default)


class CentralEntry(NamedTuple):
    raw_name: bytes
    name: str
    flags: int
    crc: int
    size: int
    header_offset: int


#: A canonical name: printable ASCII parts without ``/`` or ``\\``, at least two, none ``.`` or ``..``.
_PART = rb"(?!\.\.?(?:/|\Z))[ -.0-\[\]-~]+"
CANONICAL = re.compile(_PART + rb"(?:/" + _PART + rb")+")


def check_name(raw: bytes, where: str) -> str:
    if CANONICAL.fullmatch(raw):
        return raw.decode("ascii")
    if not raw:
        raise ZipFormatError(f"{where} has an empty name")
    if b"\x00" in raw:
        raise ZipFormatError(f"{where} has a NUL byte in its name {raw[:80]!r} (zip readers cut it there or not)")
    if any(b < 0x20 or b > 0x7E for b in raw):
        raise ZipFormatError(f"{where} has a name with a control or non-ASCII byte: {raw[:80]!r}")
    name = raw.decode("ascii")
    if "/" not in name.strip("/") and "\\" not in name:
        raise ZipFormatError(f"{where}: {name[:80]!r} is not inside the archive's folder")
    raise ZipFormatError(f"{where} has a non-canonical name {name[:80]!r} (backslash, absolute, empty, . or ..)")


def extra_fields(extra: bytes, allowed: tuple[int, ...], where: str) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise ZipFormatError(f"{where}: its extra field is malformed")
        tag, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            raise ZipFormatError(f"{where}: its extra field runs past its end")
        if tag not in allowed:
            raise ZipFormatError(f"{where}: an extra field of type {tag:#06x}, which torch does not write")
        if tag in fields:
            raise ZipFormatError(f"{where}: two extra fields of type {tag:#06x} (readers take one or the other)")
        fields[tag] = extra[pos + 4 : pos + 4 + length]
        pos += 4 + length
    return fields


def zip64_values(values: list[int], field: bytes | None, where: str, *, exact: bool) -> list[int]:
    """Replace each 0xFFFFFFFF of ``values`` by the next 8 bytes of the zip64 field, in order."""
    wanted = sum(v == MAX32 for v in values)
    if field is None:
        if wanted:
            raise ZipFormatError(f"{where}: a size or offset is 0xFFFFFFFF but no zip64 field gives it")
        return values
    if (exact and len(field) != 8 * wanted) or len(field) < 8 * wanted or len(field) % 8:
        raise ZipFormatError(f"{where}: its zip64 field does not match the fields it replaces")
    out, pos = [], 0
    for v in values:
        if v == MAX32:
            (v,) = struct.unpack_from("<Q", field, pos)
            pos += 8
        out.append(v)
    return out


def read_record(fd: ByteSource, entry: ZipEntry, *, check_crc: bool = True) -> bytes:
    data = pread(fd, entry.size, entry.data_offset)
    if len(data) != entry.size:
        raise ZipFormatError(f"record {entry.name!r} is truncated")
    if check_crc and zlib.crc32(data) != entry.crc:
        raise ZipFormatError(f"record {entry.name!r} fails its CRC check")
    return data
