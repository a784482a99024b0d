"""Read torch's pickles without importing torch and without running their code.

:class:`SafeUnpickler` resolves no global: every class or function a pickle names becomes an
inert :class:`StandIn` type that only records how it was called. Tensors become
:class:`~ckptmigrate.tensors.refs.TensorRef`. A pickle whose ``__reduce__`` calls ``os.system``
therefore yields a record of the call, never the call. :mod:`~ckptmigrate.formats.pickle_writer`
writes the same structure back, stand-ins included, so a rewritten file loads in torch exactly as
the original did.
"""

from __future__ import annotations

import collections
import copyreg
import io
import mmap
import pickle
from collections.abc import Callable
from typing import Any, BinaryIO, ClassVar

from ckptmigrate.errors import one_line
from ckptmigrate.formats import pickle_direct, torch_builds
from ckptmigrate.formats.pickle_scan import MAX_DEPTH, MAX_SHARED_VISITS, PickleFormatError, scan
from ckptmigrate.tensors.refs import (
    ITEMSIZE,
    LEGACY_STORAGE,
    ComposedTensor,
    Storage,
    TensorRef,
)
from ckptmigrate.util.gcpause import pausing

#: How many distinct globals one pickle may name: each becomes a stand-in class (about 1 KiB), kept
#: as long as the payload that holds it.
MAX_GLOBALS = 10_000


_NEWOBJ: Any = getattr(copyreg, "__newobj__")  # noqa: B009 - missing from typeshed


class StandIn:
    """An object a pickle asked to build from a global we never import; inert and re-picklable."""

    module: ClassVar[str] = ""
    qualname: ClassVar[str] = ""
    #: Whether the pickle called (or instantiated) the global: torch.load would run it.
    called: ClassVar[bool] = False

    def __init__(self, *args: Any) -> None:
        type(self).called = True
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


#: The stand-ins the writer names (torch's rebuild functions, dtypes, storage types: a fixed set).
#: A file's own globals get stand-ins of their own, freed with its payload: a process that reads
#: many files holds only the stand-ins of the payloads it still holds.
_STANDINS: dict[tuple[str, str], type[StandIn]] = {}


def standin(module: str, name: str, cache: dict[tuple[str, str], type[StandIn]] | None = None) -> type[StandIn]:
    """The stand-in type for ``module.name``, one per name in ``cache`` (so pickle memoises it)."""
    cache = _STANDINS if cache is None else cache
    key = (module, name)
    if key not in cache:
        cls: Any = type(name.rpartition(".")[2] or name, (StandIn,), {})
        cls.module = module
        cls.qualname = name
        cls.__new__ = _standin_new
        cache[key] = cls
    return cache[key]


def _standin_new(cls: type[StandIn], *args: Any) -> StandIn:
    cls.called = True
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


def _rebuild_tensor(storage: Storage, storage_offset: Any, size: Any, stride: Any) -> TensorRef:
    """``torch._utils._rebuild_tensor``: the oldest form, before requires_grad was pickled."""
    return _tensor_ref(storage, storage_offset, size, stride, False, None, None, None)


