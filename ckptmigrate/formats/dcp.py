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
switch together.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ckptmigrate.formats import pickled
from ckptmigrate.formats.pickle_scan import PickleFormatError
from ckptmigrate.formats.pickle_writer import dump
from ckptmigrate.formats.pickled import StandIn, global_name, standin
from ckptmigrate.tensors.refs import ITEMSIZE, Deferred, Source, Storage, TensorRef, to_torch

if TYPE_CHECKING:
    import torch

METADATA = ".metadata"
_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"
ENVELOPE_PREFIX = ".ckptmigrate-"
MAX_METADATA = 256 << 20
_LOCAL = struct.Struct("<4s5H3I2H")


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


def _dtype(props: Any, fqn: str) -> str:
    state = props.state if isinstance(props, StandIn) else None
    dtype = state[0] if isinstance(state, tuple) and state else None
    if isinstance(dtype, type) and issubclass(dtype, StandIn) and dtype.module == "torch" \
            and dtype.qualname in ITEMSIZE:
        return dtype.qualname
    raise DcpFormatError(f"tensor {fqn!r} has no dtype torch knows")


class _Window(io.RawIOBase):
    """A read-only view of ``length`` bytes of a file at ``base``: one embedded torch.save archive."""

    def __init__(self, fd: int, base: int, length: int) -> None:
        self.fd, self.base, self.length, self.pos = fd, base, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.length}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        data = os.pread(self.fd, n, self.base + self.pos)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def read_embedded(source: Source, base: int, length: int, what: str) -> Any:
    """The object a ``torch.save`` archive embedded at ``base`` holds, tensors as references into ``source``."""
    if base < 0 or length < 0 or base + length > source.size:
        raise DcpFormatError(f"{what} lies outside {os.path.basename(source.path)}")
    window = _Window(source.fileno(), base, length)
    try:
        infos = zipfile.ZipFile(window).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise DcpFormatError(f"{what} is not a torch.save archive ({exc})") from None
    records: dict[str, tuple[int, int]] = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise DcpFormatError(f"{what}: record {info.filename!r} is compressed")
        header = os.pread(source.fileno(), _LOCAL.size, base + info.header_offset)
        if len(header) != _LOCAL.size or header[:4] != b"PK\x03\x04" or info.header_offset < 0:
            raise DcpFormatError(f"{what}: record {info.filename!r} has no local header")
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        start = info.header_offset + _LOCAL.size + name_len + extra_len
        if start + info.file_size > length:
            raise DcpFormatError(f"{what}: record {info.filename!r} runs past its chunk")
        records[info.filename] = (base + start, info.file_size)
    pkl = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise DcpFormatError(f"{what} holds no torch.save payload")
    prefix = pkl[0][: -len("/data.pkl")]
    start, size = records[pkl[0]]
    storages: dict[str, Storage] = {}
    try:
        obj = pickled.load(os.pread(source.fileno(), size, start), storages)
    except PickleFormatError as exc:
        raise DcpFormatError(f"{what}: {exc}") from None
    for key, storage in storages.items():
        record = records.get(f"{prefix}/data/{key}")
        if record is None or record[1] < storage.nbytes:
            raise DcpFormatError(f"{what}: storage data/{key} is missing or short")
        storage.source, storage.offset = source, record[0]
    return obj


def read_metadata(path: Path) -> tuple[StandIn, bytes]:
    size = os.stat(path).st_size
    if size > MAX_METADATA:
        raise DcpFormatError(f"{path.name} of {size:,} bytes exceeds the limit of {MAX_METADATA:,}")
    raw = path.read_bytes()
    try:
        md = pickled.load(raw)
    except PickleFormatError as exc:
        raise DcpFormatError(f"not a torch.distributed.checkpoint .metadata ({exc})") from None
    if global_name(md) != f"{_MD}.Metadata" or not isinstance(md.state, dict):
        raise DcpFormatError("not a torch.distributed.checkpoint .metadata (no Metadata object)")
    for name in ("state_dict_metadata", "storage_data"):
        if not isinstance(md.state.get(name), dict):
            raise DcpFormatError(f"the .metadata has no {name}")
    return md, raw


