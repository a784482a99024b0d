"""The one parse of a torch zip archive: what torch's miniz reads, and nothing two readers could read two ways.

torch reads a checkpoint with miniz; ``zipfile`` and streaming readers read the same bytes by other
rules (miniz looks names up ignoring ASCII case and reads only the entries the end record counts;
``zipfile`` cuts a name at a NUL, reads the directory until its size is used up and shifts every
offset when the directory is not where the end record says). An archive is accepted only when
every such rule gives the same answer:

- the end record ends the file (with a comment only when no end record signature is in it: every
  reader then takes the same one; and only where miniz's backward search reaches it; one disk),
  with a zip64 end record and locator right before it when it uses them, every 32-bit field
  equal to its zip64 value or the 0xFFFF.. marker; the central directory ends exactly where they
  begin and holds exactly the counted entries;
- every name is printable ASCII, canonical (no ``\\``, no empty, ``.`` or ``..`` part, no leading or
  trailing ``/``), under the one top-level folder of the first entry, and unique ignoring case;
- every record is stored (torch maps its bytes), unencrypted, not a directory, and its local header
  repeats its name, flags, method and sizes (or, with flag bit 3, leaves them to a data descriptor
  that repeats them);
- the file is a sequence of structures with nothing unexplained between them, read from offset 0:
  local records (header, data, data descriptor), zero padding of less than a page before a
  central directory, and central directories. Records and directories the current end record
  does not reach are *superseded*: an in-place append leaves the old ``data.pkl``, envelope,
  central directory and end records behind, each whole; a superseded directory must describe
  records that precede it, and be closed by its own consistent end records.

The common case (a directory of canonical names, records as torch writes them, an append's
records in their old order) is read in C where ``_zipscan`` is built (:data:`_scan`); anything
else it hands back, stage by stage, to the Python code here, which then reads and judges it.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
import zlib
from functools import partial
from itertools import chain, filterfalse, repeat
from operator import add, itemgetter, sub
from typing import Any, NamedTuple, Protocol

from ckptmigrate.formats import native
from ckptmigrate.util.gcpause import pausing

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_DESCRIPTOR32 = struct.Struct("<IIII")
_DESCRIPTOR64 = struct.Struct("<IIQQ")
_LOCAL_REST = struct.Struct("<14s12sHH")  # a local header: its first 14 bytes, CRC and sizes, name and extra lengths
_PADDING_HEAD = struct.Struct("<HH")  # the padding extra field's tag and length
_STATED = struct.Struct("<III")  # a local header's CRC and sizes
_NO_SIZES = bytes(12)  # the CRC and sizes of a local header that leaves them to a data descriptor
SIG_LOCAL = b"PK\x03\x04"
SIG_CENTRAL = b"PK\x01\x02"
SIG_EOCD = b"PK\x05\x06"
SIG_EOCD64 = b"PK\x06\x06"
SIG_LOCATOR64 = b"PK\x06\x07"
SIG_DESCRIPTOR = b"PK\x07\x08"
MAX32 = 0xFFFFFFFF
MAX16 = 0xFFFF
PAGE = 4096
_MINIZ_BLOCK = 4096  # what miniz reads at a time looking for the end record
_FLAG_DESCRIPTOR = 0x0008
_FLAGS_ALLOWED = _FLAG_DESCRIPTOR | 0x0800  # data descriptor, UTF-8 names (ASCII here either way)
_MAX_VERSION_NEEDED = 45  # zip64; what torch's miniz and ckptmigrate write
_DOS_DIRECTORY = 0x10
_TAG_ZIP64 = 0x0001
_TAG_PADDING = 0x4246  # "FB": torch's (and ckptmigrate's) alignment padding in local headers
_SCAN = 1 << 20
#: The first bytes scanned for a data descriptor (then twice as many, up to _SCAN): a superseded
#: ``data.pkl`` is often small, and over a network every byte scanned is fetched.
_FIRST_SCAN = 64 << 10
#: The largest central directory read (it is read whole): a bound on memory whatever the file claims.
MAX_DIRECTORY = 256 << 20
_BLOCK = 512  # a local header and its name and extra field, read at once
#: torch copies the first record's name into a buffer this long (NUL included) to find the folder
_TORCH_NAME_BUFFER = 512
#: Where records are small (a run of small tensors), the walk reads this many bytes at once and
#: finds the next headers and data descriptors in them: one read for hundreds of records.
_WINDOW = 64 << 10
#: The fewest listed records of a window the walk checks at once (:meth:`_Reader.listed_run`).
_MIN_RUN = 8
#: torch refuses an archive whose ``version`` record is outside this range (caffe2/serialize/versions.h).
TORCH_VERSIONS = range(1, 0xA + 1)
_LEADING_INTEGER = re.compile(rb"[ \t\n\v\f\r]*\+?([0-9]+)")
#: The C parse of the common case (``_zipscan.c``): None where not built or not wanted. Each of its
#: functions gives what the Python code here gives, or None for the Python code to read and judge.
_scan = native.load("_zipscan")


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


class _Central(NamedTuple):
    raw_name: bytes
    name: str
    flags: int
    crc: int
    size: int
    header_offset: int


#: A canonical name: printable ASCII parts without ``/`` or ``\\``, at least two, none ``.`` or ``..``.
_PART = rb"(?!\.\.?(?:/|\Z))[ -.0-\[\]-~]+"
_CANONICAL = re.compile(_PART + rb"(?:/" + _PART + rb")+")


def _check_name(raw: bytes, where: str) -> str:
    if _CANONICAL.fullmatch(raw):
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


def _extra_fields(extra: bytes, allowed: tuple[int, ...], where: str) -> dict[int, bytes]:
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


def _zip64(values: list[int], field: bytes | None, where: str, *, exact: bool) -> list[int]:
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


class _Reader:
    def __init__(self, src: ByteSource, length: int) -> None:
        self.src, self.length = src, length
        self.prefix: str | None = None
        self._buf, self._at, self._ahead = b"", 0, 0  # the walk's window: bytes, their offset, read-ahead
        self._heads: list[int] = []  # the listed local headers, in order: where a window may end
        self._run_from = 0  # where the walk may next try :meth:`listed_run` (past a window where it failed)

    def pread(self, n: int, offset: int, what: str) -> bytes:
        data = pread(self.src, n, offset) if n else b""
        if len(data) != n:
            raise ZipFormatError(f"{what} runs past the end of the file; it is truncated")
        return data

    # -- the end records and a central directory ---------------------------------------------------

    def end_records(self, eocd: int, where: str, comment_len: int = 0) -> tuple[int, int, int, int]:
        """(entries, directory size, directory offset, where the directory must end) from the end
        record at ``eocd`` (followed by a comment of ``comment_len`` bytes) and the zip64 records before it."""
        sig, disk, cd_disk, n_disk, n, cd_size, cd_offset, comment = _EOCD.unpack(self.pread(22, eocd, where))
        if sig != 0x06054B50:
            raise ZipFormatError(f"{where} is missing")
        if comment != comment_len:
            raise ZipFormatError(f"{where} has a comment that does not end the file (a reader may find another "
                                 "end record)")
        if disk or cd_disk or n_disk != n:
            raise ZipFormatError(f"{where} spans several disks")
        end = eocd
        if eocd >= 20 and self.pread(4, eocd - 20, where) == SIG_LOCATOR64:
            if eocd < 20 + 56:
                raise ZipFormatError(f"{where}: a zip64 locator with no room for its end record")
            _sig, loc_disk, rel, disks = _LOCATOR64.unpack(self.pread(20, eocd - 20, where))
            if loc_disk != 0 or disks != 1:
                raise ZipFormatError(f"{where}: its zip64 locator spans several disks")
            if rel != eocd - 20 - 56:
                raise ZipFormatError(f"{where}: its zip64 end record is not right before its locator "
                                     "(miniz follows the locator, zipfile does not)")
            (sig64, size64, _made, needed, disk64, cd_disk64, n_disk64, n64, cd_size64,
             cd_offset64) = _EOCD64.unpack(self.pread(56, rel, where))
            if sig64 != 0x06064B50 or size64 != 44 or needed > _MAX_VERSION_NEEDED:
                raise ZipFormatError(f"{where}: its zip64 end record is malformed")
            if disk64 or cd_disk64 or n_disk64 != n64:
                raise ZipFormatError(f"{where}: its zip64 end record spans several disks")
            if (n not in (n64, MAX16) or cd_size not in (cd_size64, MAX32)
                    or cd_offset not in (cd_offset64, MAX32)):
                raise ZipFormatError(f"{where}: its entry count, directory size or offset differs from its "
                                     "zip64 end record's")
            n, cd_size, cd_offset, end = n64, cd_size64, cd_offset64, rel
        elif n == MAX16 or MAX32 in (cd_size, cd_offset):
            raise ZipFormatError(f"{where}: zip64 markers without zip64 end records")
        if n == 0:
            raise ZipFormatError(f"{where}: the archive holds no records")
        if cd_offset + cd_size != end:
            raise ZipFormatError(
                f"{where}: the central directory is not where the end record says (it would end at "
                f"{cd_offset + cd_size}, the end records begin at {end}); zip readers disagree on such files")
        if cd_size < 46 * n:
            raise ZipFormatError(f"{where}: {n} entries cannot fit a {cd_size}-byte central directory")
        if cd_size > MAX_DIRECTORY:
            raise ZipFormatError(f"{where}: a central directory of {cd_size:,} bytes is more than ckptmigrate "
                                 f"reads ({MAX_DIRECTORY:,}; a million records take ~80 MB)")
        return n, cd_size, cd_offset, end

    def directory(self, cd: bytes, count: int, where: str) -> list[_Central]:
        """Exactly ``count`` entries filling ``cd``: an entry past the count is read by zipfile only."""
        if _scan is not None:
            scanned: list[_Central] | None = _scan.directory(cd, count, _Central)
            if scanned is not None:
                return scanned
        out: list[_Central] = []
        append = out.append
        unpack_from = _CENTRAL.unpack_from
        fullmatch = _CANONICAL.fullmatch
        new = tuple.__new__  # the named tuple built in C, as its __new__ would (no Python frame an entry)
        cd_len = len(cd)
        pos = 0
        for _ in range(count):
            if pos + 46 > cd_len:
                raise ZipFormatError(f"{where}: the central directory is shorter than its {count} entries")
            (sig, _made, needed, flags, method, _time, _date, crc, csize, usize, nlen, xlen, clen, disk,
             _iattr, eattr, offset) = unpack_from(cd, pos)
            if sig != 0x02014B50:
                raise ZipFormatError(f"{where}: entry {len(out)} of the central directory is malformed")
            name_end = pos + 46 + nlen
            end = name_end + xlen + clen
            if end > cd_len:
                raise ZipFormatError(f"{where}: entry {len(out)} runs past the central directory")
            raw = cd[pos + 46 : name_end]
            name = raw.decode("ascii") if fullmatch(raw) else _check_name(raw, f"{where}: a record")
            if needed > _MAX_VERSION_NEEDED or flags & ~_FLAGS_ALLOWED:
                raise ZipFormatError(f"record {name!r} needs zip features torch does not write (flags {flags:#06x})")
            if method != 0:
                raise ZipFormatError(f"record {name!r} is compressed (method {method}); torch writes stored records")
            if clen or disk or eattr & _DOS_DIRECTORY:
                raise ZipFormatError(f"record {name!r} has a comment, another disk or the directory attribute")
            if xlen or usize == MAX32 or csize == MAX32 or offset == MAX32:
                what = f"record {name!r}"
                fields = _extra_fields(cd[name_end : name_end + xlen], (_TAG_ZIP64,), what)
                usize, csize, offset = _zip64([usize, csize, offset], fields.get(_TAG_ZIP64), what, exact=True)
            if usize != csize:
                raise ZipFormatError(f"record {name!r} has inconsistent sizes")
            append(new(_Central, (raw, name, flags, crc, usize, offset)))
            pos = end
        if pos != len(cd):
            raise ZipFormatError(f"{where}: the central directory holds {len(cd) - pos} bytes past its {count} "
                                 "counted entries (zipfile reads them, miniz does not)")
        return out

    def check_names(self, centrals: list[_Central], where: str) -> None:
        """One top-level folder (torch takes the first entry's; it refuses other folders) and no two
        names equal ignoring ASCII case (miniz's lookup finds either)."""
        if self.prefix is None and b"/" not in centrals[0].raw_name[:_TORCH_NAME_BUFFER - 1]:
            raise ZipFormatError(f"{where}: the archive's folder name is longer than the {_TORCH_NAME_BUFFER - 2} "
                                 "bytes torch reads of the first record's name (torch refuses the file)")
        self.prefix = self.prefix or centrals[0].name.split("/")[0]
        folder = self.prefix + "/"  # names are canonical: they hold a "/"
        names = list(map(_NAME, centrals))
        if all(map(str.startswith, names, repeat(folder))) and len(set(map(str.lower, names))) == len(names):
            return
        seen: dict[str, int] = {}
        for i, c in enumerate(centrals):
            if c.name.split("/")[0] != self.prefix:
                raise ZipFormatError(f"{where}: record {c.name!r} is outside the archive folder {self.prefix!r}")
            first = seen.setdefault(c.name.lower(), i)
            if first != i:
                other = centrals[first].name
                if other == c.name:
                    raise ZipFormatError(f"{where}: record {c.name!r} appears twice")
                raise ZipFormatError(f"{where}: records {other!r} and {c.name!r} have the same name ignoring "
                                     "case (miniz finds either)")

    # -- the walk from offset 0 ------------------------------------------------------------------------

    def window(self, n: int, offset: int, limit: int, *, to_header: bool = True) -> bytes:
        """``os.pread(fd, n, offset)`` for the walk, from the last window read when it holds them; a
        new window reads ahead only after a small record (so the next ones are likely in it), and
        (``to_header``) only to the last listed header it reaches."""
        rel = offset - self._at
        if rel >= 0 and rel + n <= len(self._buf):
            return self._buf[rel : rel + n]
        ahead = min(self._ahead, limit - offset)
        if ahead > n and to_header:  # to the last listed header the window reaches: no tensor bytes read ahead
            heads = self._heads
            last = heads[bisect.bisect_right(heads, offset + ahead - _BLOCK) - 1] if heads else -1
            ahead = min(ahead, last + _BLOCK - offset) if last > offset else n
        self._buf, self._at = pread(self.src, max(n, ahead), offset), offset
        return self._buf[:n]

    def walk(self, live: dict[int, _Central], cd_offset: int, start: int = 0,
             records: dict[int, tuple[str, int, int]] | None = None) -> None:
        """Read every structure from ``start`` to the central directory at ``cd_offset``; ``records``
        holds those before ``start`` (header offset: name, size, data offset), read already."""
        self.live = live
        self._heads = sorted(live)
        self.records: dict[int, tuple[str, int, int]] = {} if records is None else records
        # every live local header (and the data descriptor that may end the record before it), in
        # one go: the walk then reads them from what a remote source already holds
        if getattr(self.src, "prefetch", None) is not None:  # a local file needs no hint: no list built
            prefetch(self.src, [(max(0, off - 32), min(_BLOCK + 32, cd_offset - max(0, off - 32)))
                                for off in self._heads if off >= start])
        pos = start
        live_get = live.get
        while pos < cd_offset:
            central = live_get(pos)
            if central is not None:  # a listed record as torch writes it, in the window already read
                if pos >= self._run_from:
                    end = self.listed_run(pos)
                    if end is not None:
                        pos = end
                        continue
                end = self.listed_in_window(pos, central, cd_offset)
                if end is not None:
                    pos = end
                    continue
            block = self.window(min(_BLOCK, cd_offset - pos), pos, cd_offset)
            sig = block[:4]
            if sig == SIG_LOCAL:
                pos = self.record(pos, block, cd_offset)
            elif sig == SIG_CENTRAL:
                pos = self.superseded_directory(pos, cd_offset)
            elif sig[:1] == b"\x00":
                pos = self.padding(pos, cd_offset)
            else:
                raise ZipFormatError(f"{cd_offset - pos} bytes at offset {pos} are no zip structure (bytes the "
                                     "archive does not explain: something was inserted or overwritten)")
        if pos != cd_offset:
            raise ZipFormatError(f"a record at offset {pos} runs into the central directory")
        if not self.records.keys() >= live.keys():  # checked in C; the names only for the message
            hidden = [c.name for off, c in live.items() if off not in self.records]
            raise ZipFormatError(f"record {hidden[0]!r} has its local header inside another record's bytes")

    def listed_run(self, pos: int) -> int | None:
        """:meth:`_listed` of the listed records from ``pos`` on whose successor's header is in the
        walk's window, at once (:meth:`_run`); their end, or None. Where no run of at least
        _MIN_RUN records reads so, the walk reads record by record to the window's last header."""
        buf, base = self._buf, self._at
        heads = self._heads
        first = bisect.bisect_left(heads, pos)
        last = bisect.bisect_right(heads, base + len(buf) - 30) - 1  # the last header the window holds
        count = last - first
        if pos < base or count < _MIN_RUN:
            return None
        while count >= _MIN_RUN:
            end = self._run(buf, base, heads[first : first + count + 1])
            if end is not None:
                return end
            count //= 2
        self._run_from = heads[last]
        return None

    def _run(self, buf: bytes, base: int, offsets: list[int]) -> int | None:
        """The end of the records at ``offsets[:-1]`` when each is what :meth:`_listed` accepts and
        ends where the next begins, read from ``buf`` (the bytes from file offset ``base``), else
        None. Each record's bytes but its data and padding are compared at once with what they must
        be: the first 14 bytes of the first local header (checked as :meth:`_listed` checks them),
        then the CRC and sizes as the directory gives them (or zeros, left to a data descriptor),
        the name's and the extra field's lengths (the extra field filling the room to the data), the
        name, the padding field's tag and length, and the data descriptor. In C, each record read
        as :meth:`_listed` reads it (where the first that is not ends the run, and the walk reads
        it next: the records stored are those the walk stores again)."""
        if _scan is not None:
            end, small, count = _scan.listed(buf, base, offsets[0], offsets[-1], self.live, self.records)
            if end != offsets[-1] or count != len(offsets) - 1:  # each ends where the next begins
                return None
            self._ahead = _WINDOW if small else 0
            return end
        starts, nexts = offsets[:-1], offsets[1:]
        centrals = list(map(self.live.__getitem__, starts))
        raw_names, sizes, crcs = list(map(_RAW_NAME, centrals)), list(map(_SIZE, centrals)), list(map(_CRC, centrals))
        rel = starts[0] - base
        front = buf[rel : rel + 14]
        if len(front) != 14:
            return None
        sig, needed, flags, method = struct.unpack_from("<IHHH", front)
        if sig != 0x04034B50 or needed > _MAX_VERSION_NEEDED or flags & ~_FLAGS_ALLOWED or method:
            return None
        tail = _DESCRIPTOR32.size if flags & _FLAG_DESCRIPTOR else 0
        if max(sizes) >= MAX32 or (tail and starts[-1] >= MAX32):
            return None
        nlens = list(map(len, raw_names))
        xlens = list(map(sub, map(sub, map(sub, nexts, starts), map(add, sizes, nlens)), repeat(30 + tail)))
        try:
            heads = map(_LOCAL_REST.pack, repeat(front),
                        map(_STATED.pack, crcs, sizes, sizes) if not tail else repeat(_NO_SIZES), nlens, xlens)
            paddings = map(_PADDING_HEAD.pack, repeat(_TAG_PADDING), map(sub, xlens, repeat(4)))
            if tail:
                descriptors = map(_DESCRIPTOR32.pack, repeat(0x08074B50), crcs, sizes, sizes)
                expected = b"".join(chain.from_iterable(zip(heads, raw_names, paddings, descriptors, strict=True)))
            else:
                expected = b"".join(chain.from_iterable(zip(heads, raw_names, paddings, strict=True)))
        except struct.error:  # an extra field too short or too long for the room: not a record as torch writes it
            return None
        rels = list(map(sub, starts, repeat(base)))
        spans = [rels, list(map(add, rels, map(add, nlens, repeat(34))))]  # header, name, padding field head
        if tail:
            ends = list(map(sub, nexts, repeat(base + tail)))
            spans = [list(chain.from_iterable(zip(spans[0], ends, strict=True))),
                     list(chain.from_iterable(zip(spans[1], map(add, ends, repeat(tail)), strict=True)))]
        if b"".join(map(buf.__getitem__, map(slice, *spans))) != expected:
            return None
        data = list(map(add, map(add, starts, repeat(30)), map(add, nlens, xlens)))
        self.records.update(zip(starts, zip(map(_NAME, centrals), sizes, data, strict=True), strict=True))
        self._ahead = _WINDOW if sizes[-1] < _WINDOW // 16 else 0
        return nexts[-1]

    def listed_in_window(self, pos: int, central: _Central, limit: int) -> int | None:
        """:meth:`listed_record` read in place from the walk's window (no block copied out of it),
        when the record's header is in it; the same result, or None to read it the other ways."""
        rel = pos - self._at
        return None if rel < 0 else self._listed(self._buf, self._at, pos, central, limit)

    def listed_record(self, pos: int, block: bytes, central: _Central, limit: int) -> int | None:
        """:meth:`record` for a record the directory lists, as torch writes it (its name, the padding
        extra field, a data descriptor that agrees), in fewer steps; None for anything else, which
        :meth:`record` then reads (and judges) the general way."""
        return self._listed(block, pos, pos, central, limit)

    def _listed(self, buf: bytes, base: int, pos: int, central: _Central, limit: int) -> int | None:
        """The listed record whose local header is at ``pos``, read from ``buf`` (the bytes from file
        offset ``base``): its end, or None."""
        rel = pos - base
        if rel + 30 > len(buf):
            return None
        (sig, needed, flags, method, _time, _date, crc, csize, usize, nlen, xlen) = _LOCAL.unpack_from(buf, rel)
        raw_name = central.raw_name
        name_end = rel + 30 + nlen
        if (sig != 0x04034B50 or needed > _MAX_VERSION_NEEDED or flags & ~_FLAGS_ALLOWED or method
                or name_end + xlen > len(buf) or nlen != len(raw_name) or not buf.startswith(raw_name, rel + 30)
                or not buf.startswith(b"FB", name_end)
                or int.from_bytes(buf[name_end + 2 : name_end + 4], "little") != xlen - 4):
            return None
        size = central.size
        described = flags & _FLAG_DESCRIPTOR
        if not (described and crc == csize == usize == 0) and not (
            usize == csize == size and crc == central.crc and size != MAX32
        ):
            return None
        data = pos + 30 + nlen + xlen
        end = data + size
        if end > limit or (described and (pos >= MAX32 or size >= MAX32)):
            return None
        if described:
            at = end - base
            if at >= 0 and at + _DESCRIPTOR32.size <= len(buf):
                tail = _DESCRIPTOR32.unpack_from(buf, at)
            else:
                raw = self.window(_DESCRIPTOR32.size, end, limit)
                if len(raw) != _DESCRIPTOR32.size:
                    return None
                tail = _DESCRIPTOR32.unpack(raw)
            if tail != (0x08074B50, central.crc, size, size):
                return None
            end += _DESCRIPTOR32.size
        self.records[pos] = (central.name, size, data)
        self._ahead = _WINDOW if size < _WINDOW // 16 else 0
        return end

    def record(self, pos: int, block: bytes, limit: int) -> int:
        central = self.live.get(pos)
        if central is not None:
            end = self.listed_record(pos, block, central, limit)
            if end is not None:
                return end
        if len(block) < 30:
            raise ZipFormatError(f"a local header at offset {pos} runs into the central directory")
        (_sig, needed, flags, method, _time, _date, crc, csize, usize, nlen, xlen) = _LOCAL.unpack_from(block)
        raw_extra = block[30 : 30 + nlen + xlen]
        if len(raw_extra) != nlen + xlen:
            raw_extra = self.pread(nlen + xlen, pos + 30, "a local header")
        where = f"record {central.name!r}" if central else f"a superseded record at offset {pos}"
        if central is not None and raw_extra[:nlen] == central.raw_name:
            name = central.name  # checked with the directory, inside the archive folder
        else:
            name = _check_name(raw_extra[:nlen], where)
            if name.split("/")[0] != self.prefix:
                raise ZipFormatError(f"{where}: {name!r} is outside the archive folder {self.prefix!r}")
        if needed > _MAX_VERSION_NEEDED or flags & ~_FLAGS_ALLOWED or method != 0:
            raise ZipFormatError(f"{where}: its local header asks for compression or zip features torch does not write")
        extra = raw_extra[nlen:]
        if extra[:2] == b"FB" and int.from_bytes(extra[2:4], "little") == xlen - 4:
            fields = {_TAG_PADDING: extra[4:]}  # torch's padding, the whole extra field
        else:
            fields = _extra_fields(extra, (_TAG_ZIP64, _TAG_PADDING), where)
        described = bool(flags & _FLAG_DESCRIPTOR)
        deferred = described and (crc, csize, usize) == (0, 0, 0)
        if not deferred:
            usize, csize = _zip64([usize, csize], fields.get(_TAG_ZIP64), where, exact=False)
            if usize != csize:
                raise ZipFormatError(f"{where}: its local header has inconsistent sizes")
        data = pos + 30 + nlen + xlen
        if central is not None:
            if raw_extra[:nlen] != central.raw_name:
                raise ZipFormatError(f"{where}: its local header names {name!r}")
            if not deferred and (crc, usize) != (central.crc, central.size):
                raise ZipFormatError(f"{where}: the central directory says {central.size} bytes (CRC "
                                     f"{central.crc:08x}), its local header {usize} bytes (CRC {crc:08x})")
            size: int = central.size
        elif deferred:
            size = self.descriptor_size(pos, data, limit, where)
        else:
            size = usize
        end = data + size
        if end > limit:
            raise ZipFormatError(f"{where} claims {size} bytes past the central directory or the end of the file")
        self.records[pos] = (name, size, data)
        self._ahead = _WINDOW if size < _WINDOW // 16 else 0
        if not described:
            return end
        long = pos >= MAX32 or size >= MAX32
        dd = _DESCRIPTOR64 if long else _DESCRIPTOR32
        tail = self.window(dd.size, end, limit)
        if tail[:4] == SIG_DESCRIPTOR and len(tail) == dd.size:
            _s, dcrc, dcsize, dusize = dd.unpack(tail)
            if (dcsize, dusize) != (size, size) or (central is not None and dcrc != central.crc):
                raise ZipFormatError(f"{where}: its data descriptor says {dusize} bytes (CRC {dcrc:08x}), the "
                                     f"record {size} bytes")
            return end + dd.size
        if tail[:4] in (SIG_LOCAL, SIG_CENTRAL, SIG_EOCD64, SIG_EOCD) or tail[:1] == b"\x00" or end == limit:
            return end  # the descriptor was overwritten by what ckptmigrate appended right after the data
        raise ZipFormatError(f"{where}: no data descriptor or next record follows its {size} bytes of data")

    def descriptor_size(self, pos: int, data: int, limit: int, where: str) -> int:
        """The size of a superseded record whose header leaves it to its data descriptor: the first
        descriptor after the data that gives the distance to it (what a streaming reader finds)."""
        long = pos >= MAX32
        start, step = data, _FIRST_SCAN
        while start < limit:
            chunk = pread(self.src, min(step, limit - start) + 3, start)
            at = chunk.find(SIG_DESCRIPTOR)
            while at >= 0:
                dd_at = start + at
                dd = _DESCRIPTOR64 if long or dd_at - data >= MAX32 else _DESCRIPTOR32
                body = pread(self.src, dd.size, dd_at)
                if len(body) == dd.size:
                    _s, _crc, csize, usize = dd.unpack(body)
                    if csize == usize == dd_at - data:
                        return dd_at - data
                at = chunk.find(SIG_DESCRIPTOR, at + 1)
            start += step
            step = min(2 * step, _SCAN)
        raise ZipFormatError(f"{where} has no data descriptor: bytes the archive does not explain")

    def padding(self, pos: int, limit: int) -> int:
        run = self.pread(min(PAGE, limit - pos), pos, "padding")
        zeros = len(run) - len(run.lstrip(b"\x00"))
        after = pos + zeros
        if zeros < PAGE and (after == limit or self.pread(4, after, "padding") == SIG_CENTRAL):
            return after
        raise ZipFormatError(f"zero bytes at offset {pos} are not the padding before a central directory "
                             "(bytes the archive does not explain)")

    def superseded_directory(self, pos: int, limit: int) -> int:
        """A central directory an in-place append left behind, up to and including its end records."""
        end = pos
        count = 0
        self._ahead = _WINDOW  # its entries are small: read them in windows, not two preads each
        while True:
            head = self.window(34, end, limit, to_header=False)
            if _scan is not None:  # the entries this window holds, stepped over in C
                end, stepped = _scan.skip(self._buf, self._at, end, limit)
                count += stepped
                head = self.window(34, end, limit, to_header=False)
            if len(head) < 4 or (head[:4] == SIG_CENTRAL and len(head) < 34):
                raise ZipFormatError("a superseded central directory runs past the end of the file; it is truncated")
            if head[:4] != SIG_CENTRAL:
                break
            nlen, xlen, clen = struct.unpack_from("<HHH", head, 28)
            end += 46 + nlen + xlen + clen
            count += 1
            if end > limit:
                raise ZipFormatError(f"a superseded central directory at offset {pos} runs into the live one")
        zip64 = self.pread(4, end, "a superseded end record") == SIG_EOCD64
        eocd = end + (56 + 20 if zip64 else 0)
        where = f"the superseded end record at offset {eocd}"
        if eocd + 22 > limit:
            raise ZipFormatError(f"{where} runs into the live central directory")
        n, cd_size, cd_offset, cd_end = self.end_records(eocd, where)
        if (n, cd_size, cd_offset, cd_end) != (count, end - pos, pos, end):
            raise ZipFormatError(f"{where} does not describe the directory before it")
        centrals = self.directory(self.pread(end - pos, pos, where), count, where)
        if (_scan is not None and _scan.names(centrals, self.prefix) is not None
                and _scan.precede(centrals, self.records)):
            return eocd + 22
        self.check_names(centrals, where)
        for c in centrals:
            if self.records.get(c.header_offset, ())[:2] != (c.name, c.size):
                raise ZipFormatError(f"{where} lists {c.name!r} where no such record precedes it")
        return eocd + 22


def _miniz_reaches(length: int, eocd: int) -> bool:
    """Whether miniz's backward search for the end record reaches ``eocd``. It reads blocks of
    _MINIZ_BLOCK bytes from the end of the file, each starting _MINIZ_BLOCK - 3 bytes before the
    last; the step to a block that would start before offset 0 computes a negative offset instead,
    whose read fails (torch.load raises), so a block holding the record must start within the file."""
    block = (length - 4 - eocd) // (_MINIZ_BLOCK - 3)  # the block, counted from the end, holding it
    return block == 0 or length - _MINIZ_BLOCK - block * (_MINIZ_BLOCK - 3) >= 0


@pausing
def read_archive(fd: ByteSource, length: int) -> Entries:
    """The records of the torch zip archive in the first ``length`` bytes of ``fd``, refusing any
    archive that miniz (torch) and another zip reader could read differently (see the module)."""
    try:
        return _read_archive(fd, length)
    except ZipFormatError as exc:
        raise ZipFormatError(f"{exc}; re-save it with torch.save (or restore a copy)") from None


def _read_archive(fd: ByteSource, length: int) -> Entries:
    reader = _Reader(fd, length)
    if length < 30 + 46 + 22:
        raise ZipFormatError("the file is too short to be a zip archive")
    if reader.pread(4, 0, "the first local header") != SIG_LOCAL:
        raise ZipFormatError("the file does not start with a zip local header (torch reads only those)")
    eocd, comment = length - 22, 0
    if reader.pread(4, eocd, "the end record") != SIG_EOCD:
        # a comment may follow the end record if no end record signature is in it: every reader then
        # takes the same one (miniz and zipfile both take the last signature before the end)
        start = max(0, length - MAX16 - 22)
        last = pread(fd, length - start, start)[:-18].rfind(SIG_EOCD)  # 22 bytes after it, as miniz asks
        if last < 0:
            raise ZipFormatError("the archive has no end-of-central-directory record: it is truncated")
        eocd, comment = start + last, length - start - last - 22
        if struct.unpack("<H", reader.pread(2, eocd + 20, "the end record"))[0] != comment:
            raise ZipFormatError(
                f"{comment} bytes follow the archive's end record, and zip readers may pick different end "
                "records; if an in-place write was interrupted, "
                f"`truncate -s {eocd + 22}` gives back the archive it appended to")
        if not _miniz_reaches(length, eocd):
            raise ZipFormatError(
                f"its {comment}-byte comment puts the end record where torch (miniz) fails to find it in a "
                f"file of {length} bytes")
    n, cd_size, cd_offset, _end = reader.end_records(eocd, "the end record", comment)
    centrals = reader.directory(reader.pread(cd_size, cd_offset, "the central directory"), n, "the archive")
    live = _names_by_header(reader, centrals)
    reader.walk(live, cd_offset)
    records = reader.records
    entries = _entries(centrals, records)
    _check_torch_records(fd, entries, reader.prefix or "")
    return entries


@pausing
def read_appended(fd: ByteSource, length: int, base: Entries, base_length: int) -> Entries:
    """:func:`read_archive` of the first ``length`` bytes of ``fd``, an archive appended (in place) to
    the archive of its first ``base_length`` bytes, whose records ``base`` :func:`read_archive` gave
    and whose bytes have not changed since (an in-place write holds the file's lock from its read
    to its read-back): the same verdict and records, parsing only what the append changed.

    The appended bytes are read as the whole parse reads them (end records, the central directory,
    names, every structure from ``base_length`` on). Of the bytes before, the new directory may
    name only records ``base`` holds, with their name, size and CRC; a record it no longer names is
    read again the way a superseded record is read (its size found as a streaming reader finds
    it), which must give the same record; the old directory and end records, read when they were
    live, are a valid superseded directory as they are.
    """
    try:
        return _read_appended(fd, length, base, base_length)
    except ZipFormatError as exc:
        raise ZipFormatError(f"{exc}; re-save it with torch.save (or restore a copy)") from None


def _read_appended(fd: ByteSource, length: int, base: Entries, base_length: int) -> Entries:
    reader = _Reader(fd, length)
    if not base or length < base_length + 22 or base_length < 22:
        raise ZipFormatError("the file is shorter than the archive it was appended to")
    old_n, _old_size, _old_offset, _old_end = reader.end_records(base_length - 22, "the appended-to end record")
    if old_n != len(base):
        raise ZipFormatError("the archive appended to is not the one read")
    if reader.pread(4, length - 22, "the end record") != SIG_EOCD:
        raise ZipFormatError("the archive has no end-of-central-directory record at its end")
    n, cd_size, cd_offset, _end = reader.end_records(length - 22, "the end record")
    if cd_offset < base_length:
        raise ZipFormatError("the central directory is not in the appended bytes")
    centrals = reader.directory(reader.pread(cd_size, cd_offset, "the central directory"), n, "the archive")
    reader.prefix = next(iter(base)).split("/")[0]  # the folder the superseded directory's names are in
    live = _names_by_header(reader, centrals)
    before, superseded = _listed_and_superseded(live, list(base.values()), base_length)
    for old in superseded:
        off = old.header_offset
        # superseded by this append: read as the whole parse reads a superseded record
        reader.live = live
        reader.records = {}
        reader.record(off, reader.window(min(_BLOCK, cd_offset - off), off, cd_offset), cd_offset)
        if reader.records.get(off) != (old.name, old.size, old.data_offset):
            raise ZipFormatError(f"record {old.name!r}, which the append supersedes, reads differently once "
                                 "superseded (its data descriptor is ambiguous)")
    reader.walk(live, cd_offset, base_length, before)
    records = reader.records
    entries = _entries(centrals, records)
    _check_torch_records(fd, entries, reader.prefix or "")
    return entries


def _listed_and_superseded(live: dict[int, _Central], olds: list[ZipEntry],
                           base_length: int) -> tuple[dict[int, tuple[str, int, int]], list[ZipEntry]]:
    """:func:`_listed_before`, and the old records ``olds`` the new directory no longer lists, in
    their order (in C where the new directory lists the old records in their order)."""
    if _scan is not None:
        scanned: tuple[dict[int, tuple[str, int, int]], list[ZipEntry]] | None = _scan.appended(
            live, olds, base_length)
        if scanned is not None:
            return scanned
    old_by_offset = dict(zip(map(_ENTRY_HEADER, olds), olds, strict=True))
    before = _listed_before(live, old_by_offset, base_length)
    return before, [old_by_offset[off] for off in filterfalse(live.__contains__, old_by_offset)]


def _listed_before(live: dict[int, _Central], old_by_offset: dict[int, ZipEntry],
                   base_length: int) -> dict[int, tuple[str, int, int]]:
    """The records the new directory lists in the bytes before the append (header offset: name,
    size, data offset), each a record of the old archive with its name, size and CRC; in C loops
    when all are, else found one by one to name the first that is not."""
    offsets = list(filter(base_length.__gt__, live))
    olds: list[Any] = list(map(old_by_offset.get, offsets))
    listed = map(_C_NAME_SIZE_CRC, map(live.__getitem__, offsets))
    if None not in olds and list(map(_NAME_SIZE_CRC, olds)) == list(listed):
        return dict(zip(offsets, map(_NAME_SIZE_DATA, olds), strict=True))
    before: dict[int, tuple[str, int, int]] = {}
    for off, c in live.items():
        if off < base_length:
            old = old_by_offset.get(off)
            if old is None or (old.name, old.size, old.crc) != (c.name, c.size, c.crc):
                raise ZipFormatError(f"record {c.name!r} is not a record of the archive it was appended to")
            before[off] = (old.name, old.size, old.data_offset)
    return before


def _names_by_header(reader: _Reader, centrals: list[_Central]) -> dict[int, _Central]:
    """:meth:`_Reader.check_names` of the live directory, then :func:`_by_header`."""
    if _scan is not None:
        scanned: tuple[str, dict[int, _Central]] | None = _scan.names(centrals, reader.prefix)
        if scanned is not None:
            reader.prefix, live = scanned
            return live
    reader.check_names(centrals, "the archive")
    return _by_header(centrals)


def _by_header(centrals: list[_Central]) -> dict[int, _Central]:
    """The directory's entries by local header offset (built in C); two that share one are refused."""
    live = dict(zip(map(_HEADER, centrals), centrals, strict=True))
    if len(live) != len(centrals):
        live = {}
        for c in centrals:
            if live.setdefault(c.header_offset, c) is not c:
                raise ZipFormatError(f"records {live[c.header_offset].name!r} and {c.name!r} share a local header")
    return live


_RAW_NAME, _NAME, _CRC, _SIZE, _HEADER = (itemgetter(0), itemgetter(1), itemgetter(3), itemgetter(4),
                                          itemgetter(5))  # of a _Central
_DATA = itemgetter(2)  # a walked record's data offset
_C_NAME_SIZE_CRC = itemgetter(1, 4, 3)  # of a _Central
# of a ZipEntry
_ENTRY_HEADER, _NAME_SIZE_CRC, _NAME_SIZE_DATA = itemgetter(1), itemgetter(0, 3, 4), itemgetter(0, 3, 2)


def _entries(centrals: list[_Central], records: dict[int, tuple[str, int, int]]) -> Entries:
    """The archive's records, in directory order, each built in C as ``ZipEntry(...)`` would."""
    if _scan is not None:
        out = Entries()
        folded: list[tuple[str, str]] | None = _scan.entries(centrals, records, ZipEntry, out)
        if folded is not None:
            out._folded.update(folded)
            return out
    offsets = list(map(_HEADER, centrals))
    data_offsets = map(_DATA, map(records.__getitem__, offsets))
    fields = zip(map(_NAME, centrals), offsets, data_offsets, map(_SIZE, centrals), map(_CRC, centrals), strict=True)
    return Entries.of(list(map(partial(tuple.__new__, ZipEntry), fields)))


def read_record(fd: ByteSource, entry: ZipEntry, *, check_crc: bool = True) -> bytes:
    data = pread(fd, entry.size, entry.data_offset)
    if len(data) != entry.size:
        raise ZipFormatError(f"record {entry.name!r} is truncated")
    if check_crc and zlib.crc32(data) != entry.crc:
        raise ZipFormatError(f"record {entry.name!r} fails its CRC check")
    return data


def _check_torch_records(fd: ByteSource, entries: Entries, prefix: str) -> None:
    """What torch reads before the payload, read (CRC checked) and judged as torch judges it, so that
    an archive accepted here is one torch loads: the version, byte order and storage alignment."""
    if f"{prefix}/constants.pkl" in entries:
        raise ZipFormatError("a TorchScript archive (constants.pkl): torch.load hands it to torch.jit.load")
    version = entries.get(f"{prefix}/.data/version") or entries.get(f"{prefix}/version")
    if version is None:
        raise ZipFormatError("the archive has no version record, which torch requires")
    match = _LEADING_INTEGER.match(read_record(fd, version)[:64])
    if match is None or int(match.group(1)) not in TORCH_VERSIONS:
        raise ZipFormatError(f"record {version.name!r} holds no archive version torch reads "
                             f"({TORCH_VERSIONS.start}..{TORCH_VERSIONS.stop - 1})")
    order = entries.get(f"{prefix}/byteorder")
    if order is not None and read_record(fd, order) != b"little":
        raise ZipFormatError("the byteorder record is not 'little': torch would byte-swap (or refuse) every "
                             "tensor; ckptmigrate reads little-endian files only")
    for name in (".format_version", ".data/serialization_id"):
        entry = entries.get(f"{prefix}/{name}")
        if entry is not None:
            read_record(fd, entry)
    alignment = entries.get(f"{prefix}/.storage_alignment")
    if alignment is not None:
        raw = read_record(fd, alignment)  # its CRC refusal is its own
        try:
            int(raw[:64])
        except ValueError:
            raise ZipFormatError("the .storage_alignment record is not a number, which torch requires") from None
