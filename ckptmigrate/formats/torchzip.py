"""The torch zip format (``torch.save`` since 1.6): ``<prefix>/data.pkl`` plus one record per storage.

The envelope is one more record, ``<prefix>/.data/ckptmigrate.json``, which ``torch.load``
ignores: UTF-8 JSON, zlib-compressed (RFC 1950) when it is larger than :data:`COMPRESS_ABOVE` bytes
(the schema and inverse journal of a large model are mostly repeated key names).
:func:`write_metadata_only` rewrites a file whose tensors are all still in it: records are copied by
the kernel (or reused in place) and only ``data.pkl``, the envelope and the central directory are
new; :func:`append_in_place` appends those three to the file itself.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator
from itertools import repeat
from json import encoder as _json_encoder
from json.encoder import encode_basestring_ascii  # json's own string encoder (C)
from operator import attrgetter, is_, itemgetter, methodcaller
from typing import Any, BinaryIO

from ckptmigrate.formats import boundedjson, native
from ckptmigrate.formats.pickle_writer import dump
from ckptmigrate.formats.pickled import PickleFormatError, load
from ckptmigrate.formats.zipio import (
    APPEND_END,
    Entries,
    ZipEntry,
    ZipFormatError,
    ZipWriter,
    copy_range,
    live_length,
    read_appended_entries,
    read_entries,
    read_record,
)
from ckptmigrate.tensors.refs import (
    Deferred,
    Source,
    Storage,
    TensorRef,
    dtype_of,
    file_runs,
    shape_of,
    to_torch,
)

_encode = native.load("_encode")
#: json's C string encoder, which ``_encode.schema_json`` calls (None where json has no C accelerator)
_C_ENCODE_STR: Any = getattr(_json_encoder, "c_encode_basestring_ascii", None)
ENVELOPE_RECORD = ".data/ckptmigrate.json"
COMPRESS_ABOVE = 4096
#: Bounds of an envelope, checked before it is inflated or parsed: its JSON text (inflated) in bytes,
#: its values (strings, numbers, containers...) and its nesting. A stamped model of 1,000 tensors with
#: digests has an envelope of ~180 KB and ~12,000 values.
MAX_ENVELOPE = 32 << 20
MAX_ENVELOPE_VALUES = 2_000_000
MAX_ENVELOPE_DEPTH = 64
_CHUNK = 16 << 20
_COMPARE = 1 << 20  # bytes read back at a time to compare with what was written


class TorchZipError(ValueError):
    pass


def foreign_archive(names: Iterable[str]) -> str | None:
    """What a zip archive that torch writes but that is no checkpoint is, from its record names:
    ``torch.load`` itself hands a TorchScript archive (``constants.pkl``) to ``torch.jit.load``."""
    # the names joined by NUL (which no name holds) and lower-cased: searched in C, not name by name
    joined = "\0" + "\0".join(names).lower() + "\0"

    def tail(start: str) -> bool:
        """Whether a name's part after its first ``/`` starts with ``start``."""
        at = joined.find("/" + start)
        while at >= 0:
            if "/" not in joined[joined.rfind("\0", 0, at) + 1 : at]:
                return True
            at = joined.find("/" + start, at + 1)
        return False

    if tail("constants.pkl\0") or tail("code/__torch__/"):
        return ("a TorchScript archive (torch.jit.save), not a checkpoint: its modules are compiled code, which "
                "ckptmigrate cannot migrate; migrate the state dict (torch.save(model.state_dict())) instead")
    if tail("archive_format\0") or tail("models/model.json\0"):
        return ("a torch.export archive (.pt2, torch.export.save), not a checkpoint: ckptmigrate cannot migrate "
                "it; migrate the state dict (torch.save(model.state_dict())) and export again")
    return None


_ENDS_DATA_PKL = methodcaller("endswith", "/data.pkl")


