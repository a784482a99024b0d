"""Write a payload back as torch pickles it: stand-ins as the globals they stand for, tensors as
torch's rebuild calls on persistent storages, so ``torch.load`` reads a rewritten file exactly as
it read the original.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable
from typing import Any, BinaryIO

from ckptmigrate.formats.pickled import TorchRebuild, global_name, standin
from ckptmigrate.tensors.refs import ITEMSIZE, STORAGE_FOR_DTYPE, Deferred, Storage, TensorRef, dtype_of, shape_of

_PurePickler: Any = getattr(pickle, "_Pickler")  # noqa: B009 - the pure-Python pickler lets save_global be overridden


class _Writer(_PurePickler):
    """The pure-Python pickler, taught to write stand-ins and tensors as torch expects."""

    def __init__(self, file: BinaryIO, storage_of: Callable[[Any], tuple[str, Storage]]) -> None:
        super().__init__(file, protocol=2)
        self._storage_of = storage_of

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, TorchRebuild):  # a rebuild function kept inside a stand-in: torch's name for it
            obj = standin(obj.module, obj.name)
        super().save(obj, save_persistent_id)

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
            from ckptmigrate.tensors.refs import contiguous_stride

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
