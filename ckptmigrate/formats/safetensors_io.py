"""safetensors: 8-byte header length, a JSON header, then the data section.

The envelope is one JSON string under ``__metadata__["ckptmigrate"]``; other metadata is kept.
The header is validated fully (dtypes, shapes, offsets that neither overlap nor leave gaps nor
point past the end) before any tensor is touched.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, BinaryIO

from ckptmigrate.formats import boundedjson
from ckptmigrate.formats.torchzip import MAX_ENVELOPE, MAX_ENVELOPE_DEPTH, MAX_ENVELOPE_VALUES
from ckptmigrate.storage.rawio import copy_range, write_all
from ckptmigrate.tensors.refs import (
    DTYPE_TO_SAFETENSORS,
    ITEMSIZE,
    SAFETENSORS_DTYPE,
    ComposedTensor,
    Deferred,
    Source,
    Storage,
    TensorRef,
    contiguous_stride,
    dtype_of,
    file_runs,
    shape_of,
    to_torch,
)

ENVELOPE_KEY = "ckptmigrate"
#: The longest header read, as the safetensors library itself allows; a longer one is refused
#: before any of it is read.
MAX_HEADER = 100_000_000
_CHUNK = 16 << 20


class SafetensorsFormatError(ValueError):
    pass


def read_header(source: Source) -> tuple[dict[str, Any], int]:
    fh = source._fh
    fh.seek(0)
    raw = fh.read(8)
    if len(raw) != 8:
        raise SafetensorsFormatError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER:
        raise SafetensorsFormatError(f"header of {n:,} bytes exceeds the limit of {MAX_HEADER:,} bytes")
    if n > source.size - 8:
        raise SafetensorsFormatError(f"header length {n} is larger than the file")
    try:
        header = json.loads(fh.read(n).decode("utf-8"))
    except RecursionError:
        raise SafetensorsFormatError("header is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise SafetensorsFormatError(f"header is not valid JSON ({exc})"[:300]) from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    return header, 8 + n


def _parse_envelope(text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        raise SafetensorsFormatError("the ckptmigrate envelope in __metadata__ is not a string")
    try:
        envelope = boundedjson.loads(text, max_bytes=MAX_ENVELOPE, max_values=MAX_ENVELOPE_VALUES,
                                     max_depth=MAX_ENVELOPE_DEPTH)
    except boundedjson.JSONBoundsError as exc:
        raise SafetensorsFormatError(f"the ckptmigrate envelope in __metadata__ is refused: {exc}") from None
    if not isinstance(envelope, dict):
        raise SafetensorsFormatError("the ckptmigrate envelope in __metadata__ is not a JSON object")
    return envelope


def read(source: Source) -> tuple[Any, dict[str, Any] | None, dict[str, str], dict[str, Storage]]:
    """Return (tensors by name in file order, envelope, other metadata, storages)."""
    header, data_start = read_header(source)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsFormatError("__metadata__ must map strings to strings")
    data_size = source.size - data_start
    spans: list[tuple[int, int, str]] = []
    refs: dict[str, TensorRef] = {}
    storages: dict[str, Storage] = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPE[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"tensor {name!r} has a malformed header entry") from None
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsFormatError(f"tensor {name!r} has an invalid shape {list(shape)}")
        shape = tuple(map(int, shape))  # a JSON true is an int too
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise SafetensorsFormatError(
                f"tensor {name!r} has offsets [{begin}, {end}] outside the {data_size}-byte data section"
            )
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise SafetensorsFormatError(f"tensor {name!r}: offsets do not match its shape and dtype")
        storage = Storage(name, dtype, "cpu", end - begin, source, data_start + begin)
        storages[name] = storage
        refs[name] = TensorRef(storage, 0, shape, contiguous_stride(shape), dtype)
        spans.append((begin, end, name))
    spans.sort()
    if spans and spans[0][0] != 0:
        raise SafetensorsFormatError(
            f"the data section starts with {spans[0][0]} bytes no tensor uses (before {spans[0][2]!r})"
        )
    for (_b1, e1, n1), (b2, _e2, n2) in zip(spans, spans[1:], strict=False):
        if b2 < e1:
            raise SafetensorsFormatError(f"tensors {n1!r} and {n2!r} overlap in the data section")
        if b2 > e1:
            raise SafetensorsFormatError(
                f"a gap of {b2 - e1} bytes no tensor uses between tensors {n1!r} and {n2!r}"
            )
    covered = spans[-1][1] if spans else 0
    if covered != data_size:
        raise SafetensorsFormatError(
            f"the data section holds {data_size - covered} bytes after the last tensor"
        )
    envelope = _parse_envelope(metadata.pop(ENVELOPE_KEY)) if ENVELOPE_KEY in metadata else None
    ordered = OrderedDict((name, refs[name]) for _b, _e, name in spans)
    return ordered, envelope, metadata, storages


def read_envelope(source: Source) -> dict[str, Any] | None:
    header, _ = read_header(source)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or ENVELOPE_KEY not in meta:
        return None
    return _parse_envelope(meta[ENVELOPE_KEY])


def new_header(
    source: Source, tensors: dict[str, Any], storages: dict[str, Storage], metadata: dict[str, str],
    envelope: dict[str, Any] | None,
) -> tuple[bytes, int] | None:
    """The header (length prefix included) that makes ``source``'s data section, unchanged, hold
    ``tensors`` under their names, and where that data section starts; None when a tensor is not
    exactly one stored tensor of ``source``, or a stored tensor is left out (the format allows no
    unused bytes). What a rename of an object costs: a new header before the same data bytes."""
    if set(map(id, storages.values())) != {id(getattr(v, "storage", None)) for v in tensors.values()} \
            or len(tensors) != len(storages):
        return None
    (old_len,) = struct.unpack("<Q", source.pread(8, 0))
    data_start = 8 + old_len
    meta = dict(metadata)
    if envelope is not None:
        meta[ENVELOPE_KEY] = json.dumps(envelope, separators=(",", ":"), sort_keys=True)
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    for name, ref in sorted(tensors.items(), key=lambda kv: kv[1].storage.offset):
        st = ref.storage
        if not (isinstance(ref, TensorRef) and st.source is source and st.offset is not None
                and ref.storage_offset == 0 and ref.nbytes == st.nbytes and ref.dtype in DTYPE_TO_SAFETENSORS
                and ref.stride == contiguous_stride(ref.shape) and not (ref.neg or ref.conj or ref.extra)):
            return None
        begin = st.offset - data_start
        header[name] = {"dtype": DTYPE_TO_SAFETENSORS[ref.dtype], "shape": list(ref.shape),
                        "data_offsets": [begin, begin + st.nbytes]}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * ((-len(encoded)) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, data_start


def _chunks(obj: Any) -> Iterator[memoryview]:
    import torch

    tensor = to_torch(obj).resolve_conj().resolve_neg().contiguous()
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def _nbytes(obj: Any) -> int:
    if isinstance(obj, (TensorRef, Deferred)):
        return obj.nbytes
    return int(obj.numel() * obj.element_size())


def write(
    fh: BinaryIO, tensors: dict[str, Any], envelope: dict[str, Any] | None, metadata: dict[str, str],
    *, slack: int = 0,
) -> None:
    """Stream tensors to a safetensors file; contiguous tensors in a file are copied by the kernel.

    ``slack`` leaves at least that many spaces (or a quarter of the header, if more) after the
    header JSON, with the data starting on a 4 KiB boundary, so that a later rename can rewrite
    the header in place (the format allows trailing spaces)."""
    header: dict[str, Any] = {}
    meta = dict(metadata)
    if envelope is not None:
        meta[ENVELOPE_KEY] = json.dumps(envelope, separators=(",", ":"), sort_keys=True)
    if meta:
        header["__metadata__"] = meta
    offset = 0
    for name, obj in tensors.items():
        dtype = dtype_of(obj)
        if isinstance(obj, ComposedTensor):
            raise SafetensorsFormatError(f"tensor {name!r}: safetensors holds only dense tensors, not a {obj.kind} one")
        if dtype not in DTYPE_TO_SAFETENSORS:
            raise SafetensorsFormatError(f"tensor {name!r}: safetensors cannot hold dtype {dtype}")
        size = _nbytes(obj)
        header[name] = {
            "dtype": DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape_of(obj)),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if slack:
        room = len(encoded) + max(slack, len(encoded) // 4)
        encoded += b" " * (-(8 + room) % 4096 + room - len(encoded))
    encoded += b" " * ((-len(encoded)) % 8)
    fh.write(struct.pack("<Q", len(encoded)) + encoded)
    fh.flush()
    pos = 8 + len(encoded)
    fd = fh.fileno()
    for obj in tensors.values():
        size = _nbytes(obj)
        runs = file_runs(obj)
        if runs is not None:
            for source, offset, length in runs:
                copy_range(source.fileno(), fd, offset, length, pos)
                pos += length
            continue
        for chunk in _chunks(obj):
            view = memoryview(chunk).cast("B")
            write_all(fd, view, pos)
            pos += len(view)
    fh.seek(pos)
    fh.truncate(pos)