def archive_prefix(entries: dict[str, ZipEntry]) -> str:
    prefixes = {name[: -len("/data.pkl")] for name in filter(_ENDS_DATA_PKL, entries)}
    prefixes = {p for p in prefixes if "/" not in p}
    if len(prefixes) != 1:
        raise TorchZipError("the zip archive holds no torch checkpoint (no <name>/data.pkl record)")
    return prefixes.pop()


def read(
    source: Source, named: dict[str, bool] | None = None,
) -> tuple[Any, dict[str, Any] | None, dict[str, Storage], str, dict[str, ZipEntry]]:
    """Return (payload, envelope, storages, archive prefix, records) without reading tensor bytes;
    ``named`` receives the globals ``data.pkl`` names (see :func:`ckptmigrate.formats.pickled.load`)."""
    fh: BinaryIO = source._fh
    try:
        entries = read_entries(fh, source.size)
        foreign = foreign_archive(entries)
        if foreign is not None:
            raise TorchZipError(foreign)
        prefix = archive_prefix(entries)
        payload_bytes = read_record(fh, entries[f"{prefix}/data.pkl"])
    except ZipFormatError as exc:
        raise TorchZipError(foreign_archive(_lenient_names(fh)) or str(exc)) from None
    _check_byteorder(fh, entries, prefix)
    storages: dict[str, Storage] = {}
    try:
        payload = load(payload_bytes, storages, named)
    except PickleFormatError as exc:
        raise TorchZipError(f"data.pkl: {exc}") from None
    exact = dict.get  # a name as torch writes it is found exactly; ``entries.get`` then folds case
    folder = f"{prefix}/data/"
    for key, storage in storages.items():
        entry = exact(entries, folder + key) or entries.get(folder + key)
        if entry is None:
            raise TorchZipError(f"storage record data/{key} is missing from the archive")
        if entry.size != storage.nbytes:  # torch.load (without mmap) refuses any other size
            raise TorchZipError(
                f"storage record data/{key} holds {entry.size} bytes, its storage is {storage.nbytes}"
            )
        storage.source, storage.offset, storage.crc32 = source, entry.data_offset, entry.crc
    envelope = None
    env_entry = entries.get(f"{prefix}/{ENVELOPE_RECORD}")
    if env_entry is not None:
        try:
            envelope = parse_envelope(read_record(fh, env_entry))
        except (ZipFormatError, ValueError) as exc:
            raise TorchZipError(f"the ckptmigrate envelope record is unreadable ({exc})") from None
    return payload, envelope, storages, prefix, entries


def _check_byteorder(fh: BinaryIO, entries: Entries, prefix: str) -> None:
    """torch byte-swaps every storage of a file whose ``byteorder`` record says ``big`` (and refuses
    any other word); ckptmigrate reads and writes little-endian bytes only, so it refuses the rest."""
    # miniz may look names up ignoring case, as ``entries`` does (names are unique ignoring case)
    entry = entries.get(f"{prefix}/byteorder")
    if entry is not None:
        try:
            order = read_record(fh, entry)
        except ZipFormatError as exc:
            raise TorchZipError(str(exc)) from None
        if order != b"little":
            raise TorchZipError(
                f"the byteorder record says {order[:16].decode('ascii', 'replace')!r}: torch would byte-swap (or "
                "refuse) every tensor, and ckptmigrate handles little-endian files only; re-save it with torch.save"
            )


def _lenient_names(fh: BinaryIO) -> list[str]:
    """The record names Python's zipfile sees, for naming a foreign archive that the strict reader
    refused (TorchScript compresses its code records); empty when it sees none."""
    import zipfile

    try:
        fh.seek(0)
        with zipfile.ZipFile(fh) as archive:
            return archive.namelist()
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return []


