"""A torch zip produced in order, as pieces to send (storage/pieces), byte for byte what
:func:`ckptmigrate.formats.torchzip.write` writes for the same payload and serialization id.

A remote object rewritten with tensors that change is sent as it is produced, without a local
file: each record's local header holds its CRC-32, known before its bytes for a storage kept from
the object read (its central directory entry's) and for a computed tensor (in memory, whole, when
it is written); a kept record is a range of the old object (:class:`~ckptmigrate.storage.pieces.Kept`),
with its header too when the header is the one already there. Anything else (a storage of another
file, tensor bytes whose CRC is not known, DCP runs) is refused by :func:`refusal`, and written the
staged way.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

from ckptmigrate.formats.torchzip import ENVELOPE_RECORD, Pickled, fixed_records, tensor_bytes
from ckptmigrate.formats.zipio import ZipLayout
from ckptmigrate.storage.pieces import Kept, Piece, Planned
from ckptmigrate.tensors.refs import Deferred, Source, Storage, file_runs

#: A new record up to this size is held whole for the read-back: its walk of the archive reads
#: windows of up to 64 KiB (zipread's read-ahead), across small records' bytes.
HELD_WHOLE = 64 << 10
#: Of a larger new record, the first and last bytes held: the walk reads the 512 bytes after
#: each local header and the 32 before it.
EDGE = 4 << 10
#: The most bytes of small new records held for the read-back; past it, the write is staged.
MAX_HELD = 64 << 20


class ZipEmitter(ZipLayout):
    """:class:`~ckptmigrate.formats.zipio.ZipWriter`'s layout, handed back instead of written."""

    def header(self, name: str, size: int, crc: int) -> bytes:
        """The local header of the next record (``size`` bytes of data, ``crc``); the caller sends
        the data after it."""
        raw = name.encode("utf-8")
        head = self._header(raw, size, crc)
        self._finish((raw, self._pos, size, crc), self._pos + len(head))
        return head


#: The records of the archive in order: a name and its bytes (small), or a plan's storage item.
Records = list[tuple[str, Any]]


def records(pickled: Pickled, envelope: bytes | None, prefix: str, serialization_id: bytes | None) -> Records:
    """The records :func:`ckptmigrate.formats.torchzip.write` writes, in its order."""
    fixed = fixed_records(prefix, serialization_id)
    out: Records = [(f"{prefix}/data.pkl", pickled.data), *fixed[:3]]
    out += [(f"{prefix}/data/{key}", item) for key, item in pickled.plan.records]
    out += fixed[3:]
    if envelope is not None:
        out.append((f"{prefix}/{ENVELOPE_RECORD}", envelope))
    return out


def _nbytes(item: Any) -> int:
    if isinstance(item, (Storage, Deferred)):
        return item.nbytes
    return int(item.numel() * item.element_size())


def refusal(archive: Records, source: Source) -> str | None:
    """Why the archive cannot be streamed from ``source`` (then it is staged), or None."""
    held = 0
    for _name, item in archive:
        if isinstance(item, bytes):
            continue
        if isinstance(item, Storage):
            if item.source is not source or item.crc32 is None or item.offset is None:
                return "a storage of another file, or without a known CRC"
        elif file_runs(item) is not None:
            return "tensor bytes copied from other files"
        elif _nbytes(item) <= HELD_WHOLE:
            held += _nbytes(item)
    return f"{held} bytes of small new tensors (past {MAX_HELD})" if held > MAX_HELD else None


def total_size(archive: Records) -> int:
    """The archive's length, from the records' sizes alone (no tensor is computed)."""
    layout = ZipEmitter()
    for name, item in archive:
        layout.header(name, len(item) if isinstance(item, bytes) else _nbytes(item), 0)
    return layout.position + len(layout.end())


def emit(archive: Records, source: Source, planned: Planned, headers: dict[int, int]) -> Iterator[Piece]:
    """The archive's bytes in order; each piece is also added to ``planned`` (the object to be, for
    the read-back), a new tensor's bytes only by their edges. A tensor is computed when its turn
    comes, and dropped after it is sent. ``headers``: the length of each source record's local
    header, by its data offset (a kept record whose new header is as long may be the same bytes,
    read where the opening of the source already fetched them)."""
    layout = ZipEmitter()
    for name, item in archive:
        if isinstance(item, bytes):
            pieces: list[Piece] = [layout.header(name, len(item), zlib.crc32(item)), item]
        elif isinstance(item, Storage):
            assert item.crc32 is not None and item.offset is not None
            head = layout.header(name, item.nbytes, item.crc32)
            at = item.offset - len(head)
            if headers.get(item.offset) == len(head) and source.pread(len(head), at) == head:  # as it was
                pieces = [Kept(at, len(head) + item.nbytes)]
            else:
                pieces = [head, Kept(item.offset, item.nbytes)]
        else:
            yield from _computed(layout, name, item, planned)
            continue
        for piece in pieces:
            planned.add(piece)
            yield piece
    end = layout.end()
    planned.add(end)
    yield end


def _computed(layout: ZipEmitter, name: str, item: Any, planned: Planned) -> Iterator[Piece]:
    data = tensor_bytes(item)
    if len(data) != _nbytes(item):
        raise ValueError(f"record {name!r}: expected {_nbytes(item)} bytes, got {len(data)}")
    head = layout.header(name, len(data), zlib.crc32(data))
    planned.add(head)
    if len(data) <= HELD_WHOLE:
        planned.add(data)
    else:
        planned.add(data[:EDGE])
        planned.add_unheld(len(data) - 2 * EDGE)
        planned.add(data[-EDGE:])
    yield head
    yield data
