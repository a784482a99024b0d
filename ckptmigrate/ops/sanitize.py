"""Turn a payload's inert stand-ins into the plain types ``torch.load(weights_only=True)`` reads.

torch ≥ 2.6 loads with ``weights_only=True`` by default, which refuses any global outside its
allow-list: an ``argparse.Namespace`` of hyper-parameters, a numpy scalar, a ``pathlib`` path, an
OmegaConf config. Each of those has a plain equivalent, built here from what the restricted
unpickler recorded (the call's arguments and state) — the classes are never imported and nothing
the pickle names is called. Anything without a known equivalent is left exactly as it was.

Conversions (the ``to`` a report names):

- ``argparse.Namespace``, ``types.SimpleNamespace``, Lightning's ``AttributeDict`` and
  ``collections.defaultdict`` (its items; the factory is code) → dict
- numpy scalars → Python scalars (``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``)
- numpy arrays of numbers or booleans → tensors of the same dtype (byte order and Fortran order
  resolved); object, string and datetime arrays are left
- ``pathlib`` paths (pure or concrete, POSIX or Windows) → their string
- OmegaConf ``DictConfig``/``ListConfig`` → dict/list of the values *as written*: interpolations
  (``${lr}``) and missing values (``???``) stay the strings they are, nothing is resolved
- empty ``bytes`` (pickled as a call of ``bytes``, which even a file ``torch.save`` wrote cannot load
  with ``weights_only``) → the ``_codecs.encode`` call torch's loader allows
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from ckptmigrate.formats.pickled import StandIn, global_name, standin
from ckptmigrate.tensors.refs import ComposedTensor, Deferred, Storage, TensorRef

#: numpy dtype codes (``kind`` + item size) → (struct format of one item, ckptmigrate dtype).
NUMPY_DTYPES: dict[str, tuple[str, str]] = {
    "b1": ("?", "bool"), "i1": ("b", "int8"), "i2": ("h", "int16"), "i4": ("i", "int32"), "i8": ("q", "int64"),
    "u1": ("B", "uint8"), "u2": ("H", "uint16"), "u4": ("I", "uint32"), "u8": ("Q", "uint64"),
    "f2": ("e", "float16"), "f4": ("f", "float32"), "f8": ("d", "float64"),
    "c8": ("ff", "complex64"), "c16": ("dd", "complex128"),
}
_NUMPY = ("numpy.core.multiarray.", "numpy._core.multiarray.")
_PATHS = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
PATH_CLASSES = frozenset(f"{m}.{c}" for m in ("pathlib", "pathlib._local") for c in _PATHS)
NAMESPACES = frozenset({"argparse.Namespace"})
ATTRIBUTE_DICTS = frozenset({
    "lightning.fabric.utilities.data.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict", "lightning.pytorch.utilities.parsing.AttributeDict",
})
DICT_CONFIG, LIST_CONFIG = "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig"
_RECONSTRUCTORS = frozenset({"copyreg._reconstructor", "copy_reg._reconstructor"})
_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None))


class _Unconvertible(Exception):
    """A stand-in of a known class whose recorded data is not what its class pickles: left as it is."""


def instance_of(obj: StandIn) -> str | None:
    """The class a stand-in is an instance of (``copyreg.__newobj__`` or ``_reconstructor``), else None
    (a call of a function or of a class's constructor)."""
    if obj.newobj:
        return global_name(obj)
    if global_name(obj) in _RECONSTRUCTORS and obj.args and isinstance(obj.args[0], type):
        return global_name(obj.args[0])
    return None


def _bytes_of(data: Any) -> bytes:
    """``bytes`` as a protocol-2 pickle stores them: ``_codecs.encode(text, "latin1")``, and empty
    ones as ``bytes()``."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, StandIn) and global_name(data) in ("builtins.bytes", "__builtin__.bytes") and not data.args:
        return b""
    if (isinstance(data, StandIn) and global_name(data) == "_codecs.encode" and len(data.args) == 2
            and isinstance(data.args[0], str) and data.args[1] in ("latin1", "latin-1")):
        return data.args[0].encode("latin-1")
    raise _Unconvertible


def _dtype(obj: Any) -> tuple[str, str]:
    """(code such as ``f4`` or ``U5``, byte order ``<``/``>``) of a pickled ``numpy.dtype``."""
    if not (isinstance(obj, StandIn) and global_name(obj) == "numpy.dtype" and obj.args
            and isinstance(obj.args[0], str)):
        raise _Unconvertible
    state = obj.state
    if not (isinstance(state, tuple) and len(state) >= 5 and state[2] is None and state[3] is None
            and state[4] is None):
        raise _Unconvertible  # structured or sub-array dtypes
    order = state[1] if state[1] in ("<", ">", "|", "=") else "|"
    return obj.args[0], ">" if order == ">" else "<"


def _scalar(obj: StandIn, convert: Callable[[Any], Any]) -> Any:
    """``numpy.<core>.multiarray.scalar(dtype, bytes)`` → the Python value."""
    if len(obj.args) != 2:
        raise _Unconvertible
    code, order = _dtype(obj.args[0])
    raw = _bytes_of(obj.args[1])
    kind, size = code[:1], code[1:]
    if kind in ("U", "S") and size.isdigit():
        if kind == "S":
            return _loadable_bytes(raw.rstrip(b"\0"))
        return raw.decode("utf-32-be" if order == ">" else "utf-32-le", "surrogatepass").rstrip("\0")
    if code not in NUMPY_DTYPES:
        raise _Unconvertible
    fmt = NUMPY_DTYPES[code][0]
    if struct.calcsize("<" + fmt) != len(raw):
        raise _Unconvertible
    values = struct.unpack(order + fmt, raw)
    if code == "b1":
        return bool(raw[0])
    if kind == "c":
        return complex(values[0], values[1])
    return values[0]


def _array(obj: StandIn, convert: Callable[[Any], Any]) -> Deferred:
    """``numpy.<core>.multiarray._reconstruct(ndarray, (0,), b"b")`` + its state → a tensor."""
    if not (obj.args and isinstance(obj.args[0], type) and global_name(obj.args[0]) == "numpy.ndarray"):
        raise _Unconvertible  # a subclass (matrix, a masked array) is not a plain array
    state = obj.state
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
            and all(type(d) is int and d >= 0 for d in state[1])) or obj.listitems or obj.dictitems:
        raise _Unconvertible
    _version, shape, dtype, fortran, data = state
    code, order = _dtype(dtype)
    if code not in NUMPY_DTYPES:
        raise _Unconvertible  # object, string, datetime arrays
    raw = _bytes_of(data)
    name = NUMPY_DTYPES[code][1]
    itemsize = struct.calcsize(NUMPY_DTYPES[code][0])
    if len(raw) != math.prod(shape) * itemsize:
        raise _Unconvertible
    return Deferred(tuple(shape), name, lambda: _tensor(raw, name, itemsize, shape, order == ">", bool(fortran)))


def _tensor(raw: bytes, dtype: str, itemsize: int, shape: tuple[int, ...], swap: bool, fortran: bool) -> Any:
    """The tensor a numpy array's bytes hold (computed when the file is written)."""
    import torch

    from ckptmigrate.tensors.refs import torch_dtype

    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if swap and itemsize > 1:
        width = itemsize // 2 if dtype.startswith("complex") else itemsize  # each part swapped on its own
        flat = flat.reshape(-1, width).flip(-1).reshape(-1)
    values = flat.view(torch_dtype(dtype))
    if fortran and len(shape) > 1:
        return values.reshape(tuple(reversed(shape))).permute(*reversed(range(len(shape)))).contiguous()
    return values.reshape(shape).clone()


def _loadable_bytes(raw: bytes) -> Any:
    """``raw`` as torch's ``weights_only`` loader reads it: protocol 2 pickles empty bytes as a call of
    ``bytes``, which that loader refuses (a file ``torch.save`` wrote with ``b""`` in it does not load);
    ``_codecs.encode("", "latin1")``, which it allows, is the same value."""
    if raw:
        return raw
    return standin("_codecs", "encode")("", "latin1")


def _empty_bytes(obj: StandIn, convert: Callable[[Any], Any]) -> Any:
    """``bytes()``: empty bytes, as torch's loader reads them."""
    if obj.args or obj.state is not None:
        raise _Unconvertible
    return _loadable_bytes(b"")


def _path(obj: StandIn, convert: Callable[[Any], Any]) -> str:
    """``pathlib.PosixPath(*parts)`` → the path as a string, for the flavour it was written on."""
    if obj.newobj or obj.state is not None or not all(isinstance(p, str) for p in obj.args):
        raise _Unconvertible
    flavour = PureWindowsPath if "Windows" in (global_name(obj) or "") else PurePosixPath
    return str(flavour(*obj.args))


def _namespace(obj: StandIn, convert: Callable[[Any], Any]) -> dict[Any, Any]:
    """``argparse.Namespace``: its attributes, as a dict."""
    state = {} if obj.state is None else obj.state
    if not isinstance(state, dict) or obj.listitems or obj.dictitems:
        raise _Unconvertible
    return {convert(k): convert(v) for k, v in state.items()}


def _simple_namespace(obj: StandIn, convert: Callable[[Any], Any]) -> dict[Any, Any]:
    """``types.SimpleNamespace(**state)``: its attributes, as a dict."""
    if obj.args:
        raise _Unconvertible
    return _namespace(obj, convert)


def _default_dict(obj: StandIn, convert: Callable[[Any], Any]) -> dict[Any, Any]:
    """``collections.defaultdict(factory)`` and its items: the items (the factory is code)."""
    if len(obj.args) > 1 or obj.state is not None or obj.listitems:
        raise _Unconvertible
    return {convert(k): convert(v) for k, v in obj.dictitems.items()}


def _attribute_dict(obj: StandIn, convert: Callable[[Any], Any]) -> dict[Any, Any]:
    """A dict subclass that only adds attribute access: its items."""
    if obj.state not in (None, {}) or obj.listitems:
        raise _Unconvertible
    return {convert(k): convert(v) for k, v in obj.dictitems.items()}


def _node_state(obj: Any, *keys: str) -> dict[str, Any]:
    state = obj.state
    if not (isinstance(state, dict) and all(k in state for k in keys)):
        raise _Unconvertible
    return state


def _config_children(children: Any) -> None:
    """Every child of a DictConfig/ListConfig is a nested container or a value node holding ``_val``;
    checked before anything is converted, so a config that is not one is left whole."""
    for node in children:
        name = global_name(node) if isinstance(node, StandIn) else None
        if name in (DICT_CONFIG, LIST_CONFIG):
            continue
        if name is None or not name.startswith("omegaconf.nodes."):
            raise _Unconvertible
        _node_state(node, "_val")


def _config_value(node: StandIn, convert: Callable[[Any], Any]) -> Any:
    """A nested container converted, or a value node's ``_val`` as written."""
    if global_name(node) in (DICT_CONFIG, LIST_CONFIG):
        return convert(node)
    return convert(node.state["_val"])


def _dict_config(obj: StandIn, convert: Callable[[Any], Any]) -> Any:
    content = _node_state(obj, "_content")["_content"]
    if content is None or isinstance(content, str):  # None, an interpolation or "???", as written
        return content
    if not isinstance(content, dict):
        raise _Unconvertible
    _config_children(content.values())
    return {convert(k): _config_value(v, convert) for k, v in content.items()}


def _list_config(obj: StandIn, convert: Callable[[Any], Any]) -> Any:
    content = _node_state(obj, "_content")["_content"]
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _Unconvertible
    _config_children(content)
    return [_config_value(v, convert) for v in content]


Converter = Callable[[StandIn, Callable[[Any], Any]], Any]


def _converter(obj: StandIn) -> tuple[str, str, Converter] | None:
    """(the global reported, what it becomes, the converter) for a stand-in with a plain equivalent."""
    called = global_name(obj) or ""
    cls = instance_of(obj)
    if cls in NAMESPACES:
        return cls, "dict", _namespace
    if cls in ATTRIBUTE_DICTS:
        return cls, "dict", _attribute_dict
    if cls == DICT_CONFIG:
        return cls, "dict", _dict_config
    if cls == LIST_CONFIG:
        return cls, "list", _list_config
    if obj.newobj:
        return None
    if called == "types.SimpleNamespace":
        return called, "dict", _simple_namespace
    if called == "collections.defaultdict":
        return called, "dict", _default_dict
    if called in ("builtins.bytes", "__builtin__.bytes"):
        return "builtins.bytes", "_codecs.encode (empty bytes)", _empty_bytes
    if called in PATH_CLASSES:
        return called, "str", _path
    if called.startswith(_NUMPY) and called.endswith(".scalar"):
        return "numpy scalar", "Python scalar", _scalar
    if called.startswith(_NUMPY) and called.endswith("._reconstruct"):
        return "numpy.ndarray", "tensor (dtype kept)", _array
    return None


class Sanitizer:
    """One pass over a payload: converts what it can in place (containers are edited, converted
    objects replaced), keeps shared objects shared, and counts what it converted."""

    def __init__(self) -> None:
        self.converted: Counter[tuple[str, str]] = Counter()
        self._memo: dict[int, Any] = {}
        self._keep: list[Any] = []  # what the memo's ids name stays alive for the pass

    def convert(self, obj: Any) -> Any:
        """``obj`` with every convertible stand-in in it replaced (the same object when nothing was)."""
        if type(obj) in _ATOMS or isinstance(obj, (TensorRef, Deferred, ComposedTensor, Storage, type)):
            return obj
        key = id(obj)
        if key in self._memo:
            return self._memo[key]
        self._keep.append(obj)
        if isinstance(obj, StandIn):
            return self._stand_in(obj)
        self._memo[key] = obj  # a container that holds itself meets itself, as it is
        if isinstance(obj, dict):
            items = [(self.convert(k), self.convert(v)) for k, v in obj.items()]
            if any(k is not k0 for (k, _), k0 in zip(items, obj, strict=True)) and _distinct_keys(items):
                obj.clear()
                obj.update(items)
            else:  # keys unchanged, or converted keys that would collide or not hash: values only
                for (_, v), k0 in zip(items, list(obj), strict=True):
                    obj[k0] = v
        elif isinstance(obj, list):
            obj[:] = [self.convert(v) for v in obj]
        elif isinstance(obj, (set, frozenset)):
            elements = [self.convert(v) for v in obj]
            if any(a is not b for a, b in zip(elements, obj, strict=True)):
                try:
                    new = set(elements)
                except TypeError:
                    return obj
                if isinstance(obj, set):
                    obj.clear()
                    obj.update(new)
                else:
                    self._memo[key] = frozenset(new)
        elif isinstance(obj, tuple):
            items_t = tuple(self.convert(v) for v in obj)
            if any(a is not b for a, b in zip(items_t, obj, strict=True)):
                self._memo[key] = type(obj)(items_t) if type(obj) is tuple else obj
        return self._memo[key]

    def _stand_in(self, obj: StandIn) -> Any:
        found = _converter(obj)
        if found is None:
            self._memo[id(obj)] = obj  # left as it is, and nothing inside it changes
            return obj
        name, to, fn = found
        self._memo[id(obj)] = obj  # while converting: a cycle back to it (a node's parent) stays
        try:
            out = fn(obj, self.convert)
        except _Unconvertible:
            return obj
        self._memo[id(obj)] = out
        self.converted[(name, to)] += 1
        return out


def _distinct_keys(items: list[tuple[Any, Any]]) -> bool:
    """Converted keys that can still key a dict: hashable, and no two equal."""
    try:
        return len({k for k, _ in items}) == len(items)
    except TypeError:
        return False