def read_envelope(source: Source) -> dict[str, Any] | None:
    fh: BinaryIO = source._fh
    try:
        entries = read_entries(fh, source.size)
        foreign = foreign_archive(entries)
        if foreign is not None:
            raise TorchZipError(foreign)
        prefix = archive_prefix(entries)
        entry = entries.get(f"{prefix}/{ENVELOPE_RECORD}")
        return None if entry is None else parse_envelope(read_record(fh, entry))
    except ZipFormatError as exc:
        raise TorchZipError(foreign_archive(_lenient_names(fh)) or str(exc)) from None
    except ValueError as exc:
        raise TorchZipError(str(exc)) from None


def envelope_bytes(envelope: dict[str, Any]) -> bytes:
    """The envelope record's bytes. zlib's fastest level: on an envelope's repeated key names it
    compresses as well as the default (level 6) in a quarter of the time (2.6 MB of JSON for a
    rename of 20,000 tensors: 247 KB in 6 ms, against 256 KB in 29 ms)."""
    raw = _envelope_json(envelope).encode()
    return zlib.compress(raw, 1) if len(raw) > COMPRESS_ABOVE else raw


def _envelope_json(envelope: dict[str, Any]) -> str:
    """``json.dumps(envelope, separators=(",", ":"), sort_keys=True)``, with the schema (a few
    distinct entries repeated under thousands of keys) encoded by :func:`_schema_json`."""
    schema = _schema_json(envelope.get("schema"))
    if schema is not None:
        marker = os.urandom(16).hex()  # stands for the schema in the text, found exactly once
        text = json.dumps({**envelope, "schema": marker}, separators=(",", ":"), sort_keys=True)
        field = f'"schema":"{marker}"'
        if text.count(field) == 1:
            return text.replace(field, '"schema":' + schema)
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True)


def _schema_json(schema: Any) -> str | None:
    """What ``json.dumps`` gives for a schema (string keys, each ``{"shape": [ints], "dtype": str}``),
    each distinct entry encoded once: twice as fast for many keys (five times in C,
    ``_encode.schema_json``, which hands anything else back). None for anything else."""
    if type(schema) is not dict:
        return None
    if _encode is not None and _C_ENCODE_STR is not None and set(map(type, schema)) <= {str}:
        got = _encode.schema_json(sorted(schema), schema, _C_ENCODE_STR)
        if got is not None:
            return got
    entries: dict[tuple[Any, ...], str] = {}
    parts = []
    for key in sorted(schema) if all(type(k) is str for k in schema) else ():
        value = schema[key]
        if type(value) is not dict or len(value) != 2:
            return None
        shape, dtype = value.get("shape"), value.get("dtype")
        if type(shape) is not list or type(dtype) is not str:
            return None
        for d in shape:  # only exact ints are looked up: [1] == [True] == [1.0], whose text differs
            if type(d) is not int:
                return None
        encoded = entries.get((dtype, *shape))
        if encoded is None:
            encoded = entries[(dtype, *shape)] = json.dumps(value, separators=(",", ":"), sort_keys=True)
        parts.append(encode_basestring_ascii(key) + ":" + encoded)
    if len(parts) != len(schema):
        return None
    return "{" + ",".join(parts) + "}"


def parse_envelope(data: bytes) -> Any:
    """The envelope record: JSON text, or zlib-compressed JSON (its first byte is 0x78, never ``{``),
    within the bounds of :data:`MAX_ENVELOPE`, :data:`MAX_ENVELOPE_VALUES` and :data:`MAX_ENVELOPE_DEPTH`."""
    if data[:1] == b"\x78":
        data = boundedjson.inflate(data, MAX_ENVELOPE)
    envelope = boundedjson.loads(
        data, max_bytes=MAX_ENVELOPE, max_values=MAX_ENVELOPE_VALUES, max_depth=MAX_ENVELOPE_DEPTH
    )
    if not isinstance(envelope, dict):
        raise ValueError("the envelope is not a JSON object")
    return envelope


