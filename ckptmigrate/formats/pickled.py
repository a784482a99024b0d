"""Read and write torch's pickles without importing torch and without running their code.

:class:`SafeUnpickler` resolves no global: every class or function a pickle names becomes an
inert :class:`StandIn` type that only records how it was called. Tensors become
:class:`~ckptmigrate.tensors.TensorRef`. A pickle whose ``__reduce__`` calls ``os.system``
therefore yields a record of the call, never the call. :func:`dump` writes the same structure
back, stand-ins included, so a rewritten file loads in torch exactly as the original did.
"""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
from collections.abc import Callable
from typing import Any, BinaryIO, ClassVar

from ckptmigrate.tensors import (
    ITEMSIZE,
    LEGACY_STORAGE,
    STORAGE_FOR_DTYPE,
    Deferred,
    Storage,
    TensorRef,
    dtype_of,
    shape_of,
)


class PickleFormatError(ValueError):
    """The pickle is malformed or not one torch writes."""


_NEWOBJ: Any = getattr(copyreg, "__newobj__")  # noqa: B009 - missing from typeshed


class StandIn:
    """An object a pickle asked to build from a global we never import; inert and re-picklable."""

    module: ClassVar[str] = ""
    qualname: ClassVar[str] = ""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.newobj = False
        self.state: Any = None
        self.listitems: list[Any] = []
        self.dictitems: dict[Any, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.listitems.append(item)

    def extend(self, items: Any) -> None:
        self.listitems.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dictitems[key] = value

    def __reduce_ex__(self, protocol: Any) -> Any:
        listitems = iter(self.listitems) if self.listitems else None
        dictitems = iter(self.dictitems.items()) if self.dictitems else None
        if self.newobj:
            return (_NEWOBJ, (type(self), *self.args), self.state, listitems, dictitems)
        return (type(self), self.args, self.state, listitems, dictitems)

    def __repr__(self) -> str:
        return f"<{self.module}.{self.qualname} (not imported)>"


_STANDINS: dict[tuple[str, str], type[StandIn]] = {}


def standin(module: str, name: str) -> type[StandIn]:
    """The stand-in type for ``module.name`` (one per name, so pickle memoises it)."""
    key = (module, name)
    if key not in _STANDINS:
        cls: Any = type(name.rpartition(".")[2] or name, (StandIn,), {})
        cls.module = module
        cls.qualname = name
        cls.__new__ = _standin_new
        _STANDINS[key] = cls
    return _STANDINS[key]


def _standin_new(cls: type[StandIn], *args: Any) -> StandIn:
    obj = object.__new__(cls)
    StandIn.__init__(obj, *args)
    obj.newobj = True
    return obj


def global_name(obj: object) -> str | None:
    """``module.name`` of a stand-in type or instance, else None."""
    cls: Any = obj if isinstance(obj, type) else type(obj)
    if issubclass(cls, StandIn) and cls is not StandIn:
        return f"{cls.module}.{cls.qualname}"
    return None


def _is_dtype(obj: Any) -> bool:
    """``torch.<dtype>`` inside a pickle (``_rebuild_tensor_v3`` passes the dtype)."""
    return (
        isinstance(obj, type) and issubclass(obj, StandIn)
        and obj.module == "torch" and obj.qualname in ITEMSIZE
    )


def _rebuild_tensor(
    storage: Storage, storage_offset: int, size: Any, stride: Any, *rest: Any
) -> TensorRef:
    if not isinstance(storage, Storage):
        raise PickleFormatError("a tensor refers to something that is not a storage")
    try:
        shape = tuple(int(d) for d in size)
        strides = tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise PickleFormatError("a tensor has a malformed shape or stride") from None
    if len(shape) != len(strides) or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise PickleFormatError(f"a tensor has an invalid shape {shape} or stride {strides}")
    if shape and 0 not in shape:
        last = int(storage_offset) + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise PickleFormatError(
                f"a tensor of shape {list(shape)} reaches past its storage {storage.key!r}"
            )
    requires_grad = bool(rest[0]) if rest else False
    return TensorRef(storage, int(storage_offset), shape, strides, storage.dtype, requires_grad)


def _rebuild_tensor_v3(
    storage: Storage, storage_offset: int, size: Any, stride: Any, requires_grad: Any,
    backward_hooks: Any, dtype: Any, *rest: Any,
) -> TensorRef:
    if not _is_dtype(dtype):
        raise PickleFormatError("_rebuild_tensor_v3 without a dtype")
    ref = _rebuild_tensor(storage, storage_offset, size, stride, requires_grad)
    ref.dtype = dtype.qualname
    return ref


def _rebuild_parameter(data: Any, requires_grad: Any = True, *rest: Any) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise PickleFormatError("a parameter wraps something that is not a tensor")
    data.requires_grad = bool(requires_grad)
    data.extra["parameter"] = True
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any, *rest: Any
) -> TensorRef:
    """A parameter with Python attributes (``param.tensor_parallel = True``): kept for the writer."""
    ref = _rebuild_parameter(data, requires_grad)
    ref.extra["parameter_state"] = state
    return ref


