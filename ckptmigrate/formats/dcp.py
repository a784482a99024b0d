"""torch.distributed.checkpoint (DCP) directories: a pickled ``.metadata`` and ``__R_N.distcp`` files.

``.metadata`` is a pickle of DCP's ``Metadata``: for every flattened key its size, dtype and chunks,
and for every chunk (file, offset, length) of its bytes. It is read by the restricted unpickler, so
every DCP class is an inert stand-in and no code runs. Each chunk is a whole ``torch.save`` archive
embedded in a ``.distcp`` file; its directory and ``data.pkl`` are read here (a few hundred bytes),
so a tensor becomes a reference to its bytes in the ``.distcp`` file like any other. A tensor saved
as one chunk is a :class:`~ckptmigrate.tensors.refs.TensorRef`; one sharded across ranks is a
:class:`Chunked` that assembles its chunks when its values are asked for.

Tensor names live only in ``.metadata``: a rewrite in which no tensor changed writes that one file
and no ``.distcp`` byte. The envelope is ``.ckptmigrate-<digest of .metadata>.json`` in the
directory, a file ``dcp.load`` never opens, named for the ``.metadata`` it describes so the two
switch together. Writing them is :mod:`ckptmigrate.formats.dcp_writer`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ckptmigrate.formats import locations, pickled
from ckptmigrate.formats.pickle_scan import PickleFormatError
from ckptmigrate.formats.pickled import StandIn, global_name
from ckptmigrate.tensors.refs import (
    ITEMSIZE,
    Deferred,
    Source,
    Storage,
    TensorRef,
    file_runs,
    to_torch,
)

if TYPE_CHECKING:
    import torch

METADATA = ".metadata"
METADATA_MODULE = "torch.distributed.checkpoint.metadata"
ENVELOPE_PREFIX = ".ckptmigrate-"
MAX_METADATA = 256 << 20
_LOCAL = struct.Struct("<4s5H3I2H")
_CENTRAL = struct.Struct("<4s6H3I5H2I")
_EOCD = struct.Struct("<4s4H2IH")
_LOCATOR64 = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQ2H2I4Q")
#: How much of an embedded archive's head and tail is read at once (its small records and directory).
_EDGE = 4096


class DcpFormatError(ValueError):
    pass


def looks_like_metadata(head: bytes) -> bool:
    return head[:1] == b"\x80" and b"torch.distributed.checkpoint" in head


def envelope_name(metadata_bytes: bytes) -> str:
    return f"{ENVELOPE_PREFIX}{hashlib.sha256(metadata_bytes).hexdigest()[:16]}.json"


@dataclass(eq=False)
class Chunked(Deferred):
    """A tensor saved in several chunks (one per rank that held a shard of it)."""

    chunks: list[tuple[tuple[int, ...], TensorRef]] = field(default_factory=list)

    def file_runs(self) -> list[tuple[Source, int, int]] | None:
        """The tensor's bytes as its chunks' bytes one after the other, when it is sharded along its
        first dimension only (FSDP2's ``Shard(0)``: each chunk a block of whole rows, stored
        contiguously); None otherwise (then it is assembled through torch)."""
        runs: list[tuple[Source, int, int]] = []
        row = 0
        for offsets, ref in sorted(self.chunks, key=lambda c: (c[0], c[1].shape[:1])):
            run = file_runs(ref)
            if run is None or offsets[0] != row or any(offsets[1:]) or ref.shape[1:] != self.shape[1:]:
                return None
            runs.extend(r for r in run if r[2])
            row += ref.shape[0]
        return runs if row == self.shape[0] else None


def _assemble(shape: tuple[int, ...], dtype: str, chunks: list[tuple[tuple[int, ...], TensorRef]]) -> Callable[[], Any]:
    def compute() -> torch.Tensor:
        import torch

        from ckptmigrate.tensors.refs import torch_dtype

        out = torch.empty(shape, dtype=torch_dtype(dtype))
        for offsets, ref in chunks:
            view = out
            for dim, (start, length) in enumerate(zip(offsets, ref.shape, strict=True)):
                view = view.narrow(dim, start, length)
            view.copy_(to_torch(ref))
        return out

    return compute


@dataclass
class Dcp:
    """What a DCP directory holds beyond its tensors: the Metadata stand-in and where each value came from."""

    directory: Path
    metadata_path: Path
    metadata: StandIn
    raw: bytes
    #: id(value) -> (fqn, [(MetadataIndex, _StorageInfo)], the key's storage metadata) for what was read
    origin: dict[int, tuple[str, list[tuple[StandIn, StandIn]], StandIn]] = field(default_factory=dict)
    keep: list[Any] = field(default_factory=list)
    data_files: set[str] = field(default_factory=set)
    envelope_file: str | None = None
    #: Under a prefix in object storage: the ETag and version of ``.metadata`` and the envelope as read
    #: (what a write in their place is conditional on).
    metadata_etag: str | None = None
    metadata_version: str | None = None
    envelope_etag: str | None = None
    envelope_version: str | None = None

    def files(self) -> set[str]:
        """The ``.distcp`` files and the envelope, relative to the directory."""
        return self.data_files | ({self.envelope_file} if self.envelope_file else set())


def _state(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, StandIn) or not isinstance(obj.state, dict):
        raise DcpFormatError(f"{what} is malformed")
    return obj.state


def _size(obj: Any, what: str) -> tuple[int, ...]:
    if global_name(obj) != "torch.Size" or len(obj.args) != 1 or not isinstance(obj.args[0], (tuple, list)):
        raise DcpFormatError(f"{what} is not a torch.Size")
    dims = tuple(obj.args[0])
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise DcpFormatError(f"{what} has an invalid size {list(dims)}")
    return dims


def tensor_dtype(props: Any, fqn: str) -> str:
    state = props.state if isinstance(props, StandIn) else None
    dtype = state[0] if isinstance(state, tuple) and state else None
    if isinstance(dtype, type) and issubclass(dtype, StandIn) and dtype.module == "torch" \
            and dtype.qualname in ITEMSIZE:
        return dtype.qualname
    raise DcpFormatError(f"tensor {fqn!r} has no dtype torch knows")


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


def read_metadata(path: Path) -> tuple[StandIn, bytes]:
    return read_metadata_tagged(path)[:2]


def read_metadata_tagged(path: Path) -> tuple[StandIn, bytes, str | None, str | None]:
    """:func:`read_metadata`, with the ETag and version read (an object; None for a local file)."""
    try:
        raw, etag, version = locations.read_tagged(path, MAX_METADATA)
    except locations.TooLarge as exc:
        raise DcpFormatError(f"{path.name} of {exc.size:,} bytes exceeds the limit of {MAX_METADATA:,}") from None
    try:
        md = pickled.load(raw)
    except PickleFormatError as exc:
        raise DcpFormatError(f"not a torch.distributed.checkpoint .metadata ({exc})") from None
    if global_name(md) != f"{METADATA_MODULE}.Metadata" or not isinstance(md.state, dict):
        raise DcpFormatError("not a torch.distributed.checkpoint .metadata (no Metadata object)")
    for name in ("state_dict_metadata", "storage_data"):
        if not isinstance(md.state.get(name), dict):
            raise DcpFormatError(f"the .metadata has no {name}")
    return md, raw, etag, version


def read(metadata_path: Path) -> tuple[Any, dict[str, Any] | None, dict[str, Storage], list[Source], Dcp]:
    """Read ``.metadata`` and each chunk's archive directory; return (nested payload, envelope,
    storages, sources, layout)."""
    directory = metadata_path.parent
    md, raw, etag, version = read_metadata_tagged(metadata_path)
    layout = Dcp(directory, metadata_path, md, raw, metadata_etag=etag, metadata_version=version)
    storage_data: dict[tuple[str, tuple[int, ...] | None], tuple[StandIn, StandIn]] = {}
    for index, info in md.state["storage_data"].items():
        ist, sst = _state(index, "a MetadataIndex"), _state(info, "a storage entry")
        fqn = ist.get("fqn")
        offset = _size(ist["offset"], f"chunk offset of {fqn!r}") if ist.get("offset") is not None else None
        rel, off, length = sst.get("relative_path"), sst.get("offset"), sst.get("length")
        if not (isinstance(fqn, str) and isinstance(rel, str) and isinstance(off, int) and isinstance(length, int)):
            raise DcpFormatError(f"the storage entry of {fqn!r} is malformed")
        if sst.get("transform_descriptors"):
            raise DcpFormatError(f"{fqn!r} is stored with transforms {sst['transform_descriptors']}, not supported")
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or "/" in rel:
            raise DcpFormatError(f"{fqn!r} is stored in {rel!r}, not a file of the directory")
        storage_data[(fqn, offset)] = (index, info)
        layout.data_files.add(rel)
    sources: dict[str, Source] = {}
    storages: dict[str, Storage] = {}

    def source_of(rel: str) -> Source:
        if rel not in sources:
            try:
                sources[rel] = locations.open_source(directory / rel)
            except FileNotFoundError:
                raise DcpFormatError(f"names {rel}, which is missing from {directory}") from None
            except OSError as exc:
                raise DcpFormatError(f"{rel} cannot be read ({exc.strerror})") from None
        return sources[rel]

    planner = md.state.get("planner_data") if isinstance(md.state.get("planner_data"), dict) else {}
    flat: list[tuple[tuple[Any, ...], Any]] = []
    templates: Templates = {}
    try:
        _prefetch_archives(storage_data, source_of)
        for fqn, smd in md.state["state_dict_metadata"].items():
            if not isinstance(fqn, str):
                raise DcpFormatError("a key of the .metadata is not a string")
            value = _read_value(fqn, smd, storage_data, source_of, layout, storages, templates)
            path = planner.get(fqn, (fqn,))
            if not isinstance(path, tuple) or not path or not all(isinstance(p, (str, int)) for p in path):
                raise DcpFormatError(f"the planner path of {fqn!r} is malformed")
            flat.append((path, value))
    except BaseException:
        for s in sources.values():
            s.close()
        raise
    name = envelope_name(raw)
    envelope = None
    try:
        env_raw, layout.envelope_etag, layout.envelope_version = locations.read_tagged(directory / name, MAX_METADATA)
    except FileNotFoundError:
        env_raw = None
    except locations.TooLarge:
        raise DcpFormatError(f"the envelope {name} is larger than {MAX_METADATA:,} bytes") from None
    if env_raw is not None:
        layout.envelope_file = name
        try:
            envelope = json.loads(env_raw)
        except (ValueError, RecursionError):
            raise DcpFormatError(f"the envelope {name} is not JSON") from None
        if not isinstance(envelope, dict):
            raise DcpFormatError(f"the envelope {name} is not a JSON object")
    return unflatten(flat), envelope, storages, list(sources.values()), layout


def _prefetch_archives(storage_data: dict[Any, tuple[StandIn, StandIn]], source_of: Callable[[str], Source]) -> None:
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


def _read_value(
    fqn: str, smd: Any, storage_data: dict[Any, tuple[StandIn, StandIn]], source_of: Callable[[str], Source],
    layout: Dcp, storages: dict[str, Storage], templates: Templates,
) -> Any:
    kind = global_name(smd)
    if kind == f"{METADATA_MODULE}.BytesStorageMetadata":
        if (fqn, None) not in storage_data:
            raise DcpFormatError(f"{fqn!r} has no stored bytes")
        index, info = storage_data[(fqn, None)]
        st = info.state
        value = read_embedded(source_of(st["relative_path"]), st["offset"], st["length"], f"{fqn!r}")
        layout.origin[id(value)] = (fqn, [(index, info)], smd)
        layout.keep.append(value)
        return value
    if kind != f"{METADATA_MODULE}.TensorStorageMetadata":
        raise DcpFormatError(f"{fqn!r} is described by {kind or type(smd).__name__}, not a DCP storage metadata")
    st = _state(smd, f"the metadata of {fqn!r}")
    shape = _size(st.get("size"), f"the size of {fqn!r}")
    dtype = tensor_dtype(st.get("properties"), fqn)
    chunks_md = st.get("chunks")
    if not isinstance(chunks_md, list) or not chunks_md:
        raise DcpFormatError(f"{fqn!r} has no chunks")
    chunks: list[tuple[tuple[int, ...], TensorRef]] = []
    used: list[tuple[StandIn, StandIn]] = []
    covered = 0
    for chunk in chunks_md:
        cst = _state(chunk, f"a chunk of {fqn!r}")
        offsets = _size(cst.get("offsets"), f"a chunk offset of {fqn!r}")
        sizes = _size(cst.get("sizes"), f"a chunk size of {fqn!r}")
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
            o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)
        ):
            raise DcpFormatError(f"a chunk of {fqn!r} lies outside its shape {list(shape)}")
        if (fqn, offsets) not in storage_data:
            raise DcpFormatError(f"the chunk of {fqn!r} at {list(offsets)} has no stored bytes")
        index, info = storage_data[(fqn, offsets)]
        used.append((index, info))
        ist = info.state
        ref = read_embedded(source_of(ist["relative_path"]), ist["offset"], ist["length"], f"{fqn!r}", templates)
        if not isinstance(ref, TensorRef) or ref.shape != sizes or ref.dtype != dtype:
            raise DcpFormatError(
                f"the chunk of {fqn!r} at {list(offsets)} is not a {dtype} tensor of shape {list(sizes)}")
        storages[f"{fqn}@{list(offsets)}"] = ref.storage
        chunks.append((offsets, ref))
        covered += math.prod(sizes)
    if covered != math.prod(shape):
        raise DcpFormatError(f"the chunks of {fqn!r} do not cover its shape {list(shape)}")
    tensor: Any = chunks[0][1]
    if len(chunks) > 1:
        tensor = Chunked(shape, dtype, _assemble(shape, dtype, chunks), chunks=chunks)
    layout.origin[id(tensor)] = (fqn, used, smd)
    layout.keep.append(tensor)
    return tensor


def trusted(layout: Dcp, payload: Any) -> Any:
    """``payload`` with every non-tensor value loaded by torch from its bytes, as ``dcp.load`` does:
    its pickle code runs (trusted checkpoints only). Tensors stay references."""
    import torch

    def walk(node: Any) -> Any:
        origin = layout.origin.get(id(node))
        if origin is not None and global_name(origin[2]) == f"{METADATA_MODULE}.BytesStorageMetadata":
            st = origin[1][0][1].state
            with open(layout.directory / st["relative_path"], "rb") as fh:
                raw = os.pread(fh.fileno(), st["length"], st["offset"])
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
        if isinstance(node, dict) and origin is None:
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list) and origin is None:
            return [walk(v) for v in node]
        return node

    return walk(payload)


def unflatten(flat: list[tuple[tuple[Any, ...], Any]]) -> dict[str, Any]:
    """The nested state dict DCP flattened (``planner_data`` holds each key's path)."""
    root: dict[Any, Any] = {}
    for path, value in flat:
        node = root
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise DcpFormatError(f"the key {'.'.join(map(str, path))!r} collides with another")
            node = nxt
        node[path[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = {k: _lists(v) for k, v in node.items()}
    if out and all(isinstance(k, int) for k in out) and sorted(out) == list(range(len(out))):
        return [out[i] for i in range(len(out))]
    return out


def flatten(payload: Any) -> list[tuple[str, tuple[Any, ...], Any]]:
    """(fqn, path, value) as DCP flattens a state dict: dicts and lists by ``.``-joined paths."""
    out: list[tuple[str, tuple[Any, ...], Any]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, dict) and not _is_leaf(node):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list) and not _is_leaf(node):
            for i, v in enumerate(node):
                walk(v, (*path, i))
        else:
            out.append((".".join(map(str, path)), path, node))

    walk(payload, ())
    return out


def _is_leaf(node: Any) -> bool:
    return isinstance(node, (dict, list)) and not node