def _rebuild_tensor_v2(
    storage: Storage, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
    metadata: Any = None,
) -> TensorRef:
    # most tensors of a file: what :func:`_tensor_ref` and :func:`_check_tensor` check, at once
    if (metadata is None and type(storage) is Storage and type(storage_offset) is int and storage_offset >= 0
            and type(size) is tuple and type(stride) is tuple and len(size) == len(stride)
            and type(requires_grad) is bool
            and (backward_hooks is None or (isinstance(backward_hooks, dict) and not backward_hooks))):
        dtype = storage.dtype
        itemsize = ITEMSIZE.get(dtype) if type(dtype) is str else None
        nbytes = storage.nbytes
        if itemsize is not None and type(nbytes) is int and not nbytes % itemsize:
            if len(size) == 1:
                d, s = size[0], stride[0]
                inside = (type(d) is int and type(s) is int and d >= 0 and s >= 0
                          and (d == 0 or storage_offset + (d - 1) * s < nbytes // itemsize))
            else:
                inside = _naturals(size) and _naturals(stride) and (0 in size or storage_offset + sum(
                    (d - 1) * s for d, s in zip(size, stride, strict=True)) < nbytes // itemsize)
            if inside:
                return TensorRef(storage, storage_offset, size, stride, dtype, requires_grad)
    return _tensor_ref(storage, storage_offset, size, stride, requires_grad, backward_hooks, None, metadata)


def _rebuild_tensor_v3(
    storage: Storage, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
    backward_hooks: Any, dtype: Any, metadata: Any = None,
) -> TensorRef:
    if not _is_dtype(dtype):
        raise PickleFormatError("_rebuild_tensor_v3 without a dtype")
    return _tensor_ref(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype.qualname,
                       metadata)


#: The tensor bits ``torch._utils.set_tensor_metadata`` sets (``torch._C._set_tensor_metadata``).
TENSOR_METADATA = ("neg", "conj")


def _tensor_ref(
    storage: Storage, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
    dtype: str | None, metadata: Any,
) -> TensorRef:
    """The reference for one rebuild call, refusing every argument torch would act on that we
    could not carry: what a file says is either represented exactly or not read at all."""
    if not isinstance(storage, Storage):
        raise PickleFormatError("a tensor refers to something that is not a storage")
    if type(size) is tuple and type(stride) is tuple and type(storage_offset) is int and _naturals(size) \
            and _naturals(stride):
        shape, strides, offset = size, stride, storage_offset  # what int() of each would give
    else:
        try:
            shape = tuple(int(d) for d in size)
            strides = tuple(int(s) for s in stride)
            offset = int(storage_offset)
        except (TypeError, ValueError):
            raise PickleFormatError("a tensor has a malformed shape, stride or offset") from None
    if type(requires_grad) is not bool:
        raise PickleFormatError(f"a tensor's requires_grad is {requires_grad!r:.40}, not a bool")
    if backward_hooks is not None and not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise PickleFormatError("a tensor carries pickled backward hooks (code torch would attach to it); "
                                "they cannot be represented, so the file is not read")
    if metadata is None:
        ref = TensorRef(storage, offset, shape, strides, dtype or storage.dtype, requires_grad)
    else:
        bits = _tensor_bits(metadata)
        ref = TensorRef(storage, offset, shape, strides, dtype or storage.dtype, requires_grad, neg=bits["neg"],
                        conj=bits["conj"])
    _check_tensor(ref)
    return ref


_INT = {int}


def _naturals(items: tuple[Any, ...]) -> bool:
    """Every item an int (not a bool or a subclass) and none negative; checked in C, as this runs
    twice for every tensor of a file."""
    return not items or (set(map(type, items)) == _INT and min(items) >= 0)


def _tensor_bits(metadata: Any) -> dict[str, bool]:
    """The neg/conj bits of a rebuild call's ``metadata``; anything else in it is refused."""
    bits = dict.fromkeys(TENSOR_METADATA, False)
    if metadata is None or (isinstance(metadata, dict) and not metadata):
        return bits
    if type(metadata) is not dict:
        raise PickleFormatError(f"a tensor's metadata is a {type(metadata).__name__}, not a dict")
    for key, value in metadata.items():
        if key not in bits or type(value) is not bool:
            raise PickleFormatError(f"a tensor's metadata holds {key!r:.40}: {value!r:.40}, which ckptmigrate "
                                    f"cannot represent (known: {', '.join(TENSOR_METADATA)} as booleans)")
        bits[key] = value
    return bits


def _check_tensor(ref: TensorRef) -> None:
    """A tensor must lie inside its storage, in whole elements of its dtype (what ``to_torch`` maps)."""
    storage, shape, strides = ref.storage, ref.shape, ref.stride
    if not (
        isinstance(shape, tuple) and isinstance(strides, tuple) and len(shape) == len(strides)
        and _naturals(shape) and _naturals(strides)
    ):
        raise PickleFormatError(f"a tensor has an invalid shape {shape!r:.80} or stride {strides!r:.80}")
    if type(ref.storage_offset) is not int or ref.storage_offset < 0:
        raise PickleFormatError(f"a tensor has an invalid storage offset {ref.storage_offset!r:.80}")
    if not (isinstance(ref.dtype, str) and ref.dtype in ITEMSIZE):
        raise PickleFormatError(f"a tensor has an unknown dtype {ref.dtype!r:.80}")
    if not (isinstance(ref.requires_grad, bool) and isinstance(ref.extra, dict)
            and type(ref.neg) is bool and type(ref.conj) is bool):
        raise PickleFormatError("the pickle altered a tensor after creating it")
    if ref.conj and not ref.dtype.startswith("complex"):
        raise PickleFormatError(f"a {ref.dtype} tensor has the conj bit, which only complex tensors can have")
    itemsize = ITEMSIZE[ref.dtype]
    if storage.nbytes % itemsize:
        raise PickleFormatError(
            f"storage {storage.key!r} holds {storage.nbytes} bytes, not whole {ref.dtype} elements"
        )
    if 0 not in shape:  # a scalar (shape ()) has one element too
        if len(shape) == 1:
            last = ref.storage_offset + (shape[0] - 1) * strides[0]
        else:
            last = ref.storage_offset + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
        if last >= storage.nbytes // itemsize:
            raise PickleFormatError(f"a tensor of shape {list(shape)} reaches past its storage {storage.key!r}")


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise PickleFormatError("a parameter wraps something that is not a tensor")
    if type(requires_grad) is not bool:
        raise PickleFormatError(f"a parameter's requires_grad is {requires_grad!r:.40}, not a bool")
    if backward_hooks is not None and not (isinstance(backward_hooks, dict) and not backward_hooks):
        raise PickleFormatError("a parameter carries pickled backward hooks (code torch would attach to it); "
                                "they cannot be represented, so the file is not read")
    data.requires_grad = requires_grad
    data.extra["parameter"] = True
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> TensorRef:
    """A parameter with Python attributes (``param.tensor_parallel = True``): kept for the writer."""
    ref = _rebuild_parameter(data, requires_grad, backward_hooks)
    ref.extra["parameter_state"] = state
    return ref


class TorchRebuild:
    """One of torch's rebuild functions as a pickle may call it. A pickle can also BUILD (set
    attributes on) any object it names, so what ``find_class`` hands out refuses that: a pickle
    never changes how the next one is read."""

    __slots__ = ("fn", "module", "name")

    def __init__(self, fn: Callable[..., Any], module: str, name: str) -> None:
        self.fn, self.module, self.name = fn, module, name

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise PickleFormatError(f"the pickle tries to modify {self.module}.{self.name}")


_TENSOR_BUILDERS: dict[str, TorchRebuild] = {
    name: TorchRebuild(fn, "torch._utils", name) for name, fn in (
        ("_rebuild_tensor", _rebuild_tensor),
        ("_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("_rebuild_tensor_v3", _rebuild_tensor_v3),
        ("_rebuild_parameter", _rebuild_parameter),
        ("_rebuild_parameter_with_state", _rebuild_parameter_with_state),
    )
}
for _name in torch_builds.BUILDERS:  # quantized, sparse, nested, meta: tensors built from parts
    _TENSOR_BUILDERS[_name] = TorchRebuild(
        lambda *args, _builder=_name: torch_builds.describe(_builder, args, global_name, _tensor_ref),
        "torch._utils", _name,
    )


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2``: a tensor with Python attributes, or of a subclass.

    When the inner builder is one we read, the result is a TensorRef that remembers the type and
    the attributes for the writer; otherwise the call stays an inert stand-in.
    """
    if isinstance(func, TorchRebuild) and isinstance(args, tuple):
        ref = func(*args)
        if isinstance(ref, TensorRef) and not ref.extra.get("parameter"):
            ref.extra["from_type"] = (new_type, state)
            return ref
        if isinstance(ref, ComposedTensor):  # a subclass built from parts: a DTensor
            return torch_builds.subclass(ref, (func, new_type, args, state), global_name)
    return standin("torch._tensor", "_rebuild_from_type_v2")(func, new_type, args, state)


_REBUILD_FROM_TYPE = TorchRebuild(_rebuild_from_type_v2, "torch._tensor", "_rebuild_from_type_v2")
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
        self.globals_named: set[tuple[str, str]] = set()
        self.standins: dict[tuple[str, str], type[StandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        self.globals_named.add((module, name))
        if len(self.globals_named) > MAX_GLOBALS:
            raise PickleFormatError(f"the pickle names more than {MAX_GLOBALS:,} distinct globals")
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch._utils" and name in _TENSOR_BUILDERS:
            return _TENSOR_BUILDERS[name]
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _REBUILD_FROM_TYPE
        return standin(module, name, self.standins)

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


@pausing
def load(
    data: bytes | BinaryIO, storages: dict[str, Storage] | None = None, named: dict[str, bool] | None = None,
    *, direct: bool = True,
) -> Any:
    """Unpickle a torch payload safely; raises PickleFormatError for anything malformed.

    ``named`` receives every global the pickle names (``module.qualname``) and whether it calls it
    (what :func:`ckptmigrate.formats.pickle_safety.assess` judges). ``direct=False`` skips
    :func:`ckptmigrate.formats.pickle_direct.decode` (the tests compare both paths).

    Besides running no pickled code, the result is safe to walk: containers nest at most
    :data:`MAX_DEPTH` deep and share little enough that a walk stays short, and every tensor lies
    inside its storage. Reference cycles (a dict that holds itself, an OmegaConf node's ``_parent``)
    are kept, as torch keeps them: code that walks a payload tracks the objects on its path.
    """
    storages = {} if storages is None else storages
    if direct and isinstance(data, (bytes, bytearray, memoryview)):
        # a state dict as torch pickles it: one decode (None for anything else: the general path)
        payload = pickle_direct.decode(bytes(data), storages, _rebuild_tensor_v2, named)
        if payload is not None:
            return payload
    fh = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            scan(bytes(data))
        elif isinstance(fh, io.BytesIO):
            scan(fh.getvalue(), fh.tell())
        else:  # a file: the pickle is followed by other data (the legacy format)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                scan(view, fh.tell())
        unpickler = SafeUnpickler(fh, storages)
        payload = unpickler.load()
        _check_payload(payload, storages)
        if named is not None:
            for (module, name) in unpickler.globals_named:
                cls = unpickler.standins.get((module, name))
                key = f"{module}.{name}"
                named[key] = named.get(key, False) or bool(cls is not None and cls.called)
        return payload
    except PickleFormatError as exc:
        if str(exc).isprintable():
            raise
        raise PickleFormatError(one_line(exc)) from None  # it quotes the file: one line, escaped
    except RecursionError:
        raise PickleFormatError("the pickle is nested too deeply") from None
    except MemoryError:
        raise PickleFormatError("the pickle asks for more memory than it can hold") from None
    except Exception as exc:  # the unpickler raises many types on malformed input
        raise PickleFormatError(f"malformed pickle ({one_line(f'{type(exc).__name__}: {exc}'[:300])})") from None


_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None))


def _check_payload(payload: Any, storages: dict[str, Storage]) -> None:
    """Walk the unpickled payload once, without recursion: refuse nesting deeper than MAX_DEPTH,
    sharing that would make a walk of it explode, and storages that are not the ones the pickle's
    persistent ids made. A reference back to an
    object on the current path (a cycle) counts as one visit, as a cycle-aware walk makes it."""
    for storage in storages.values():
        _check_storage(storage, storages)
    cap = 1 << 62
    done: dict[int, tuple[int, int]] = {}  # id -> (height, visits a walk from it makes)
    on_path: set[int] = set()
    slots = 0
    # a frame: [object, weight, children, next child, depth, tallest child, visits so far]
    root: list[Any] = [None, 0, [payload], 0, 0, 0, 0]
    frames = [root]
    while frames:
        frame = frames[-1]
        children = frame[2]
        if frame[3] < len(children):
            child = children[frame[3]]
            frame[3] += 1
            if type(child) in _ATOMS:
                frame[6] = min(cap, frame[6] + 1)
                continue
            if type(child) is TensorRef and type(child.extra) is dict and not child.extra:
                # a plain tensor, the most frequent node: a leaf one level high (what _node gives)
                if frame[4] + 1 > MAX_DEPTH:
                    raise PickleFormatError(f"the pickle nests containers more than {MAX_DEPTH} deep")
                frame[5] = frame[5] or 1
                frame[6] = min(cap, frame[6] + 1)
                continue
            known = done.get(id(child))
            if known is None and id(child) in on_path:
                frame[6] = min(cap, frame[6] + 1)
                continue
            if known is None:
                weight, grandchildren = _node(child, storages)
                if frame[4] + weight > MAX_DEPTH:
                    raise PickleFormatError(f"the pickle nests containers more than {MAX_DEPTH} deep")
                if grandchildren is not None:
                    on_path.add(id(child))
                    frames.append([child, weight, grandchildren, 0, frame[4] + weight, 0, 1])
                    continue
                known = done[id(child)] = (weight, 1)
            elif frame[4] + known[0] > MAX_DEPTH:
                raise PickleFormatError(f"the pickle nests containers more than {MAX_DEPTH} deep")
            frame[5] = max(frame[5], known[0])
            frame[6] = min(cap, frame[6] + known[1])
            continue
        frames.pop()
        if frame is root:
            break
        obj = frame[0]
        height = done[id(obj)] = (frame[1] + frame[5], frame[6])
        on_path.discard(id(obj))
        slots += len(children)
        parent = frames[-1]
        parent[5] = max(parent[5], height[0])
        parent[6] = min(cap, parent[6] + height[1])
    if root[6] - slots - 1 > MAX_SHARED_VISITS:
        raise PickleFormatError(f"the pickle shares objects so often that a walk of it visits {root[6]:,} of them")


def _node(obj: Any, storages: dict[str, Storage]) -> tuple[int, list[Any] | None]:
    """(nesting weight, children; None for a leaf) of one payload object; checks tensors."""
    if isinstance(obj, (list, tuple, set, frozenset)):
        return 1, list(obj)
    if isinstance(obj, dict):
        attributes = list(vars(obj).values()) if hasattr(obj, "__dict__") else []  # OrderedDict._metadata
        return 1, [*obj.keys(), *obj.values(), *attributes]
    if isinstance(obj, StandIn):
        return 2, [obj.args, obj.state, obj.listitems, obj.dictitems]
    if isinstance(obj, TensorRef):
        # checked when it was built (:func:`_tensor_ref`); a pickle cannot alter it after that (its
        # ``__setstate__`` refuses BUILD), only the rebuild calls that wrap it, which check what they set
        return 1, [obj.extra] if obj.extra or not isinstance(obj.extra, dict) else None
    if isinstance(obj, ComposedTensor):
        return 1, [obj.args]
    if isinstance(obj, Storage):
        _check_storage(obj, storages)
    return 1, None


def _check_storage(storage: Any, storages: dict[str, Storage]) -> None:
    if not (
        isinstance(storage, Storage) and isinstance(storage.key, str) and storages.get(storage.key) is storage
        and isinstance(storage.dtype, str) and storage.dtype in ITEMSIZE
        and type(storage.nbytes) is int and storage.nbytes >= 0 and isinstance(storage.location, str)
        and storage.source is None and storage.offset is None and storage.crc32 is None
    ):
        raise PickleFormatError("the pickle altered a storage after creating it")