class _StoragePlan:
    """Assigns each tensor of a payload to a storage record, keeping shared storages shared.

    A storage that comes from a file keeps its record key, so a metadata-only rewrite can point
    the new central directory at the old record.
    """

    def __init__(self) -> None:
        self.records: list[tuple[str, Storage | Deferred | Any]] = []
        self._by_storage: dict[int, tuple[str, Storage]] = {}
        self._by_torch_storage: dict[tuple[int, int, str, str], tuple[str, Storage]] = {}
        self._taken: set[str] = set()
        self._counter = 0

    @property
    def ref_tables(self) -> tuple[dict[int, tuple[str, Storage]], set[str], list[tuple[str, Any]]]:
        """What :meth:`__call__` keeps for a :class:`TensorRef`, for the writer's compiled path to do
        the same (``pickle_writer._encode``): the storages seen by id, the record keys taken, the records."""
        return self._by_storage, self._taken, self.records

    def done(self) -> None:
        """Drop what assigning records needed, keeping :attr:`records` (a few MB per 100,000 tensors)."""
        self._by_storage.clear()
        self._by_torch_storage.clear()
        self._taken.clear()

    def _fresh(self, wanted: str | None = None) -> str:
        if wanted is not None and wanted not in self._taken:
            key = wanted
        else:
            while str(self._counter) in self._taken:
                self._counter += 1
            key = str(self._counter)
        self._taken.add(key)
        return key

    def __call__(self, obj: Any) -> tuple[str, Storage]:
        if type(obj) is TensorRef:  # the usual case, at once: a storage not seen yet keeps its key if free
            storage = obj.storage
            known = self._by_storage.get(id(storage))
            if known is None:
                key = storage.key
                if key is None or key in self._taken:
                    key = self._fresh()
                else:
                    self._taken.add(key)
                known = self._by_storage[id(storage)] = (key, storage)
                self.records.append((key, storage))
            return known
        if isinstance(obj, (TensorRef, Storage)):
            storage = obj.storage if isinstance(obj, TensorRef) else obj
            known = self._by_storage.get(id(storage))
            if known is None:
                known = (self._fresh(storage.key), storage)
                self._by_storage[id(storage)] = known
                self.records.append((known[0], storage))
            return known
        if isinstance(obj, Deferred):
            key = self._fresh()
            storage = Storage(key, obj.dtype, "cpu", obj.nbytes)
            self.records.append((key, obj))
            return key, storage
        return self._torch_storage(obj)

    def _torch_storage(self, tensor: Any) -> tuple[str, Storage]:
        """A torch tensor's whole storage, as ``torch.save`` writes it: tensors that view the same
        storage (tied weights) share one record and keep their offsets and strides."""
        import torch

        untyped = tensor.untyped_storage()
        dtype = dtype_of(tensor)
        ident = (untyped.data_ptr(), untyped.nbytes(), str(untyped.device), dtype)
        known = self._by_torch_storage.get(ident) if ident[0] else None
        if known is None:
            key = self._fresh()
            known = (key, Storage(key, dtype, "cpu", untyped.nbytes()))
            if ident[0]:
                self._by_torch_storage[ident] = known
            whole = torch.empty(0, dtype=torch.uint8, device=untyped.device).set_(untyped)
            self.records.append((key, whole))
        return known


def tensor_bytes(obj: Any) -> memoryview:
    """The bytes a storage record of the tensor entry ``obj`` holds (computed, if it is)."""
    import torch

    tensor = to_torch(obj).resolve_conj().resolve_neg().contiguous()
    if tuple(tensor.shape) != shape_of(obj):
        raise ValueError(f"tensor shape {tuple(tensor.shape)} differs from planned {shape_of(obj)}")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _tensor_chunks(obj: Any) -> Iterator[memoryview]:
    view = tensor_bytes(obj)
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def _run_chunks(runs: list[tuple[Source, int, int]]) -> Iterator[memoryview]:
    for source, offset, length in runs:
        view = memoryview(source.map())
        for start in range(offset, offset + length, _CHUNK):
            yield view[start : min(offset + length, start + _CHUNK)]