def read(metadata_path: Path) -> tuple[Any, dict[str, Any] | None, dict[str, Storage], list[Source], Dcp]:
    """Read ``.metadata`` and each chunk's archive directory; return (nested payload, envelope,
    storages, sources, layout)."""
    directory = metadata_path.parent
    md, raw = read_metadata(metadata_path)
    layout = Dcp(directory, metadata_path, md, raw)
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
                sources[rel] = Source(directory / rel)
            except FileNotFoundError:
                raise DcpFormatError(f"names {rel}, which is missing from {directory}") from None
            except OSError as exc:
                raise DcpFormatError(f"{rel} cannot be read ({exc.strerror})") from None
        return sources[rel]

    planner = md.state.get("planner_data") if isinstance(md.state.get("planner_data"), dict) else {}
    flat: list[tuple[tuple[Any, ...], Any]] = []
    try:
        for fqn, smd in md.state["state_dict_metadata"].items():
            if not isinstance(fqn, str):
                raise DcpFormatError("a key of the .metadata is not a string")
            value = _read_value(fqn, smd, storage_data, source_of, layout, storages)
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
    env_path = directory / name
    if env_path.exists():
        layout.envelope_file = name
        try:
            envelope = json.loads(env_path.read_text())
        except (ValueError, RecursionError):
            raise DcpFormatError(f"the envelope {name} is not JSON") from None
        if not isinstance(envelope, dict):
            raise DcpFormatError(f"the envelope {name} is not a JSON object")
    return unflatten(flat), envelope, storages, list(sources.values()), layout


def _read_value(
    fqn: str, smd: Any, storage_data: dict[Any, tuple[StandIn, StandIn]], source_of: Callable[[str], Source],
    layout: Dcp, storages: dict[str, Storage],
) -> Any:
    kind = global_name(smd)
    if kind == f"{_MD}.BytesStorageMetadata":
        if (fqn, None) not in storage_data:
            raise DcpFormatError(f"{fqn!r} has no stored bytes")
        index, info = storage_data[(fqn, None)]
        st = info.state
        value = read_embedded(source_of(st["relative_path"]), st["offset"], st["length"], f"{fqn!r}")
        layout.origin[id(value)] = (fqn, [(index, info)], smd)
        layout.keep.append(value)
        return value
    if kind != f"{_MD}.TensorStorageMetadata":
        raise DcpFormatError(f"{fqn!r} is described by {kind or type(smd).__name__}, not a DCP storage metadata")
    st = _state(smd, f"the metadata of {fqn!r}")
    shape = _size(st.get("size"), f"the size of {fqn!r}")
    dtype = _dtype(st.get("properties"), fqn)
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
        ref = read_embedded(source_of(ist["relative_path"]), ist["offset"], ist["length"], f"{fqn!r}")
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


# --- writing ----------------------------------------------------------------------------------------


def _obj(module: str, name: str, state: Any) -> StandIn:
    obj = standin(module, name).__new__(standin(module, name))
    obj.state = state
    return obj


def _torch_size(dims: tuple[int, ...]) -> StandIn:
    return standin("torch", "Size")(tuple(dims))


def save_bytes(value: Any) -> bytes:
    """One value as DCP stores it: a ``torch.save`` archive (a tensor with exactly its own bytes)."""
    import torch

    buf = io.BytesIO()
    if isinstance(value, (TensorRef, Deferred)) or hasattr(value, "untyped_storage"):
        tensor = to_torch(value).contiguous()
        if tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        torch.save(tensor, buf)
    else:
        if _holds_standin(value):
            raise DcpFormatError(
                "a changed non-tensor value holds objects read without their code; it cannot be re-saved")
        torch.save(value, buf)
    return buf.getvalue()


