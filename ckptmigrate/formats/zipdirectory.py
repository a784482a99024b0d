"""An archive's end records and central directories: what it says it holds, accepted only where
miniz (torch) and ``zipfile`` read it alike (the rules: :mod:`ckptmigrate.formats.zipread`)."""

from __future__ import annotations

import struct
from itertools import repeat
from operator import itemgetter

from ckptmigrate.formats import native
from ckptmigrate.formats.zipformat import (
    CANONICAL,
    CENTRAL,
    EOCD,
    EOCD64,
    FLAGS_ALLOWED,
    LOCATOR64,
    MAX16,
    MAX32,
    MAX_VERSION_NEEDED,
    SIG_EOCD,
    SIG_LOCATOR64,
    TAG_ZIP64,
    ByteSource,
    CentralEntry,
    ZipFormatError,
    check_name,
    extra_fields,
    pread,
    zip64_values,
)

#: The C parse of the common case (``_zipscan.c``): None where not built or not wanted. Each of its
#: functions gives what the Python code here gives, or None for the Python code to read and judge.
_scan = native.load("_zipscan")
_MINIZ_BLOCK = 4096  # what miniz reads at a time looking for the end record
_DOS_DIRECTORY = 0x10
#: The largest central directory read (it is read whole): a bound on memory whatever the file claims.
MAX_DIRECTORY = 256 << 20
#: torch copies the first record's name into a buffer this long (NUL included) to find the folder
_TORCH_NAME_BUFFER = 512
_NAME, _HEADER = itemgetter(1), itemgetter(5)  # of a CentralEntry


class DirectoryReader:
    """Reads an archive's end records and central directories, and holds the folder its names are in."""

    def __init__(self, src: ByteSource, length: int) -> None:
        self.src, self.length = src, length
        self.prefix: str | None = None

    def pread(self, n: int, offset: int, what: str) -> bytes:
        data = pread(self.src, n, offset) if n else b""
        if len(data) != n:
            raise ZipFormatError(f"{what} runs past the end of the file; it is truncated")
        return data

    def find_end_record(self) -> tuple[int, int]:
        """(where the end record is, the length of the comment after it): at the end of the file, or
        before a comment only where every reader takes the same one and miniz's search reaches it."""
        length = self.length
        eocd = length - 22
        if self.pread(4, eocd, "the end record") == SIG_EOCD:
            return eocd, 0
        # a comment may follow the end record if no end record signature is in it: every reader then
        # takes the same one (miniz and zipfile both take the last signature before the end)
        start = max(0, length - MAX16 - 22)
        last = pread(self.src, length - start, start)[:-18].rfind(SIG_EOCD)  # 22 bytes after it, as miniz asks
        if last < 0:
            raise ZipFormatError("the archive has no end-of-central-directory record: it is truncated")
        eocd, comment = start + last, length - start - last - 22
        if struct.unpack("<H", self.pread(2, eocd + 20, "the end record"))[0] != comment:
            raise ZipFormatError(
                f"{comment} bytes follow the archive's end record, and zip readers may pick different end "
                "records; if an in-place write was interrupted, "
                f"`truncate -s {eocd + 22}` gives back the archive it appended to")
        if not _miniz_reaches(length, eocd):
            raise ZipFormatError(
                f"its {comment}-byte comment puts the end record where torch (miniz) fails to find it in a "
                f"file of {length} bytes")
        return eocd, comment

    def end_records(self, eocd: int, where: str, comment_len: int = 0) -> tuple[int, int, int, int]:
        """(entries, directory size, directory offset, where the directory must end) from the end
        record at ``eocd`` (followed by a comment of ``comment_len`` bytes) and the zip64 records before it."""
        sig, disk, cd_disk, n_disk, n, cd_size, cd_offset, comment = EOCD.unpack(self.pread(22, eocd, where))
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
            _sig, loc_disk, rel, disks = LOCATOR64.unpack(self.pread(20, eocd - 20, where))
            if loc_disk != 0 or disks != 1:
                raise ZipFormatError(f"{where}: its zip64 locator spans several disks")
            if rel != eocd - 20 - 56:
                raise ZipFormatError(f"{where}: its zip64 end record is not right before its locator "
                                     "(miniz follows the locator, zipfile does not)")
            (sig64, size64, _made, needed, disk64, cd_disk64, n_disk64, n64, cd_size64,
             cd_offset64) = EOCD64.unpack(self.pread(56, rel, where))
            if sig64 != 0x06064B50 or size64 != 44 or needed > MAX_VERSION_NEEDED:
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

    def directory(self, cd: bytes, count: int, where: str) -> list[CentralEntry]:
        """Exactly ``count`` entries filling ``cd``: an entry past the count is read by zipfile only."""
        if _scan is not None:
            scanned: list[CentralEntry] | None = _scan.directory(cd, count, CentralEntry)
            if scanned is not None:
                return scanned
        out: list[CentralEntry] = []
        append = out.append
        unpack_from = CENTRAL.unpack_from
        fullmatch = CANONICAL.fullmatch
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
            name = raw.decode("ascii") if fullmatch(raw) else check_name(raw, f"{where}: a record")
            if needed > MAX_VERSION_NEEDED or flags & ~FLAGS_ALLOWED:
                raise ZipFormatError(f"record {name!r} needs zip features torch does not write (flags {flags:#06x})")
            if method != 0:
                raise ZipFormatError(f"record {name!r} is compressed (method {method}); torch writes stored records")
            if clen or disk or eattr & _DOS_DIRECTORY:
                raise ZipFormatError(f"record {name!r} has a comment, another disk or the directory attribute")
            if xlen or usize == MAX32 or csize == MAX32 or offset == MAX32:
                what = f"record {name!r}"
                fields = extra_fields(cd[name_end : name_end + xlen], (TAG_ZIP64,), what)
                usize, csize, offset = zip64_values([usize, csize, offset], fields.get(TAG_ZIP64), what, exact=True)
            if usize != csize:
                raise ZipFormatError(f"record {name!r} has inconsistent sizes")
            append(new(CentralEntry, (raw, name, flags, crc, usize, offset)))
            pos = end
        if pos != len(cd):
            raise ZipFormatError(f"{where}: the central directory holds {len(cd) - pos} bytes past its {count} "
                                 "counted entries (zipfile reads them, miniz does not)")
        return out

    def check_names(self, centrals: list[CentralEntry], where: str) -> None:
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


