"""torch.distributed.checkpoint (DCP) directories: a pickled ``.metadata`` and ``__R_N.distcp`` files.

``.metadata`` is a pickle of DCP's ``Metadata``: for every flattened key its size, dtype and chunks,
and for every chunk (file, offset, length) of its bytes. It is read by the restricted unpickler, so
every DCP class is an inert stand-in and no code runs. Each chunk is a whole ``torch.save`` archive
embedded in a ``.distcp`` file; its directory and ``data.pkl`` are read (a few hundred bytes, by
:mod:`ckptmigrate.formats.dcp_chunks`), so a tensor becomes a reference to its bytes in the
``.distcp`` file like any other. A tensor saved as one chunk is a
:class:`~ckptmigrate.tensors.refs.TensorRef`; one sharded across ranks is a :class:`Chunked` that
assembles its chunks when its values are asked for.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ckptmigrate.formats import locations, pickled
from ckptmigrate.formats.dcp_chunks import DcpFormatError as DcpFormatError
from ckptmigrate.formats.dcp_chunks import Templates, prefetch_archives, read_embedded
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
        prefetch_archives(storage_data, source_of)
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