def _storage_chunks(storage: Storage) -> Iterator[memoryview]:
    assert storage.source is not None and storage.offset is not None
    view = memoryview(storage.source.map())
    end = storage.offset + storage.nbytes
    for start in range(storage.offset, end, _CHUNK):
        yield view[start : min(end, start + _CHUNK)]


def fixed_records(prefix: str, serialization_id: bytes | None) -> list[tuple[str, bytes]]:
    """The small records :func:`write` writes around the storages (the first three before them);
    ``serialization_id`` None: a new random one, as ``torch.save`` writes."""
    return [
        (f"{prefix}/.format_version", b"1"),
        (f"{prefix}/.storage_alignment", b"64"),
        (f"{prefix}/byteorder", b"little"),
        (f"{prefix}/version", b"3\n"),
        (f"{prefix}/.data/serialization_id",
         serialization_id or str(int.from_bytes(os.urandom(16))).zfill(40).encode()),
    ]


def write(
    fh: BinaryIO, payload: Any, envelope: dict[str, Any] | None, *, prefix: str = "archive",
    serialization_id: bytes | None = None,
) -> None:
    """Stream a payload to a new torch zip file, one storage at a time."""
    plan = _StoragePlan()
    pickled = dump(payload, plan)
    writer = ZipWriter(fh)
    writer.add_bytes(f"{prefix}/data.pkl", pickled)
    for name, data in fixed_records(prefix, serialization_id)[:3]:
        writer.add_bytes(name, data)
    for key, item in plan.records:
        name = f"{prefix}/data/{key}"
        if isinstance(item, Storage):
            assert item.source is not None and item.offset is not None
            if item.crc32 is not None:
                writer.add_copy(name, item.source.fileno(), item.offset, item.nbytes, item.crc32)
            else:
                writer.add_stream(name, item.nbytes, _storage_chunks(item))
        else:
            nbytes = item.nbytes if isinstance(item, Deferred) else item.numel() * item.element_size()
            runs = file_runs(item)  # a tensor whose bytes already sit in files (a DCP tensor's chunks)
            writer.add_stream(name, nbytes, _run_chunks(runs) if runs is not None else _tensor_chunks(item))
    for name, data in fixed_records(prefix, serialization_id)[3:]:
        writer.add_bytes(name, data)
    if envelope is not None:
        writer.add_bytes(f"{prefix}/{ENVELOPE_RECORD}", envelope_bytes(envelope))
    writer.close()


def append_records(fh: BinaryIO, records: dict[str, bytes]) -> None:
    """Add or replace small records of the zip open in ``fh`` (read-write) in place.

    The new records and central directory go where the old directory was; records the new
    directory no longer lists stay as unreferenced bytes.
    """
    fh.flush()
    size = os.fstat(fh.fileno()).st_size
    try:
        entries = read_entries(fh, size)
    except ZipFormatError as exc:
        raise TorchZipError(str(exc)) from None
    prefix = archive_prefix(entries)
    names = {f"{prefix}/{name}" for name in records}
    fh.seek(max(e.data_offset + e.size for e in entries.values()))
    writer = ZipWriter(fh)
    for entry in entries.values():
        if entry.name not in names:
            writer.reuse(entry.name, entry.header_offset, entry.size, entry.crc)
    for name, data in records.items():
        writer.add_bytes(f"{prefix}/{name}", data)
    writer.close()


class Pickled:
    """A payload pickled once, with the storage records its tensors were assigned to: the in-place
    append and the rewrite that replaces it when it cannot be done share it."""

    def __init__(self, payload: Any) -> None:
        self.plan = _StoragePlan()
        self.data = dump(payload, self.plan)
        self.plan.done()
        #: (entries, data_dir, names, records) of the last :func:`_records_as_before` over this plan:
        #: the verification of a metadata-only write reuses what the write found
        self.as_before: tuple[dict[str, ZipEntry], str, list[str], list[ZipEntry] | None] | None = None


