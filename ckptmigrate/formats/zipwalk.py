"""The walk of an archive from offset 0 to its live central directory: every byte explained, as a
local record, the zero padding before a directory, or a directory (with its end records) that an
in-place append superseded; nothing two readers could read two ways (the rules:
:mod:`ckptmigrate.formats.zipread`)."""

from __future__ import annotations

import bisect
import struct
from itertools import chain, repeat
from operator import add, itemgetter, sub

from ckptmigrate.formats import native
from ckptmigrate.formats.zipdirectory import DirectoryReader
from ckptmigrate.formats.zipformat import (
    DESCRIPTOR32,
    DESCRIPTOR64,
    FLAG_DESCRIPTOR,
    FLAGS_ALLOWED,
    LOCAL,
    MAX32,
    MAX_VERSION_NEEDED,
    PAGE,
    SIG_CENTRAL,
    SIG_DESCRIPTOR,
    SIG_EOCD,
    SIG_EOCD64,
    SIG_LOCAL,
    TAG_PADDING,
    TAG_ZIP64,
    ByteSource,
    CentralEntry,
    ZipFormatError,
    check_name,
    extra_fields,
    pread,
    prefetch,
    zip64_values,
)

#: The C parse of the common case (``_zipscan.c``): None where not built or not wanted. Each of its
#: functions gives what the Python code here gives, or None for the Python code to read and judge.
_scan = native.load("_zipscan")
_LOCAL_REST = struct.Struct("<14s12sHH")  # a local header: its first 14 bytes, CRC and sizes, name and extra lengths
_PADDING_HEAD = struct.Struct("<HH")  # the padding extra field's tag and length
_STATED = struct.Struct("<III")  # a local header's CRC and sizes
_NO_SIZES = bytes(12)  # the CRC and sizes of a local header that leaves them to a data descriptor
_SCAN = 1 << 20
#: The first bytes scanned for a data descriptor (then twice as many, up to _SCAN): a superseded
#: ``data.pkl`` is often small, and over a network every byte scanned is fetched.
_FIRST_SCAN = 64 << 10
_BLOCK = 512  # a local header and its name and extra field, read at once
#: Where records are small (a run of small tensors), the walk reads this many bytes at once and
#: finds the next headers and data descriptors in them: one read for hundreds of records.
_WINDOW = 64 << 10
#: The fewest listed records of a window the walk checks at once (:meth:`Walk.listed_run`).
_MIN_RUN = 8
_RAW_NAME, _NAME, _CRC, _SIZE = itemgetter(0), itemgetter(1), itemgetter(3), itemgetter(4)  # of a CentralEntry