_TENSOR_BUILDERS: dict[str, Callable[..., TensorRef]] = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}
_BUILDER_FUNCTIONS = set(_TENSOR_BUILDERS.values())


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2``: a tensor with Python attributes, or of a subclass.

    When the inner builder is one we read, the result is a TensorRef that remembers the type and
    the attributes for the writer; otherwise the call stays an inert stand-in.
    """
    if func in _BUILDER_FUNCTIONS and isinstance(args, tuple):
        ref = func(*args)
        if isinstance(ref, TensorRef) and not ref.extra.get("parameter"):
            ref.extra["from_type"] = (new_type, state)
            return ref
    return standin("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles torch data structures; never imports a module or calls a pickled callable."""

    def __init__(self, file: BinaryIO, storages: dict[str, Storage] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self.storages: dict[str, Storage] = {} if storages is None else storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch._utils" and name in _TENSOR_BUILDERS:
            return _TENSOR_BUILDERS[name]
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type_v2
        return standin(module, name)

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise PickleFormatError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, location, numel = pid[1:5]
        type_name = getattr(storage_type, "qualname", "")
        if type_name in LEGACY_STORAGE:
            dtype = LEGACY_STORAGE[type_name]
        elif type_name == "UntypedStorage":
            dtype = "uint8"
        else:
            raise PickleFormatError(f"unknown storage type {type_name!r}")
        if not isinstance(numel, int) or numel < 0:
            raise PickleFormatError(f"storage {key!r} has an invalid size {numel!r}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = Storage(key, dtype, str(location), numel * ITEMSIZE[dtype])
        storage = self.storages[key]
        if len(pid) > 5 and pid[5] is not None:
            raise PickleFormatError("storage views from torch < 0.4 are not supported")
        return storage


def load(data: bytes | BinaryIO, storages: dict[str, Storage] | None = None) -> Any:
    """Unpickle a torch payload safely; raises PickleFormatError for anything malformed."""
    fh = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        return SafeUnpickler(fh, storages).load()
    except PickleFormatError:
        raise
    except RecursionError:
        raise PickleFormatError("the pickle is nested too deeply") from None
    except MemoryError:
        raise PickleFormatError("the pickle asks for more memory than it can hold") from None
    except Exception as exc:  # the unpickler raises many types on malformed input
        raise PickleFormatError(f"malformed pickle ({type(exc).__name__}: {exc})"[:300]) from None


_PurePickler: Any = getattr(pickle, "_Pickler")  # noqa: B009 - the pure-Python pickler lets save_global be overridden


class _Writer(_PurePickler):
    """The pure-Python pickler, taught to write stand-ins and tensors as torch expects."""

    def __init__(self, file: BinaryIO, storage_of: Callable[[Any], tuple[str, Storage]]) -> None:
        super().__init__(file, protocol=2)
        self._storage_of = storage_of

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _PersistentStorage):
            return obj.pid
        if isinstance(obj, Storage):  # held by a tensor kind we keep as a stand-in (quantized, ...)
            key, storage = self._storage_of(obj)
            return _storage_pid(storage.dtype, key, storage)
        return None

    def save_global(self, obj: Any, name: str | None = None) -> None:
        qual = global_name(obj)
        if qual is None:
            super().save_global(obj, name)
            return None
        cls: Any = obj if isinstance(obj, type) else type(obj)
        self.write(pickle.GLOBAL + f"{cls.module}\n{cls.qualname}\n".encode())
        self.memoize(obj)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _Reduced):
            return obj.reduced
        if isinstance(obj, TensorRef):
            return self._reduce_ref(obj)
        if isinstance(obj, Deferred) or _is_torch_tensor(obj):
            return self._reduce_tensor(obj)
        return NotImplemented

    def _reduce_ref(self, ref: TensorRef) -> Any:
        """As torch pickles it: a parameter wraps the plain tensor, attributes wrap the call."""
        if ref.extra.get("parameter"):
            data = _Reduced(self._reduce_tensor(ref, requires_grad=False))
            hooks = collections.OrderedDict()  # type: ignore[var-annotated]
            if "parameter_state" in ref.extra:
                return (standin("torch._utils", "_rebuild_parameter_with_state"),
                        (data, ref.requires_grad, hooks, ref.extra["parameter_state"]))
            return (standin("torch._utils", "_rebuild_parameter"), (data, ref.requires_grad, hooks))
        func, args = self._reduce_tensor(ref)
        if "from_type" in ref.extra:
            new_type, state = ref.extra["from_type"]
            return (standin("torch._tensor", "_rebuild_from_type_v2"), (func, new_type, args, state))
        return (func, args)

    def _reduce_tensor(self, obj: Any, requires_grad: bool | None = None) -> Any:
        key, storage = self._storage_of(obj)
        if isinstance(obj, TensorRef):
            offset, shape, stride, requires_grad = (
                obj.storage_offset, obj.shape, obj.stride,
                obj.requires_grad if requires_grad is None else requires_grad,
            )
        elif not isinstance(obj, Deferred):
            # a torch tensor: storage_of gave its whole storage, so it keeps its own view of it
            shape, stride = shape_of(obj), tuple(int(s) for s in obj.stride())
            offset, requires_grad = int(obj.storage_offset()), False
        else:
            from ckptmigrate.tensors import contiguous_stride

            shape = shape_of(obj)
            offset, stride, requires_grad = 0, contiguous_stride(shape), False
        dtype = dtype_of(obj)
        hooks = collections.OrderedDict()  # type: ignore[var-annotated]
        persistent = _PersistentStorage(_storage_pid(dtype, key, storage))
        if dtype in STORAGE_FOR_DTYPE:
            args: tuple[Any, ...] = (persistent, offset, shape, stride, requires_grad, hooks)
            return (standin("torch._utils", "_rebuild_tensor_v2"), args)
        args = (persistent, offset, shape, stride, requires_grad, hooks, standin("torch", dtype))
        return (standin("torch._utils", "_rebuild_tensor_v3"), args)


def _storage_pid(dtype: str, key: str, storage: Storage) -> tuple[Any, ...]:
    """The persistent id torch writes for a storage viewed as ``dtype``."""
    if dtype in STORAGE_FOR_DTYPE:
        return ("storage", standin("torch", STORAGE_FOR_DTYPE[dtype]), key, storage.location,
                storage.nbytes // _itemsize(dtype))
    return ("storage", standin("torch.storage", "UntypedStorage"), key, storage.location,
            storage.nbytes)


def _itemsize(dtype: str) -> int:
    return ITEMSIZE[dtype]


class _PersistentStorage:
    def __init__(self, pid: tuple[Any, ...]) -> None:
        self.pid = pid


class _Reduced:
    """A ``(callable, args)`` pair to pickle as a nested object (the tensor inside a parameter)."""

    def __init__(self, reduced: tuple[Any, Any]) -> None:
        self.reduced = reduced


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage")


def dump(obj: Any, storage_of: Callable[[Any], tuple[str, Storage]]) -> bytes:
    """Pickle ``obj`` as torch would; ``storage_of(tensor or storage)`` names its storage record."""
    buf = io.BytesIO()
    _Writer(buf, storage_of).dump(obj)
    return buf.getvalue()
