"""Tensors torch rebuilds from parts: quantized, sparse (COO, CSR, CSC, BSR, BSC), nested, meta.

A pickle builds them by calling one of torch's allow-listed rebuild functions on storages,
plain tensors and a few torch globals (a qscheme, a layout, a dtype, ``torch.Size``).
:func:`describe` reads shape, dtype and device from those arguments without torch;
:func:`realize` materializes one by calling the same torch function on the parts — only torch
functions on torch's ``weights_only`` allow-list, so nothing runs that ``torch.load(weights_only=True)``
would not run. The arguments are kept as pickled, so the writer writes the same call back.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ckptmigrate.errors import BadInput
from ckptmigrate.formats.pickle_safety import WEIGHTS_ONLY_GLOBALS
from ckptmigrate.formats.pickle_scan import PickleFormatError
from ckptmigrate.tensors.refs import ITEMSIZE, ComposedTensor, Storage, TensorRef, to_torch

if TYPE_CHECKING:
    import torch

#: The rebuild functions read as :class:`ComposedTensor` (``torch._utils.<name>``).
BUILDERS = ("_rebuild_qtensor", "_rebuild_sparse_tensor", "_rebuild_nested_tensor", "_rebuild_meta_tensor_no_storage",
            "_rebuild_wrapper_subclass")
FROM_TYPE = "torch._tensor._rebuild_from_type_v2"
QUANTIZED = ("qint8", "quint8", "qint32", "quint4x2", "quint2x4")
_QSCHEMES = ("torch.per_tensor_affine", "torch.per_channel_affine", "torch.per_channel_affine_float_qparams")
_SPARSE = ("torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc", "torch.sparse_bsr", "torch.sparse_bsc")
#: Allow-listed torch callables a pickle applies inside these arguments.
_CALLS = ("torch.Size", "torch.serialization._get_layout")

NameOf = Callable[[Any], "str | None"]
View = Callable[..., TensorRef]


def describe(builder: str, args: tuple[Any, ...], name_of: NameOf, view: View) -> ComposedTensor:
    """The entry for ``torch._utils.<builder>(*args)``; PickleFormatError when torch would not
    build a tensor from them. ``name_of`` names a stand-in global; ``view`` checks a storage view."""
    try:
        kind, shape, dtype, device = _DESCRIBE[builder](args, name_of, view)
    except (TypeError, ValueError, IndexError) as exc:
        raise PickleFormatError(f"{builder} with malformed arguments ({exc})"[:300]) from None
    if dtype not in ITEMSIZE:
        raise PickleFormatError(f"{builder} of an unknown dtype {dtype!r:.40}")
    qualname = f"torch._utils.{builder}"
    return ComposedTensor(qualname, args, kind, shape, dtype, device, lambda: realize(qualname, args, name_of))


def subclass(inner: ComposedTensor, args: tuple[Any, ...], name_of: NameOf) -> ComposedTensor:
    """``torch._tensor._rebuild_from_type_v2(func, new_type, func_args, state)`` around a tensor
    built from parts: a tensor subclass (DTensor: a wrapper whose local shard is in ``state``)."""
    return ComposedTensor(FROM_TYPE, args, inner.kind, inner.shape, inner.dtype, inner.device,
                          lambda: realize(FROM_TYPE, args, name_of))


def _qtensor(args: tuple[Any, ...], name_of: NameOf, view: View) -> tuple[str, tuple[int, ...], str, str]:
    storage, offset, size, stride, qparams, requires_grad, hooks = args
    if not isinstance(storage, Storage) or storage.dtype not in QUANTIZED:
        raise ValueError("the storage of a quantized tensor is not a quantized storage")
    if not (isinstance(qparams, tuple) and qparams and name_of(qparams[0]) in _QSCHEMES):
        raise ValueError("unknown quantization scheme")
    ref = view(storage, offset, size, stride, requires_grad, hooks, None, None)
    return "quantized", ref.shape, storage.dtype, storage.location


def _sparse(args: tuple[Any, ...], name_of: NameOf, view: View) -> tuple[str, tuple[int, ...], str, str]:
    layout, data = args
    if name_of(layout) != "torch.serialization._get_layout" or not layout.args or layout.args[0] not in _SPARSE:
        raise ValueError("unknown sparse layout")
    kind = str(layout.args[0]).removeprefix("torch.")
    if not isinstance(data, tuple) or len(data) not in ((3, 4) if kind == "sparse_coo" else (4,)):
        raise ValueError("wrong number of parts")
    parts, size = (data[:2], data[2]) if kind == "sparse_coo" else (data[:3], data[3])
    if not all(isinstance(p, TensorRef) for p in parts):
        raise ValueError("a part of a sparse tensor is not a tensor")
    values = parts[-1]
    return kind, _ints(size, name_of), values.dtype, values.device


def _nested(args: tuple[Any, ...], name_of: NameOf, view: View) -> tuple[str, tuple[int, ...], str, str]:
    buffer, sizes, strides, offsets = args
    if not all(isinstance(p, TensorRef) for p in args) or len(sizes.shape) not in (1, 2):
        raise ValueError("a part of a nested tensor is not a tensor")
    return "nested", (sizes.shape[0],), buffer.dtype, buffer.device  # the ragged sizes are in tensor bytes


def _meta(args: tuple[Any, ...], name_of: NameOf, view: View) -> tuple[str, tuple[int, ...], str, str]:
    dtype, size, stride, requires_grad = args
    name = name_of(dtype) or ""
    if not name.startswith("torch.") or type(requires_grad) is not bool:
        raise ValueError("not a dtype")
    _ints(stride, name_of)
    return "meta", _ints(size, name_of), name.removeprefix("torch."), "meta"


def _wrapper(args: tuple[Any, ...], name_of: NameOf, view: View) -> tuple[str, tuple[int, ...], str, str]:
    cls, dtype, size, stride, offset, layout, device, requires_grad = args
    dtype_name, cls_name = name_of(dtype) or "", name_of(cls)
    if not dtype_name.startswith("torch.") or cls_name is None or not isinstance(cls, type):
        raise ValueError("not a tensor subclass and dtype")
    if name_of(device) != "torch.device" or isinstance(device, type) or not device.args:
        raise ValueError("no device")
    where = ":".join(str(a) for a in device.args)
    _ints(stride, name_of)
    return f"subclass {cls_name}", _ints(size, name_of), dtype_name.removeprefix("torch."), where


def _ints(size: Any, name_of: NameOf) -> tuple[int, ...]:
    if name_of(size) == "torch.Size" and not isinstance(size, type):  # torch.Size((3, 3)) as pickled
        size = size.args[0] if size.args else ()
    dims = tuple(size)
    if not all(type(d) is int and d >= 0 for d in dims):
        raise ValueError(f"invalid size {dims!r:.60}")
    return dims


_DESCRIBE = {"_rebuild_qtensor": _qtensor, "_rebuild_sparse_tensor": _sparse, "_rebuild_nested_tensor": _nested,
             "_rebuild_meta_tensor_no_storage": _meta, "_rebuild_wrapper_subclass": _wrapper}


def realize(builder: str, args: tuple[Any, ...], name_of: NameOf) -> torch.Tensor:
    """``builder(*args)`` with the parts as torch objects (tensors memory-mapped); ValueError for
    what would take more than torch's allow-listed functions and globals (a DTensor's mesh)."""
    import torch._utils

    try:
        real = [_real(a, name_of) for a in args]
    except ValueError as exc:
        raise BadInput(
            f"a tensor built by {builder} cannot be rebuilt from torch's allow-listed functions alone ({exc}); "
            "torch.load(weights_only=False) rebuilds it, running that code, if you trust the file"
        ) from None
    tensor: torch.Tensor = _resolve(builder)(*real)
    if builder == "torch._utils._rebuild_sparse_tensor":
        torch._utils._validate_loaded_sparse_tensors()  # as torch.load does after unpickling
    return tensor


def realize_value(obj: Any, name_of: NameOf) -> Any:
    """A state dict's non-tensor value as torch returns it, where that is torch data: allow-listed
    torch globals (``torch.qint8`` in a quantized module's ``_packed_params.dtype``) and tensors
    inside tuples, lists and dicts become torch objects; any other stand-in stays inert."""
    try:
        return _real(obj, name_of)
    except ValueError:
        return obj


def _real(obj: Any, name_of: NameOf, _path: frozenset[int] = frozenset()) -> Any:
    if id(obj) in _path:
        raise ValueError("a reference cycle is not torch data")
    if isinstance(obj, (TensorRef, ComposedTensor)):
        return to_torch(obj)
    if callable(obj) and getattr(obj, "module", None) == "torch._utils":  # a rebuild function as an argument
        return _resolve(f"torch._utils.{obj.name}")
    if isinstance(obj, Storage):
        return _typed_storage(obj)
    if isinstance(obj, (list, tuple, dict)):
        path = _path | {id(obj)}
        if isinstance(obj, dict):
            return type(obj)((k, _real(v, name_of, path)) for k, v in obj.items())
        return type(obj)(_real(v, name_of, path) for v in obj)
    name = name_of(obj)
    if name is None:
        return obj
    if name not in WEIGHTS_ONLY_GLOBALS or not name.startswith("torch."):
        raise ValueError(f"{name} is not one of torch's allow-listed globals")
    if isinstance(obj, type):
        return _resolve(name)
    if name in _CALLS:
        return _resolve(name)(*_real(obj.args, name_of))
    raise ValueError(f"a call of {name} cannot be materialized")


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _typed_storage(storage: Storage) -> Any:
    """A storage of the file, memory-mapped, typed as pickled (``torch.QUInt8Storage``, ...)."""
    import torch

    if storage.source is None or storage.offset is None:
        raise ValueError(f"storage {storage.key!r} is not attached to a file")
    ref = TensorRef(storage, 0, (storage.nbytes,), (1,), "uint8")
    untyped = to_torch(ref).untyped_storage()
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=getattr(torch, storage.dtype), _internal=True)