class Walk(DirectoryReader):
    """Reads every structure of an archive in order, from where its records begin to its live directory."""

    def __init__(self, src: ByteSource, length: int) -> None:
        super().__init__(src, length)
        self._buf, self._at, self._ahead = b"", 0, 0  # the walk's window: bytes, their offset, read-ahead
        self._heads: list[int] = []  # the listed local headers, in order: where a window may end
        self._run_from = 0  # where the walk may next try :meth:`listed_run` (past a window where it failed)

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

    def walk(self, live: dict[int, CentralEntry], cd_offset: int, start: int = 0,
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

    def superseded_record(self, pos: int, live: dict[int, CentralEntry], limit: int) -> tuple[str, int, int] | None:
        """The record at ``pos``, which the directory ``live`` does not list, read as the walk reads a
        superseded record: (name, size, data offset)."""
        self.live, self.records = live, {}
        self.record(pos, self.window(min(_BLOCK, limit - pos), pos, limit), limit)
        return self.records.get(pos)

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
        if sig != 0x04034B50 or needed > MAX_VERSION_NEEDED or flags & ~FLAGS_ALLOWED or method:
            return None
        tail = DESCRIPTOR32.size if flags & FLAG_DESCRIPTOR else 0
        if max(sizes) >= MAX32 or (tail and starts[-1] >= MAX32):
            return None
        nlens = list(map(len, raw_names))
        xlens = list(map(sub, map(sub, map(sub, nexts, starts), map(add, sizes, nlens)), repeat(30 + tail)))
        try:
            heads = map(_LOCAL_REST.pack, repeat(front),
                        map(_STATED.pack, crcs, sizes, sizes) if not tail else repeat(_NO_SIZES), nlens, xlens)
            paddings = map(_PADDING_HEAD.pack, repeat(TAG_PADDING), map(sub, xlens, repeat(4)))
            if tail:
                descriptors = map(DESCRIPTOR32.pack, repeat(0x08074B50), crcs, sizes, sizes)
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

    def listed_in_window(self, pos: int, central: CentralEntry, limit: int) -> int | None:
        """:meth:`listed_record` read in place from the walk's window (no block copied out of it),
        when the record's header is in it; the same result, or None to read it the other ways."""
        rel = pos - self._at
        return None if rel < 0 else self._listed(self._buf, self._at, pos, central, limit)

    def listed_record(self, pos: int, block: bytes, central: CentralEntry, limit: int) -> int | None:
        """:meth:`record` for a record the directory lists, as torch writes it (its name, the padding
        extra field, a data descriptor that agrees), in fewer steps; None for anything else, which
        :meth:`record` then reads (and judges) the general way."""
        return self._listed(block, pos, pos, central, limit)

    def _listed(self, buf: bytes, base: int, pos: int, central: CentralEntry, limit: int) -> int | None:
        """The listed record whose local header is at ``pos``, read from ``buf`` (the bytes from file
        offset ``base``): its end, or None."""
        rel = pos - base
        if rel + 30 > len(buf):
            return None
        (sig, needed, flags, method, _time, _date, crc, csize, usize, nlen, xlen) = LOCAL.unpack_from(buf, rel)
        raw_name = central.raw_name
        name_end = rel + 30 + nlen
        if (sig != 0x04034B50 or needed > MAX_VERSION_NEEDED or flags & ~FLAGS_ALLOWED or method
                or name_end + xlen > len(buf) or nlen != len(raw_name) or not buf.startswith(raw_name, rel + 30)
                or not buf.startswith(b"FB", name_end)
                or int.from_bytes(buf[name_end + 2 : name_end + 4], "little") != xlen - 4):
            return None
        size = central.size
        described = flags & FLAG_DESCRIPTOR
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
            if at >= 0 and at + DESCRIPTOR32.size <= len(buf):
                tail = DESCRIPTOR32.unpack_from(buf, at)
            else:
                raw = self.window(DESCRIPTOR32.size, end, limit)
                if len(raw) != DESCRIPTOR32.size:
                    return None
                tail = DESCRIPTOR32.unpack(raw)
            if tail != (0x08074B50, central.crc, size, size):
                return None
            end += DESCRIPTOR32.size
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
        (_sig, needed, flags, method, _time, _date, crc, csize, usize, nlen, xlen) = LOCAL.unpack_from(block)
        raw_extra = block[30 : 30 + nlen + xlen]
        if len(raw_extra) != nlen + xlen:
            raw_extra = self.pread(nlen + xlen, pos + 30, "a local header")
        where = f"record {central.name!r}" if central else f"a superseded record at offset {pos}"
        if central is not None and raw_extra[:nlen] == central.raw_name:
            name = central.name  # checked with the directory, inside the archive folder
        else:
            name = check_name(raw_extra[:nlen], where)
            if name.split("/")[0] != self.prefix:
                raise ZipFormatError(f"{where}: {name!r} is outside the archive folder {self.prefix!r}")
        if needed > MAX_VERSION_NEEDED or flags & ~FLAGS_ALLOWED or method != 0:
            raise ZipFormatError(f"{where}: its local header asks for compression or zip features torch does not write")
        extra = raw_extra[nlen:]
        if extra[:2] == b"FB" and int.from_bytes(extra[2:4], "little") == xlen - 4:
            fields = {TAG_PADDING: extra[4:]}  # torch's padding, the whole extra field
        else:
            fields = extra_fields(extra, (TAG_ZIP64, TAG_PADDING), where)
        described = bool(flags & FLAG_DESCRIPTOR)
        deferred = described and (crc, csize, usize) == (0, 0, 0)
        if not deferred:
            usize, csize = zip64_values([usize, csize], fields.get(TAG_ZIP64), where, exact=False)
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
        dd = DESCRIPTOR64 if long else DESCRIPTOR32
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
                dd = DESCRIPTOR64 if long or dd_at - data >= MAX32 else DESCRIPTOR32
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
