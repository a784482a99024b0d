"""Writing DCP's files: a value as the ``torch.save`` archive a ``.distcp`` file embeds (a tensor's
bytes copied by the kernel where they are runs of a file), and the ``.metadata`` that names every
chunk, with the check that a rewrite which moves no byte describes each value as before.

The reading side, and the :class:`~ckptmigrate.formats.dcp.Dcp` layout these take, is
:mod:`ckptmigrate.formats.dcp`; the switch of a directory's files is
:mod:`ckptmigrate.formats.multifile`'s.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, BinaryIO

from ckptmigrate.formats import pickled
from ckptmigrate.formats.dcp import METADATA_MODULE as _MD
from ckptmigrate.formats.dcp import Dcp, DcpFormatError, flatten, tensor_dtype
from ckptmigrate.formats.pickle_writer import dump
from ckptmigrate.formats.pickled import StandIn, global_name, standin
from ckptmigrate.formats.zipio import ZipWriter
from ckptmigrate.tensors.refs import (
    ITEMSIZE,
    Deferred,
    Storage,
    TensorRef,
    contiguous_stride,
    dtype_of,
    file_runs,
    shape_of,
    to_torch,
)

_FS = "torch.distributed.checkpoint.filesystem"


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


def write_tensor(fh: BinaryIO, pos: int, value: Any) -> int | None:
    """``value`` written at ``pos`` of ``fh`` as DCP stores a tensor (a ``torch.save`` archive of it
    alone), its bytes copied by the kernel from the files that hold them (a DCP tensor sharded by
    rows: its chunks one after another); the archive's length. None when the bytes are not such
    runs (then :func:`save_bytes`). The data record's CRC is the source's when its bytes are one
    whole stored record, else 0, as ``torch.save`` writes with CRC computation off (torch checks none)."""
    runs = file_runs(value)
    if runs is None or (isinstance(value, TensorRef) and (value.neg or value.conj or value.extra)):
        return None
    shape, dtype = shape_of(value), dtype_of(value)
    storage = Storage("0", dtype, "cpu", math.prod(shape) * ITEMSIZE[dtype])
    crc = 0
    if isinstance(value, TensorRef) and value.storage.crc32 is not None and len(runs) == 1 \
            and runs[0][1:] == (value.storage.offset, value.storage.nbytes):
        crc = value.storage.crc32
    fh.seek(pos)
    writer = ZipWriter(fh, origin=pos)
    writer.add_bytes("archive/data.pkl", dump(TensorRef(storage, 0, shape, contiguous_stride(shape), dtype),
                                              lambda _obj: ("0", storage)))
    for name, data in _RECORDS[:3]:
        writer.add_bytes(f"archive/{name}", data)
    writer.add_copies("archive/data/0", [(source.fileno(), offset, n) for source, offset, n in runs], crc)
    for name, data in _RECORDS[3:]:
        writer.add_bytes(f"archive/{name}", data)
    writer.add_bytes("archive/.data/serialization_id", str(int.from_bytes(os.urandom(16))).zfill(40).encode())
    return writer.close()


#: The small records of a ``torch.save`` archive around its data (torch >= 2.4 writes these).
_RECORDS = [(".format_version", b"1"), (".storage_alignment", b"64"), ("byteorder", b"little"), ("version", b"3\n")]


def _holds_standin(value: Any, depth: int = 0) -> bool:
    if depth > 100 or isinstance(value, StandIn) or (isinstance(value, type) and issubclass(value, StandIn)):
        return True
    if isinstance(value, dict):
        return any(_holds_standin(v, depth + 1) or _holds_standin(k, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_standin(v, depth + 1) for v in value)
    return False


def live_ranges(layout: Dcp, kept: list[tuple[str, tuple[Any, ...], Any]]) -> dict[str, list[tuple[int, int]]]:
    """For each ``.distcp`` file, the (offset, length) of every chunk a kept value still reads, in order."""
    out: dict[str, set[tuple[int, int]]] = {}
    for _fqn, _path, value in kept:
        for _index, info in layout.origin[id(value)][1]:
            st = info.state
            out.setdefault(st["relative_path"], set()).add((st["offset"], st["length"]))
    return {rel: sorted(ranges) for rel, ranges in out.items()}


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
    moved: dict[tuple[str, int], tuple[str, int]] | None = None,
) -> bytes:
    """The new ``.metadata``: kept values point at their old bytes under their (new) names (or where
    ``moved`` says those bytes went: (file, offset) -> (file, offset)); written ones at the new file.
    Everything else in the old Metadata (storage_meta, version) is kept."""
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
            there = (moved or {}).get((info.state["relative_path"], info.state["offset"]))
            if there is not None:
                info = _obj(_FS, "_StorageInfo", {**info.state, "relative_path": there[0], "offset": there[1]})
            storage[_obj(_MD, "MetadataIndex", index_state)] = info
    for fqn, path, value, rel, offset, length in written:
        planner[fqn] = path
        st: dict[str, Any] = {"fqn": fqn, "index": None}
        if isinstance(value, (TensorRef, Deferred)) or hasattr(value, "untyped_storage"):
            shape = tuple(int(d) for d in value.shape)
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


def described(md: Any) -> dict[str, tuple[Any, ...]]:
    """What ``dcp.load`` reads of each key of a parsed Metadata: its kind, size, dtype, planner path,
    and each chunk's (offsets, sizes, (file, offset, length)). Two Metadata that describe alike load alike."""
    try:
        stored: dict[tuple[str, tuple[int, ...] | None], tuple[Any, Any, Any]] = {}
        for index, info in md.state["storage_data"].items():
            ist, sst = index.state, info.state
            at = tuple(ist["offset"].args[0]) if ist.get("offset") is not None else None
            stored[(ist["fqn"], at)] = (sst["relative_path"], sst["offset"], sst["length"])
        planner = md.state.get("planner_data") or {}
        out: dict[str, tuple[Any, ...]] = {}
        for fqn, smd in md.state["state_dict_metadata"].items():
            if global_name(smd) == f"{_MD}.BytesStorageMetadata":
                out[fqn] = ("bytes", planner.get(fqn), stored.get((fqn, None)))
                continue
            st = smd.state
            chunks = []
            for chunk in st["chunks"]:
                offsets = tuple(chunk.state["offsets"].args[0])
                chunks.append((offsets, tuple(chunk.state["sizes"].args[0]), stored.get((fqn, offsets))))
            out[fqn] = ("tensor", tuple(st["size"].args[0]), tensor_dtype(st["properties"], fqn), planner.get(fqn),
                        sorted(chunks))
        return out
    except (AttributeError, KeyError, TypeError, IndexError) as exc:
        raise DcpFormatError(f"the .metadata is malformed ({type(exc).__name__}: {exc})") from None


def renamed_description(layout: Dcp, kept: list[tuple[str, tuple[Any, ...], Any]]) -> dict[str, tuple[Any, ...]]:
    """:func:`described` of the ``.metadata`` a rewrite that moves no byte must write: each kept
    value read as before, under its new name and planner path."""
    old = described(layout.metadata)
    out: dict[str, tuple[Any, ...]] = {}
    for fqn, path, value in kept:
        entry = old[layout.origin[id(value)][0]]
        out[fqn] = (entry[0], path, *entry[2:]) if entry[0] == "bytes" else (*entry[:3], path, entry[4])
    return out


def reparse(raw: bytes) -> Any:
    """A ``.metadata`` this process just pickled, read back by the C unpickler into inert stand-ins
    (no class is imported, so no code runs). It skips the safety scan of :func:`pickled.load`, which
    guards against hostile pickles, not against our own writer."""
    try:
        return pickled.SafeUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler raises, the bytes do not read back
        raise DcpFormatError(f"the written .metadata does not unpickle ({type(exc).__name__})") from None


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
