"""An object written in order as pieces: new bytes, or a byte range of the object read, unchanged.

A streamed rewrite (formats/zipstream) sends the new object as it is produced, without a local
file; a writer copies an unchanged range server-side where the store can (S3's ``UploadPartCopy``)
and reads it back and sends it elsewhere. Before the one step that replaces the object, the object
to be is read back through :class:`Planned`: the small new bytes (headers, ``data.pkl``, envelope,
central directory) held in memory, the kept ranges read from the old object, and of a new
tensor's bytes only what was held (its edges): any other read of them is an error, never bytes
made up.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ckptmigrate.errors import BadInput
from ckptmigrate.storage.ranges import RangeFile


@dataclass(frozen=True, slots=True)
class Kept:
    """Bytes ``[start, start + size)`` of the object read, unchanged in the new one."""

    start: int
    size: int


#: One piece of a streamed object, in order.
Piece = bytes | memoryview | Kept


def length(piece: Piece) -> int:
    return piece.size if isinstance(piece, Kept) else len(piece)


def merged(pieces: Iterable[Piece]) -> Iterator[Piece]:
    """``pieces`` with each run of kept ranges that follow one another in the old object joined
    into one (a record's header and data kept as they were, then the next: one server-side copy)."""
    run: Kept | None = None
    for piece in pieces:
        if isinstance(piece, Kept):
            if run is not None and run.start + run.size == piece.start:
                run = Kept(run.start, run.size + piece.size)
                continue
            if run is not None:
                yield run
            run = piece
            continue
        if run is not None:
            yield run
            run = None
        if len(piece):
            yield piece
    if run is not None:
        yield run


def read_through(old: RangeFile, pieces: Iterable[Piece], step: int) -> Iterator[bytes | memoryview]:
    """The object's bytes in order, at most ``step`` at a time: new bytes as they are, kept ranges
    read from ``old`` (a store that cannot copy a range server-side sends them again)."""
    for piece in pieces:
        if isinstance(piece, Kept):
            for start in range(piece.start, piece.start + piece.size, step):
                yield from old.chunks(start, min(piece.start + piece.size, start + step))
        else:
            view = memoryview(piece).cast("B")
            for start in range(0, len(view), step):
                yield view[start : start + step]


class Planned:
    """The object as a streamed write makes it, for the read-back before the commit: pieces are
    added as they are sent (:meth:`add`); a new piece's bytes are held, or (:meth:`add_unheld`)
    only its edges."""

    def __init__(self, base: RangeFile) -> None:
        self.base = base
        self.url = base.url
        self.size = 0
        self._starts: list[int] = []
        self._parts: list[tuple[int, bytes | Kept | None]] = []  # (end, bytes held / old range / not held)

    def add(self, piece: Piece) -> None:
        n = length(piece)
        if n:
            self._starts.append(self.size)
            self.size += n
            self._parts.append((self.size, piece if isinstance(piece, Kept) else bytes(piece)))

    def add_unheld(self, n: int) -> None:
        """``n`` new bytes not held (the middle of a new tensor)."""
        if n:
            self._starts.append(self.size)
            self.size += n
            self._parts.append((self.size, None))

    def pread(self, n: int, offset: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        out = []
        pos, stop = offset, offset + n
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < stop:
            start = self._starts[i]
            end, what = self._parts[i]
            take = min(stop, end) - pos
            if what is None:
                raise BadInput(f"{self.url}: the read-back of the object to be asked for new tensor bytes "
                               f"{pos}-{pos + take - 1}, which the streamed write does not hold; nothing was written",
                               path=str(self.url))
            if isinstance(what, Kept):
                out.append(self.base.pread(take, what.start + pos - start))
            else:
                out.append(what[pos - start : pos - start + take])
            pos += take
            i += 1
        return b"".join(out)

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Hints for the kept ranges, as the old object's ranges."""
        wanted = []
        for offset, n in ranges:
            i = bisect.bisect_right(self._starts, offset) - 1
            pos, stop = offset, min(self.size, offset + n)
            while 0 <= i < len(self._parts) and pos < stop:
                end, what = self._parts[i]
                if isinstance(what, Kept):
                    wanted.append((what.start + pos - self._starts[i], min(stop, end) - pos))
                pos = end
                i += 1
        self.base.prefetch(wanted)

    def close(self) -> None:
        """The base belongs to the checkpoint read; nothing of its own to close."""