def live_end(source: Source) -> int:
    """Where the archive ``source`` holds ends: its length, or less after an interrupted append."""
    return live_length(source, source.size)


def envelope_record(envelope: dict[str, Any] | bytes | None) -> bytes | None:
    """The envelope record's bytes (:func:`envelope_bytes`), once: a caller that verifies the
    written file passes them in already encoded."""
    return envelope_bytes(envelope) if isinstance(envelope, dict) else envelope


def write_metadata_only(
    fh: BinaryIO, source: Source, entries: dict[str, ZipEntry], prefix: str, payload: Any,
    envelope: dict[str, Any] | bytes | None,
) -> None:
    """Rewrite a zip checkpoint whose tensors all live in ``source``: copy the records region as is,
    then append a new ``data.pkl``, the envelope and a central directory naming the live records."""
    payload = payload if isinstance(payload, Pickled) else Pickled(payload)
    region_end = max(e.data_offset + e.size for e in entries.values())
    copy_range(source.fileno(), fh.fileno(), 0, region_end, 0)
    fh.seek(region_end)
    writer = ZipWriter(fh)
    _append_directory(writer, source, entries, prefix, payload, envelope_record(envelope))
    writer.close()


def metadata_tail(
    source: Source, entries: dict[str, ZipEntry], prefix: str, payload: Any, envelope: dict[str, Any] | None,
) -> tuple[int, bytes]:
    """What :func:`write_metadata_only` writes, as (``keep``, ``tail``): the new file is the first
    ``keep`` bytes of ``source`` (its records, unchanged) followed by ``tail`` (a new ``data.pkl``,
    the envelope and a central directory). An object store assembles it without the records moving
    (storage/s3_compose); the records are never read here (a sparse temporary file stands for them)."""
    import tempfile

    payload = payload if isinstance(payload, Pickled) else Pickled(payload)
    keep = max(e.data_offset + e.size for e in entries.values())
    with tempfile.TemporaryFile() as fh:
        os.ftruncate(fh.fileno(), keep)
        fh.seek(keep)
        writer = ZipWriter(fh)
        _append_directory(writer, source, entries, prefix, payload,
                          None if envelope is None else envelope_bytes(envelope))
        end = writer.close()
        return keep, os.pread(fh.fileno(), end - keep, keep)


def appended_tail(
    source: Source, entries: dict[str, ZipEntry], prefix: str, payload: Any, envelope: dict[str, Any] | None,
) -> bytes | None:
    """What :func:`append_in_place` would append to ``source`` (a new ``data.pkl``, envelope and
    central directory after the old end record), byte for byte: the new file is the whole of
    ``source`` followed by these bytes, which an object store that keeps only whole objects
    server-side can assemble (GCS ``compose``, an Azure block list). None when ``source`` does not
    end with its end record (an interrupted append left a tail): only a rewrite fits then. The
    records are never read here (a sparse temporary file stands for them)."""
    import tempfile

    payload = payload if isinstance(payload, Pickled) else Pickled(payload)
    live = live_end(source)
    if live != source.size or live < APPEND_END:
        return None
    with tempfile.TemporaryFile() as fh:
        fd = fh.fileno()
        os.ftruncate(fd, live)
        os.pwrite(fd, source.pread(APPEND_END, live - APPEND_END), live - APPEND_END)  # what close_appended reads
        fh.seek(live)
        writer = ZipWriter(fh, deferred=True)
        _append_directory(writer, source, entries, prefix, payload,
                          None if envelope is None else envelope_bytes(envelope))
        try:
            end = writer.close_appended(live)
        except ZipFormatError:
            return None
        return os.pread(fd, end - live, live)


