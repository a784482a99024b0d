"""Which globals a pickle names that ``torch.load(weights_only=True)`` refuses — the ones that make
a file run code under ``torch.load(weights_only=False)``.

Computed from the names alone (torch is not imported): :data:`WEIGHTS_ONLY_GLOBALS` is torch's
default allow-list (``torch._weights_only_unpickler._get_allowed_globals``, torch 2.13; a test keeps
it equal to the installed torch's), and protocol-2 names are mapped to Python 3 ones by torch's own
tables (:data:`IMPORT_MAPPING`, :data:`NAME_MAPPING`, ``torch._utils``, torch 2.13), a subset of the
standard library's ``_compat_pickle`` ones: a name only the standard library maps is looked up by
torch as it is written. Like torch's ``get_unsafe_globals_in_checkpoint``, every other
global is unsafe: even one that is only referenced can be called by an allowed function it is
passed to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

WEIGHTS_ONLY_GLOBALS = frozenset({
    "_codecs.encode", "builtins.bytearray", "builtins.complex", "builtins.set", "collections.Counter",
    "collections.OrderedDict", "torch.BFloat16Storage", "torch.BFloat16Tensor", "torch.BoolStorage",
    "torch.BoolTensor", "torch.ByteStorage", "torch.ByteTensor", "torch.CharStorage", "torch.CharTensor",
    "torch.ComplexDoubleStorage", "torch.ComplexFloatStorage", "torch.DoubleStorage", "torch.DoubleTensor",
    "torch.FloatStorage", "torch.FloatTensor", "torch.HalfStorage", "torch.HalfTensor", "torch.IntStorage",
    "torch.IntTensor", "torch.LongStorage", "torch.LongTensor", "torch.QInt32Storage", "torch.QInt8Storage",
    "torch.QUInt2x4Storage", "torch.QUInt4x2Storage", "torch.QUInt8Storage", "torch.ShortStorage",
    "torch.ShortTensor", "torch.Size", "torch.Tensor", "torch._tensor._rebuild_from_type_v2",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor", "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_meta_tensor_no_storage", "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state", "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_wrapper_subclass", "torch.bfloat16", "torch.bits16",
    "torch.bits1x8", "torch.bits2x4", "torch.bits4x2", "torch.bits8", "torch.bool", "torch.complex128",
    "torch.complex32", "torch.complex64", "torch.cuda.BFloat16Storage", "torch.cuda.BFloat16Tensor",
    "torch.cuda.BoolStorage", "torch.cuda.BoolTensor", "torch.cuda.ByteStorage", "torch.cuda.ByteTensor",
    "torch.cuda.CharStorage", "torch.cuda.CharTensor", "torch.cuda.ComplexDoubleStorage",
    "torch.cuda.ComplexFloatStorage", "torch.cuda.DoubleStorage", "torch.cuda.DoubleTensor",
    "torch.cuda.FloatStorage", "torch.cuda.FloatTensor", "torch.cuda.HalfStorage", "torch.cuda.HalfTensor",
    "torch.cuda.IntStorage", "torch.cuda.IntTensor", "torch.cuda.LongStorage", "torch.cuda.LongTensor",
    "torch.cuda.ShortStorage", "torch.cuda.ShortTensor", "torch.cuda.sparse.BFloat16Tensor",
    "torch.cuda.sparse.ByteTensor", "torch.cuda.sparse.CharTensor", "torch.cuda.sparse.DoubleTensor",
    "torch.cuda.sparse.FloatTensor", "torch.cuda.sparse.HalfTensor", "torch.cuda.sparse.IntTensor",
    "torch.cuda.sparse.LongTensor", "torch.cuda.sparse.ShortTensor", "torch.device", "torch.float16",
    "torch.float32", "torch.float4_e2m1fn_x2", "torch.float64", "torch.float8_e4m3fn", "torch.float8_e4m3fnuz",
    "torch.float8_e5m2", "torch.float8_e5m2fnuz", "torch.float8_e8m0fnu", "torch.int1", "torch.int16", "torch.int2",
    "torch.int3", "torch.int32", "torch.int4", "torch.int5", "torch.int6", "torch.int64", "torch.int7", "torch.int8",
    "torch.nn.parameter.Parameter", "torch.per_channel_affine", "torch.per_channel_affine_float_qparams",
    "torch.per_channel_symmetric", "torch.per_tensor_affine", "torch.per_tensor_symmetric", "torch.qint32",
    "torch.qint8", "torch.quint2x4", "torch.quint4x2", "torch.quint8", "torch.serialization._get_layout",
    "torch.sparse.BFloat16Tensor", "torch.sparse.ByteTensor", "torch.sparse.CharTensor", "torch.sparse.DoubleTensor",
    "torch.sparse.FloatTensor", "torch.sparse.HalfTensor", "torch.sparse.IntTensor", "torch.sparse.LongTensor",
    "torch.sparse.ShortTensor", "torch.storage.TypedStorage", "torch.storage.UntypedStorage", "torch.uint1",
    "torch.uint16", "torch.uint2", "torch.uint3", "torch.uint32", "torch.uint4", "torch.uint5", "torch.uint6",
    "torch.uint64", "torch.uint7", "torch.uint8",
})

#: torch's ``torch._utils.IMPORT_MAPPING`` (torch 2.13): Python 2 module → Python 3 module.
IMPORT_MAPPING = {
    "__builtin__": "builtins", "copy_reg": "copyreg", "Queue": "queue", "repr": "reprlib",
    "_abcoll": "collections.abc", "UserDict": "collections", "UserList": "collections",
    "UserString": "collections", "whichdb": "dbm", "StringIO": "io", "cStringIO": "io",
}

#: torch's ``torch._utils.NAME_MAPPING`` (torch 2.13), applied before :data:`IMPORT_MAPPING`.
NAME_MAPPING = {
    ("__builtin__", "xrange"): ("builtins", "range"),
    ("__builtin__", "reduce"): ("functools", "reduce"),
    ("__builtin__", "intern"): ("sys", "intern"),
    ("__builtin__", "unichr"): ("builtins", "chr"),
    ("__builtin__", "unicode"): ("builtins", "str"),
    ("__builtin__", "long"): ("builtins", "int"),
    ("itertools", "izip"): ("builtins", "zip"),
    ("itertools", "imap"): ("builtins", "map"),
    ("itertools", "ifilter"): ("builtins", "filter"),
    ("itertools", "ifilterfalse"): ("itertools", "filterfalse"),
    ("itertools", "izip_longest"): ("itertools", "zip_longest"),
    ("UserDict", "IterableUserDict"): ("collections", "UserDict"),
    ("UserList", "UserList"): ("collections", "UserList"),
    ("UserString", "UserString"): ("collections", "UserString"),
    ("__builtin__", "basestring"): ("builtins", "str"),
    ("exceptions", "StandardError"): ("builtins", "Exception"),
    ("UserDict", "UserDict"): ("collections", "UserDict"),
}


@dataclass(frozen=True)
class PickleSafety:
    """What ``torch.load`` would do with a file's pickles: whether ``weights_only=True`` reads them,
    and the globals outside its allow-list (``called``: the pickle calls or instantiates them)."""

    unsafe: tuple[str, ...] = ()
    called: tuple[str, ...] = ()

    @property
    def weights_only(self) -> bool:
        return not self.unsafe

    def to_dict(self) -> dict[str, object]:
        return {"weights_only": self.weights_only, "unsafe_globals": list(self.unsafe),
                "called": list(self.called)}


def assess(named: Mapping[str, bool]) -> PickleSafety:
    """``named``: every global a file's pickles name (``module.qualname``) → whether it is called."""
    canonical: dict[str, bool] = {}
    for name, called in named.items():
        key = python3_name(name)
        canonical[key] = canonical.get(key, False) or called
    unsafe = sorted(n for n in canonical if n not in WEIGHTS_ONLY_GLOBALS)
    return PickleSafety(tuple(unsafe), tuple(n for n in unsafe if canonical[n]))


def python3_name(name: str) -> str:
    """The name torch looks a global up by: protocol-2 pickles say ``__builtin__.set`` for
    ``builtins.set`` (mapped by torch's tables, not the standard library's larger ones)."""
    module, _, qualname = name.rpartition(".")
    if (module, qualname) in NAME_MAPPING:
        module, qualname = NAME_MAPPING[(module, qualname)]
    else:
        module = IMPORT_MAPPING.get(module, module)
    return f"{module}.{qualname}"