def _miniz_reaches(length: int, eocd: int) -> bool:
    """Whether miniz's backward search for the end record reaches ``eocd``. It reads blocks of
    _MINIZ_BLOCK bytes from the end of the file, each starting _MINIZ_BLOCK - 3 bytes before the
    last; the step to a block that would start before offset 0 computes a negative offset instead,
    whose read fails (torch.load raises), so a block holding the record must start within the file."""
    block = (length - 4 - eocd) // (_MINIZ_BLOCK - 3)  # the block, counted from the end, holding it
    return block == 0 or length - _MINIZ_BLOCK - block * (_MINIZ_BLOCK - 3) >= 0


def names_by_header(reader: DirectoryReader, centrals: list[CentralEntry]) -> dict[int, CentralEntry]:
    """:meth:`DirectoryReader.check_names` of the live directory, then :func:`by_header`."""
    if _scan is not None:
        scanned: tuple[str, dict[int, CentralEntry]] | None = _scan.names(centrals, reader.prefix)
        if scanned is not None:
            reader.prefix, live = scanned
            return live
    reader.check_names(centrals, "the archive")
    return by_header(centrals)


def by_header(centrals: list[CentralEntry]) -> dict[int, CentralEntry]:
    """The directory's entries by local header offset (built in C); two that share one are refused."""
    live = dict(zip(map(_HEADER, centrals), centrals, strict=True))
    if len(live) != len(centrals):
        live = {}
        for c in centrals:
            if live.setdefault(c.header_offset, c) is not c:
                raise ZipFormatError(f"records {live[c.header_offset].name!r} and {c.name!r} share a local header")
    return live
