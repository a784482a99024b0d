"""Tensors as ckptmigrate sees them: references to bytes in a file, or deferred computations.

A :class:`TensorRef` knows its shape, dtype and where its bytes are, so keys, schemas and hashes
come from metadata alone. Bytes are only touched by :func:`to_torch`, which memory-maps them. A
:class:`Deferred` is the result of an op (a transpose, a merge): its shape is known at once, its
values are computed when the writer streams it out, one tensor at a time.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch

ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
    "uint16": 2, "uint32": 4, "uint64": 8,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "qint8": 1, "quint8": 1, "qint32": 4,
    "quint4x2": 1, "quint2x4": 1,
    "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
}

#: The typed storage classes torch pickles for dtypes that have one.
LEGACY_STORAGE: dict[str, str] = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}
STORAGE_FOR_DTYPE = {v: k for k, v in LEGACY_STORAGE.items()}

#: safetensors' dtype names.
SAFETENSORS_DTYPE: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPE.items()}


#: What a remote object's small tensors read in turn are fetched in (:meth:`Source.read_range`).
READ_AHEAD = 4 << 20


class Source:
    """An open file whose bytes tensors point into; mapped once, on first use, copy-on-write.

    ``remote`` is an object read by range (:class:`ckptmigrate.storage.ranges.RangeFile`): metadata
    is read through :meth:`pread`; the first use of its tensor bytes (:meth:`fileno`, :meth:`map`)
    stages the whole object in a local temporary file, read from then on.
    """

    def __init__(self, path: str | os.PathLike[str], remote: Any = None) -> None:
        self.path = os.fspath(path)
        self.remote = remote
        self._staged: Any = None
        if remote is None:
            self._fh: Any = open(self.path, "rb")  # noqa: SIM115 - lives as long as the checkpoint
            self.size = os.fstat(self._fh.fileno()).st_size
        else:
            self._fh = remote
            self.size = remote.size
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()
        #: A remote object's tensor bytes read by range, each when it is used, not staged whole (a
        #: streamed rewrite of the object: no local copy of it).
        self.by_range = False
        self._window: tuple[int, bytes] | None = None  # the last read-ahead window: (offset, bytes)
        self._last_end: int | None = None

    @property
    def ranged(self) -> bool:
        """Whether tensor bytes are read by range now: :attr:`by_range`, and not staged already."""
        return self.by_range and self.remote is not None and self._staged is None

    def read_range(self, offset: int, n: int) -> bytearray:
        """Bytes ``offset`` to ``offset + n`` of a remote object, fetched (not cached, not staged). A
        small read that follows the last one closely (tensors read in file order) fetches a window
        of :data:`READ_AHEAD` bytes, which the next ones are read from: one request for many small
        tensors, and only the bytes between them; memory holds one window."""
        window = self._window
        if window is not None and window[0] <= offset and offset + n <= window[0] + len(window[1]):
            self._last_end = offset + n
            return bytearray(memoryview(window[1])[offset - window[0] : offset - window[0] + n])
        near = self._last_end is not None and self._last_end <= offset <= self._last_end + READ_AHEAD
        self._last_end = offset + n
        if near and n < READ_AHEAD:
            data = b"".join(self.remote.chunks(offset, min(self.size, offset + READ_AHEAD)))
            self._window = (offset, data)
            return bytearray(memoryview(data)[:n])
        out = bytearray(n)
        at = 0
        for block in self.remote.chunks(offset, offset + n):
            out[at : at + len(block)] = block
            at += len(block)
        return out

    def pread(self, n: int, offset: int) -> bytes:
        if self.remote is not None:
            return bytes(self.remote.pread(n, offset))
        return os.pread(self._fh.fileno(), n, offset)

    def fileno(self) -> int:
        if self.remote is None:
            return int(self._fh.fileno())
        with self._lock:
            if self._staged is None:
                self._staged = self.remote.stage()
            return int(self._staged.fileno())

    def map(self) -> mmap.mmap:
        fd = self.fileno()
        with self._lock:
            if self._map is None:
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            return self._map

    def close(self) -> None:
        self._fh.close()
        if self._staged is not None:
            self._staged.close()


@dataclass(eq=False, slots=True, weakref_slot=True)
class Storage:
    """A run of bytes in a file shared by one or more tensors (tied weights share one storage)."""

    key: str
    dtype: str
    location: str
    nbytes: int
    source: Source | None = None
    offset: int | None = None
    crc32: int | None = None

    @property
    def numel(self) -> int:
        return self.nbytes // ITEMSIZE[self.dtype]

    def __setstate__(self, state: Any) -> None:
        raise TypeError("a pickle may not modify a storage after creating it")


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    acc = 1
    for dim in reversed(shape):
        stride.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(stride))


class _Sized:
    """Element and byte counts from ``shape`` and ``dtype``, for every kind of tensor entry."""

    __slots__ = ()  # a file's tensors are many: TensorRef has slots, not a dict each (~100 bytes)

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(eq=False, slots=True, weakref_slot=True)
class TensorRef(_Sized):
    """A tensor in a file: everything about it except its values."""

    storage: Storage
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    requires_grad: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    #: torch's lazy negation and conjugation bits (``_rebuild_tensor_v2``'s ``metadata``): torch
    #: returns the stored values negated / conjugated, so they are part of what the tensor *is*.
    neg: bool = False
    conj: bool = False

    @property
    def device(self) -> str:
        return self.storage.location

    @property
    def metadata(self) -> dict[str, bool]:
        """The ``metadata`` torch pickles for this tensor (empty when no bit is set)."""
        return {k: True for k, on in (("conj", self.conj), ("neg", self.neg)) if on}

    def __setstate__(self, state: Any) -> None:
        # pickle's BUILD would set attributes; torch's Tensor.__setstate__ does something else
        raise TypeError("a pickle may not modify a tensor after creating it")

    def view(self, storage_offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> TensorRef:
        """Another view of the same bytes, with the same dtype, bits and requires_grad."""
        return TensorRef(self.storage, storage_offset, shape, stride, self.dtype, self.requires_grad,
                         neg=self.neg, conj=self.conj)

    def file_range(self) -> tuple[int, int] | None:
        """(offset, length) of the tensor's bytes in its file when they are one contiguous run
        (they can then be copied by the kernel as they are), else None — also when torch would
        negate or conjugate them."""
        if self.stride != contiguous_stride(self.shape) or self.storage.offset is None or self.neg or self.conj:
            return None
        return self.storage.offset + self.storage_offset * ITEMSIZE[self.dtype], self.nbytes


@dataclass(eq=False)
class Deferred(_Sized):
    """A tensor an op will compute; shape and dtype are known before the values are."""

    shape: tuple[int, ...]
    dtype: str
    compute: Callable[[], torch.Tensor]
    device: str = "cpu"

    def file_runs(self) -> list[tuple[Source, int, int]] | None:
        """Where the values already sit as they are, when they do (a subclass that knows says so)."""
        return None


@dataclass(eq=False)
class ComposedTensor(_Sized):
    """A tensor torch builds from parts with one of its allow-listed rebuild functions (quantized,
    sparse, nested, meta): shape, dtype and device are known from the pickle; the parts (references,
    storages) are read only when ``build`` materializes it, through torch's own function."""

    builder: str  # the torch function's qualified name: torch._utils._rebuild_qtensor, ...
    args: tuple[Any, ...]  # as pickled: references, storages, stand-ins for torch globals
    kind: str  # quantized, sparse_coo, sparse_csr, ..., nested, meta
    shape: tuple[int, ...]
    dtype: str
    device: str
    build: Callable[[], torch.Tensor]