def _holds_standin(value: Any, depth: int = 0) -> bool:
    if depth > 100 or isinstance(value, StandIn) or (isinstance(value, type) and issubclass(value, StandIn)):
        return True
    if isinstance(value, dict):
        return any(_holds_standin(v, depth + 1) or _holds_standin(k, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_standin(v, depth + 1) for v in value)
    return False


def split_payload(layout: Dcp | None, payload: Any) -> tuple[list[Any], list[Any]]:
    """The flattened payload as (values still where they were read, values to write)."""
    kept: list[Any] = []
    fresh: list[Any] = []
    for fqn, path, value in flatten(payload):
        (kept if layout is not None and id(value) in layout.origin else fresh).append((fqn, path, value))
    return kept, fresh


def build_metadata(
    layout: Dcp | None, kept: list[tuple[str, tuple[Any, ...], Any]],
    written: list[tuple[str, tuple[Any, ...], Any, str, int, int]],
) -> bytes:
    """The new ``.metadata``: kept values point at their old bytes under their (new) names; written
    ones at the new file. Everything else in the old Metadata (storage_meta, version) is kept."""
    sdm: dict[str, Any] = {}
    planner: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    template_props = None
    for fqn, path, value in kept:
        assert layout is not None
        old_fqn, entries, smd = layout.origin[id(value)]
        sdm[fqn] = smd
        planner[fqn] = path
        if global_name(smd) == f"{_MD}.TensorStorageMetadata":
            template_props = smd.state.get("properties")
        for index, info in entries:
            index_state = dict(index.state)
            index_state["fqn"] = fqn
            storage[_obj(_MD, "MetadataIndex", index_state)] = info
    for fqn, path, value, rel, offset, length in written:
        planner[fqn] = path
        st: dict[str, Any] = {"fqn": fqn, "index": None}
        if isinstance(value, (TensorRef, Deferred)) or hasattr(value, "untyped_storage"):
            shape = tuple(int(d) for d in value.shape)
            from ckptmigrate.tensors.refs import dtype_of

            sdm[fqn] = _tensor_md(shape, dtype_of(value), template_props)
            st.update(offset=_torch_size((0,) * len(shape)), index=0)
        else:
            sdm[fqn] = _obj(_MD, "BytesStorageMetadata", None)
        storage[_obj(_MD, "MetadataIndex", st)] = _obj(_FS, "_StorageInfo", {
            "relative_path": rel, "offset": offset, "length": length})
    state = dict(layout.metadata.state) if layout is not None else {"storage_meta": None, "version": "1.0.0"}
    state.update(state_dict_metadata=sdm, planner_data=planner, storage_data=storage)
    md = _obj(_MD, "Metadata", state)

    def no_storage(obj: Any) -> Any:
        raise DcpFormatError("the .metadata cannot hold a tensor")

    return dump(md, no_storage)


def _default_properties() -> tuple[Any, ...]:
    """TensorProperties' pickled state after the dtype, as DCP writes it for a dense CPU tensor:
    strided layout, no grad, contiguous memory format (encoded 0), not pinned."""
    layout = standin("torch.serialization", "_get_layout")("torch.strided")
    memory_format = standin(_MD, "_MEM_FORMAT_ENCODING")(0)
    return (layout, False, memory_format, False)


def _tensor_md(shape: tuple[int, ...], dtype: str, template_props: Any) -> StandIn:
    rest = template_props.state[1:] if template_props is not None and isinstance(template_props.state, tuple) \
        else _default_properties()
    props = _obj(_MD, "TensorProperties", (standin("torch", dtype), *rest))
    chunk = _obj(_MD, "ChunkStorageMetadata", {"offsets": _torch_size((0,) * len(shape)), "sizes": _torch_size(shape)})
    return _obj(_MD, "TensorStorageMetadata", {"properties": props, "size": _torch_size(shape), "chunks": [chunk]})
