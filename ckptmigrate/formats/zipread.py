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
records in their old order) is read in C where ``_zipscan`` is built (each module's ``_scan``);
anything else it hands back, stage by stage, to the Python code, which then reads and judges it.

The parse is four modules: :mod:`~ckptmigrate.formats.zipformat` (the structures and the records
found), :mod:`~ckptmigrate.formats.zipdirectory` (end records and central directories),
:mod:`~ckptmigrate.formats.zipwalk` (every byte from offset 0 to the live directory) and this one
(an archive, or an append to one, read whole; what torch reads before the payload).
"""

from __future__ import annotations

import re
from functools import partial
from itertools import filterfalse
from operator import itemgetter
from typing import Any

from ckptmigrate.formats import native
from ckptmigrate.formats.zipdirectory import names_by_header
from ckptmigrate.formats.zipformat import (
    SIG_EOCD,
    SIG_LOCAL,
    ByteSource,
    CentralEntry,
    Entries,
    ZipEntry,
    ZipFormatError,
    read_record,
)
from ckptmigrate.formats.zipwalk import Walk
from ckptmigrate.util.gcpause import pausing

#: The C parse of the common case (``_zipscan.c``): None where not built or not wanted. Each of its
#: functions gives what the Python code here gives, or None for the Python code to read and judge.
_scan = native.load("_zipscan")
#: torch refuses an archive whose ``version`` record is outside this range (caffe2/serialize/versions.h).
TORCH_VERSIONS = range(1, 0xA + 1)
_LEADING_INTEGER = re.compile(rb"[ \t\n\v\f\r]*\+?([0-9]+)")


@pausing
def read_archive(fd: ByteSource, length: int) -> Entries:
    """The records of the torch zip archive in the first ``length`` bytes of ``fd``, refusing any
    archive that miniz (torch) and another zip reader could read differently (see the module)."""
    try:
        return _read_archive(fd, length)
    except ZipFormatError as exc:
        raise ZipFormatError(f"{exc}; re-save it with torch.save (or restore a copy)") from None


def _read_archive(fd: ByteSource, length: int) -> Entries:
    reader = Walk(fd, length)
    if length < 30 + 46 + 22:
        raise ZipFormatError("the file is too short to be a zip archive")
    if reader.pread(4, 0, "the first local header") != SIG_LOCAL:
        raise ZipFormatError("the file does not start with a zip local header (torch reads only those)")
    eocd, comment = reader.find_end_record()
    n, cd_size, cd_offset, _end = reader.end_records(eocd, "the end record", comment)
    centrals = reader.directory(reader.pread(cd_size, cd_offset, "the central directory"), n, "the archive")
    live = names_by_header(reader, centrals)
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
    reader = Walk(fd, length)
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
    live = names_by_header(reader, centrals)
    before, superseded = _listed_and_superseded(live, list(base.values()), base_length)
    for old in superseded:
        if reader.superseded_record(old.header_offset, live, cd_offset) != (old.name, old.size, old.data_offset):
            raise ZipFormatError(f"record {old.name!r}, which the append supersedes, reads differently once "
                                 "superseded (its data descriptor is ambiguous)")
    reader.walk(live, cd_offset, base_length, before)
    records = reader.records
    entries = _entries(centrals, records)
    _check_torch_records(fd, entries, reader.prefix or "")
    return entries


def _listed_and_superseded(live: dict[int, CentralEntry], olds: list[ZipEntry],
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


def _listed_before(live: dict[int, CentralEntry], old_by_offset: dict[int, ZipEntry],
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


_RAW_NAME, _NAME, _CRC, _SIZE, _HEADER = (itemgetter(0), itemgetter(1), itemgetter(3), itemgetter(4),
                                          itemgetter(5))  # of a CentralEntry
_DATA = itemgetter(2)  # a walked record's data offset
_C_NAME_SIZE_CRC = itemgetter(1, 4, 3)  # of a CentralEntry
# of a ZipEntry
_ENTRY_HEADER, _NAME_SIZE_CRC, _NAME_SIZE_DATA = itemgetter(1), itemgetter(0, 3, 4), itemgetter(0, 3, 2)


def _entries(centrals: list[CentralEntry], records: dict[int, tuple[str, int, int]]) -> Entries:
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