def append_in_place(
    path: str | os.PathLike[str], source: Source, entries: dict[str, ZipEntry], prefix: str, payload: Any,
    envelope: dict[str, Any] | bytes | None,
) -> bool:
    """Append a new ``data.pkl``, envelope and central directory to the file itself, after its old
    end-of-directory record, however large (:meth:`ZipWriter.close_appended`: torch reads the old
    archive until the new end record is written); False (nothing written) when the file does not
    end with its end record. A tail left by an interrupted append is cut off first.

    The old ``data.pkl`` stays as orphaned bytes (``ckptmigrate compact`` reclaims them).
    """
    payload = payload if isinstance(payload, Pickled) else Pickled(payload)
    live = live_end(source)
    with open(path, "r+b") as fh:
        fd = fh.fileno()
        if os.fstat(fd).st_size != source.size:
            return False
        if live != source.size:
            os.ftruncate(fd, live)
            os.fsync(fd)
        fh.seek(live)
        writer = ZipWriter(fh, deferred=True)
        _append_directory(writer, source, entries, prefix, payload, envelope_record(envelope))
        try:
            writer.close_appended(live)
        except ZipFormatError:
            return False
    return True


def _append_directory(
    writer: ZipWriter, source: Source, entries: dict[str, ZipEntry], prefix: str, payload: Pickled,
    envelope: bytes | None,
) -> None:
    writer.add_bytes(f"{prefix}/data.pkl", payload.data)
    data_dir = f"{prefix}/data/"
    skip = (f"{prefix}/data.pkl", f"{prefix}/{ENVELOPE_RECORD}")
    for name, entry in entries.items():
        if name.startswith(data_dir) or name in skip:
            continue
        writer.reuse(name, entry.header_offset, entry.size, entry.crc)
    names, olds = _records_as_before(entries, data_dir, payload.plan.records, source)
    payload.as_before = entries, data_dir, names, olds
    if olds is not None:  # every storage record listed again as it is
        writer.reuse_all(names, map(_HEADER_OFFSET, olds), map(_SIZE, olds), map(_CRC, olds))
    else:
        _append_records(writer, source, entries, data_dir, payload.plan.records)
    if envelope is not None:
        writer.add_bytes(f"{prefix}/{ENVELOPE_RECORD}", envelope)


def _append_records(
    writer: ZipWriter, source: Source, entries: dict[str, ZipEntry], data_dir: str, records: list[tuple[str, Any]],
) -> None:
    """List each storage record of the plan: the record of the source it is, reused where it is,
    or, renamed, copied under its new name."""
    by_offset: dict[int | None, ZipEntry] = {}
    exact = dict.get  # a record keeps its name unless the plan renamed it: looked up as written
    for key, storage in records:
        name = data_dir + key
        if not isinstance(storage, Storage) or storage.source is not source:
            raise ValueError("a metadata-only rewrite needs every tensor to be in the source file")
        assert storage.offset is not None
        old = exact(entries, name)
        if old is None or old.data_offset != storage.offset:  # renamed: the record at its offset
            by_offset = by_offset or {e.data_offset: e for e in entries.values()}
            old = by_offset[storage.offset]
        if old.name == name:
            writer.reuse(name, old.header_offset, old.size, old.crc)
        else:
            writer.add_copy(name, source.fileno(), storage.offset, storage.nbytes, old.crc)