Entry = Union[TensorRef, Deferred, ComposedTensor, "torch.Tensor"]


def file_runs(value: object) -> list[tuple[Source, int, int]] | None:
    """The bytes of a tensor entry as (file, offset, length) runs, in order, when they are stored
    exactly as a contiguous tensor holds them (a writer then copies them by the kernel, without
    reading them); None when they must be computed."""
    if isinstance(value, TensorRef):
        source, run = value.storage.source, value.file_range()
        return None if source is None or run is None else [(source, *run)]
    if isinstance(value, Deferred):
        return value.file_runs()
    return None


def is_entry(value: object) -> bool:
    if type(value) is TensorRef or isinstance(value, (TensorRef, Deferred, ComposedTensor)):
        return True
    return type(value).__module__.startswith("torch") and hasattr(value, "untyped_storage")


def dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def shape_of(value: Entry) -> tuple[int, ...]:
    if type(value) is TensorRef:  # a tuple of ints, checked when it was read or computed
        return value.shape
    return tuple(int(d) for d in value.shape)


def dtype_of(value: Entry) -> str:
    if type(value) is TensorRef or isinstance(value, (TensorRef, Deferred, ComposedTensor)):
        return value.dtype
    return dtype_name(value.dtype)


def device_of(value: Entry) -> str:
    if type(value) is TensorRef:
        return value.storage.location
    if isinstance(value, (TensorRef, Deferred, ComposedTensor)):
        return value.device
    return str(value.device)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not known to this torch")
    return dtype


def to_torch(value: Entry) -> torch.Tensor:
    """The values of an entry as a CPU tensor; a TensorRef is memory-mapped, not read."""
    import torch

    if isinstance(value, Deferred):
        result = value.compute()
        if tuple(result.shape) != value.shape or dtype_name(result.dtype) != value.dtype:
            raise ValueError(
                f"computed a {dtype_name(result.dtype)} tensor of shape {tuple(result.shape)}, "
                f"expected {value.dtype} {value.shape}"
            )
        return result
    if isinstance(value, ComposedTensor):
        return value.build()
    if not isinstance(value, TensorRef):
        return value.detach().cpu() if value.device.type != "cpu" else value.detach()
    dtype = torch_dtype(value.dtype)
    storage = value.storage
    if storage.source is None or storage.offset is None:
        raise ValueError(f"storage {storage.key!r} is not attached to a file")
    if value.numel == 0 or storage.nbytes == 0:
        empty = torch.empty(value.shape, dtype=dtype)
        if value.neg or value.conj:
            torch._C._set_tensor_metadata(empty, value.metadata)  # type: ignore[attr-defined]
        return empty
    itemsize = ITEMSIZE[value.dtype]
    if storage.source.ranged:
        flat = torch.frombuffer(storage.source.read_range(storage.offset, storage.nbytes), dtype=torch.uint8)
    else:
        flat = torch.frombuffer(storage.source.map(), dtype=torch.uint8, count=storage.nbytes, offset=storage.offset)
    if storage.offset % itemsize:  # misaligned (a DCP chunk's archive starts anywhere): one aligned copy
        flat = flat.clone()
    typed = flat.view(dtype).as_strided(value.shape, value.stride, value.storage_offset)
    if value.neg or value.conj:
        torch._C._set_tensor_metadata(typed, value.metadata)  # type: ignore[attr-defined]
    return typed