def verify_metadata_only(
    path: str | os.PathLike[str], entries: dict[str, ZipEntry], prefix: str, payload: Pickled,
    envelope: bytes | None, *, appended_to: int | None = None,
) -> str | None:
    """Why the file at ``path`` does not read back as the metadata-only write of ``payload`` and
    ``envelope`` over the records ``entries`` (of the source) made it, or None.

    What torch loads is read as torch reads it — the strict parse of the archive, the live one
    after any interrupted append — and compared with what was meant, without unpickling again:
    ``data.pkl`` and the envelope record are the bytes written (CRC checked), and each storage
    record the pickle names holds the source record's bytes (its size and CRC, and its offset when
    reused in place). ``data.pkl`` was pickled from the payload in this process, so its bytes
    being the bytes on disk is what makes the file load as the payload.

    ``appended_to``: the write appended in place to the archive of the file's first ``appended_to``
    bytes, which ``entries`` were read from under the same lock; only what the append changed is
    parsed (:func:`ckptmigrate.formats.zipread.read_appended`, the same verdict).
    """
    with open(path, "rb") as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            if appended_to is not None and isinstance(entries, Entries):
                written = read_appended_entries(fh, size, entries, appended_to)
            else:
                written = read_entries(fh, size)
            if not _holds(fh, written.get(f"{prefix}/data.pkl"), payload.data):
                return "its data.pkl is not the one written"
            env_entry = written.get(f"{prefix}/{ENVELOPE_RECORD}")
            if (env_entry is None) != (envelope is None) or not _holds(fh, env_entry, envelope):
                return "its envelope is not the one written"
        except ZipFormatError as exc:
            return str(exc)
    data_dir = f"{prefix}/data/"
    records = payload.plan.records
    known = payload.as_before
    if known is not None and known[0] is entries and known[1] == data_dir:  # as the write found them
        names, olds = known[2], known[3]
    else:
        names, olds = _records_as_before(entries, data_dir, records, None)
    if olds is not None and olds == list(map(dict.get, repeat(written), names)):
        return None
    by_offset: dict[int | None, ZipEntry] = {}
    exact = dict.get  # the names written, as written: no lookup ignoring case needed
    for key, storage in records:
        record = exact(written, data_dir + key)
        assert isinstance(storage, Storage)
        old = exact(entries, data_dir + key)
        if old is None or old.data_offset != storage.offset:  # its record was renamed: found by offset
            by_offset = by_offset or {e.data_offset: e for e in entries.values()}
            old = by_offset.get(storage.offset)
        if record is None or old is None or (record.size, record.crc) != (old.size, old.crc) or (
            record.name == old.name and record.data_offset != old.data_offset
        ):
            return f"its storage record data/{key} is not the one written"
    return None


def _records_as_before(
    entries: dict[str, ZipEntry], data_dir: str, records: list[tuple[str, Any]], source: Source | None,
) -> tuple[list[str], list[ZipEntry] | None]:
    """The record names of a storage plan, and the records of ``entries`` they are when each is the
    record of that name, its data where the storage says (and in ``source``, when given) — the
    usual case of a metadata-only write, found in C loops; None for the records when any is not."""
    names = list(map(data_dir.__add__, map(_FIRST, records)))
    storages = list(map(_SECOND, records))
    olds: list[Any] = list(map(dict.get, repeat(entries), names))
    if None in olds or not all(map(isinstance, storages, repeat(Storage))) or (
        list(map(_DATA_OFFSET, olds)) != list(map(_OFFSET, storages))
    ) or (source is not None and not all(map(is_, map(_SOURCE, storages), repeat(source)))):
        return names, None
    return names, olds


_FIRST, _SECOND, _OFFSET, _DATA_OFFSET = itemgetter(0), itemgetter(1), attrgetter("offset"), attrgetter("data_offset")
_SOURCE, _HEADER_OFFSET = attrgetter("source"), attrgetter("header_offset")
_SIZE, _CRC = attrgetter("size"), attrgetter("crc")


def _holds(fh: BinaryIO, entry: ZipEntry | None, data: bytes | None) -> bool:
    """Whether the record ``entry`` holds ``data`` (and its CRC checks), read a chunk at a time."""
    if entry is None or data is None:
        return entry is None and data is None
    if entry.size != len(data) or zlib.crc32(data) != entry.crc:
        return False
    view = memoryview(data)
    for start in range(0, len(data), _COMPARE):
        part = view[start : start + _COMPARE]
        if os.pread(fh.fileno(), len(part), entry.data_offset + start) != part:
            return False
    return True
