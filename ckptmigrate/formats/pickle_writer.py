"""Write a payload back as torch pickles it: stand-ins as the globals they stand for, tensors as
torch's rebuild calls on persistent storages, so ``torch.load`` reads a rewritten file exactly as
it read the original.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import struct
from collections.abc import Callable
from itertools import islice
from typing import Any, BinaryIO

from ckptmigrate.formats import native
from ckptmigrate.formats.pickled import TorchRebuild, global_name, standin
from ckptmigrate.tensors.refs import (
    ITEMSIZE,
    STORAGE_FOR_DTYPE,
    ComposedTensor,
    Deferred,
    Storage,
    TensorRef,
    dtype_of,
    shape_of,
)
from ckptmigrate.util.gcpause import pausing

_encode = native.load("_encode")
_PurePickler: Any = getattr(pickle, "_Pickler")  # noqa: B009 - the pure-Python pickler lets save_global be overridden
#: Types neither :meth:`_Writer.persistent_id` nor :meth:`_Writer.reducer_override` acts on: saved
#: straight from the dispatch table.
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None), bytes, tuple, list, dict})


class _Writer(_PurePickler):
    """The pure-Python pickler, taught to write stand-ins and tensors as torch expects.

    Its per-object cost (a few microseconds) is what a checkpoint of many tensors pays, so plain
    types skip the two hooks that never apply to them, and a tensor's rebuild call is written as
    opcodes directly (:meth:`_save_tensor`) rather than object by object.
    """

    def __init__(self, file: BinaryIO, storage_of: Callable[[Any], tuple[str, Storage]]) -> None:
        super().__init__(file, protocol=2)
        self._storage_of = storage_of
        self._dispatch = self.dispatch
        self._memo = self.memo
        self._unlisted = 0  # memo indices given to objects nothing else refers to, not kept in the memo
        self._plain: dict[str, bytes] = {}  # dtype: the opcodes every plain tensor of it starts with
        self._middles: dict[tuple[Any, ...], tuple[bytes, bytes, bytes, bytes]] = {}  # see _plain_ref
        self._texts: dict[str, int] = {}  # "storage", locations, storage keys: memo indices, got by value
        self._tuple_ops: dict[int, tuple[tuple[Any, ...], bytes | None]] = {}  # see _tuple_op
        self._entries = self._entries_in_c(storage_of)
        self.write = file.write  # protocol 2 has no frames: the framer would only pass writes on

    def _entries_in_c(self, storage_of: Any) -> Callable[[list[Any], int, int], tuple[bytes, int, int]] | None:
        """``_encode.entries`` bound to this writer's memo and caches and the storage plan's tables:
        ``(batch, pos, idx)`` gives the bytes of the run of entries from ``batch[pos]`` on that
        :meth:`_plain_ref` would write, all at once, their count and the memo index after them.
        None without the compiled module or a plan that offers its tables (see
        ``torchzip._StoragePlan.ref_tables``)."""
        tables = getattr(storage_of, "ref_tables", None)
        if _encode is None or tables is None:
            return None
        by_storage, taken, records = tables
        return functools.partial(_encode.entries, TensorRef, Storage, self._memo, self._texts, self._plain,
                                 self._middles, ITEMSIZE, by_storage, taken, records)

    def _memo_ref(self, obj: Any) -> bytes | None:
        """The opcode that fetches ``obj`` from the memo, or None when it is not there yet."""
        x = self._memo.get(id(obj))
        return None if x is None else self.get(x[0])

    def _put(self, obj: Any) -> bytes:
        """Memoise ``obj`` as ``memoize`` does, returning the opcode instead of writing it."""
        idx = len(self._memo) + self._unlisted
        self._memo[id(obj)] = idx, obj
        return _put_op(idx)

    def _put_unlisted(self) -> bytes:
        """The put of an object nothing else refers to (a tuple torch builds afresh): not kept."""
        idx = len(self._memo) + self._unlisted
        self._unlisted += 1
        return _put_op(idx)

    def _text(self, text: str) -> bytes:
        """A string of a persistent id ("storage", a device, a storage key): put once, got after, as
        torch's are (by value here: equal strings need not be one object; a string's value is all
        a get gives back)."""
        idx = self._texts.get(text)
        if idx is not None:
            return _get_op(idx)
        self._texts[text] = len(self._memo) + self._unlisted
        return _str_op(text) + self._put_unlisted()

    def memoize(self, obj: Any) -> None:
        idx = len(self._memo) + self._unlisted
        self.write(self.put(idx))
        self._memo[id(obj)] = idx, obj

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        t = type(obj)
        if t is str:
            got = self._memo_ref(obj)
            self.write(got if got is not None else _str_op(obj) + self._put(obj))
            return
        if t in _PLAIN_TYPES:
            got = self._memo_ref(obj)
            if got is not None:
                self.write(got)
            else:
                self._dispatch[t](self, obj)
            return
        if t is TensorRef:
            got = self._memo_ref(obj)
            if got is not None:
                self.write(got)
                return
            if not self._save_plain_ref(obj):
                func, args = self._reduce_ref(obj)
                self._save_tensor(obj, func, args)
            return
        if isinstance(obj, TorchRebuild):  # a rebuild function kept inside a stand-in: torch's name for it
            obj = standin(obj.module, obj.name)
        super().save(obj, save_persistent_id)

    def _save_plain_ref(self, ref: TensorRef) -> bool:
        """What :meth:`_save_tensor` writes for a plain tensor (no bits, attributes or parameter, a
        dtype with a typed storage) whose rebuild function, storage type and ``OrderedDict`` are
        already in the memo, built at once; False (nothing written) for any other."""
        op = self._plain_ref(ref)
        if op is None:
            return False
        self.write(op)
        return True

    def _plain_ref(self, ref: TensorRef, key: str | None = None) -> bytes | None:
        """The bytes :meth:`_save_plain_ref` writes (the tensor and its hooks memoised), or None with
        nothing memoised. With ``key`` (a string not in the memo), the bytes of the state dict entry:
        the key, memoised, then the tensor.

        The opcodes between the puts are the same for every tensor of one dtype, device, storage
        size, offset, shape, stride and ``requires_grad`` (a model repeats a few dozen): they are
        built once (:attr:`_middles`)."""
        if ref.extra or ref.neg or ref.conj:
            return None
        known = self._plain.get(ref.dtype)
        memo = self._memo
        if known is None:  # the memo gets of its rebuild function, "storage", storage type and OrderedDict
            storage_type = _STORAGE_TYPE.get(ref.dtype)
            fn, st, od = memo.get(id(_REBUILD_V2)), memo.get(id(storage_type)), memo.get(id(collections.OrderedDict))
            kind = self._texts.get(_STORAGE)
            if fn is None or st is None or od is None or kind is None:
                return None
            # memoised objects stay in the memo: these opcodes hold for the rest of the pickle
            known = self._plain[ref.dtype] = _get_op(fn[0]) + _MARK_MARK + _get_op(kind) + _get_op(st[0])
        location = self._texts.get(ref.storage.location)
        shape, stride, offset = self._tuple_op(ref.shape), self._tuple_op(ref.stride), ref.storage_offset
        if location is None or shape is None or stride is None or type(offset) is not int:
            return None
        record, storage = self._storage_of(ref)
        numel = storage.nbytes // ITEMSIZE[ref.dtype]
        flag = pickle.NEWTRUE if ref.requires_grad else pickle.NEWFALSE
        # exact ints only in the key: 1 == 1.0 == True, and a float storage size must still raise
        template = (ref.dtype, storage.location, numel, offset, shape, stride, flag) if type(numel) is int else None
        middle = self._middles.get(template) if template is not None else None
        if middle is None:
            middle = (
                _get_op(location) + _int_op(numel) + pickle.TUPLE,
                pickle.BINPERSID + _int_op(offset) + shape,
                stride,
                flag + _get_op(memo[id(collections.OrderedDict)][0]) + _EMPTY_REDUCE,
            )
            if template is not None and len(self._middles) < 4096:
                self._middles[template] = middle
        idx = len(memo) + self._unlisted
        out: list[bytes] = []
        if key is not None:  # the key is put first, as save() would
            memo[id(key)] = idx, key
            raw = key.encode("utf-8", "surrogatepass")
            out += (_BINUNICODE_LEN.pack(_BINUNICODE, len(raw)), raw, _put_op(idx))
            idx += 1
        out.append(known)
        got = self._texts.get(record)
        if got is None:  # as torch: the storage key put, and got by the next tensor of the storage
            self._texts[record] = idx
            out += (_str_op(record), _put_op(idx))
            idx += 1
        else:
            out.append(_get_op(got))
        # the persistent id, shape, stride (an empty tuple is not put), hooks and arguments are put
        # as torch puts them, and never got: their indices are not kept
        out += (middle[0], _put_op(idx), middle[1])
        idx += 1
        if shape != pickle.EMPTY_TUPLE:
            out.append(_put_op(idx))
            idx += 1
        out.append(stride)
        if stride != pickle.EMPTY_TUPLE:
            out.append(_put_op(idx))
            idx += 1
        out += (middle[3], _put_op(idx), _TUPLE_OP, _put_op(idx + 1), _REDUCE_OP, _put_op(idx + 2))
        memo[id(ref)] = idx + 2, ref
        self._unlisted = idx + 3 - len(memo)
        return b"".join(out)

    def _tuple_op(self, items: Any) -> bytes | None:
        """:func:`_int_tuple`, remembered by the tuple object: the tensors of a file share a few shape
        and stride tuples, and a tuple's items never change, so its bytes are built once."""
        known = self._tuple_ops.get(id(items))
        if known is not None and known[0] is items:
            return known[1]
        encoded = _int_tuple(items)
        if type(items) is tuple and len(self._tuple_ops) < 4096:
            self._tuple_ops[id(items)] = items, encoded  # the tuple is held, so its id stays its own
        return encoded

    def _batch_setitems(self, items: Any) -> None:
        """The SETITEMS batches of torch's (the C) pickler, with a state dict's entries (a new ``str``
        key, a plain tensor) gathered as bytes: the same opcodes without two ``save`` calls an entry.

        A ``dict``'s items (not an ``OrderedDict``'s, which come as an iterator) are batched as the C
        pickler batches an exact dict: every batch marked, and one more, empty, after a full one."""
        exact = type(items) is _DICT_ITEMS and len(items) > 1
        it = iter(items)
        memo = self._memo
        write = self.write
        size = self._BATCHSIZE
        in_c = self._entries
        ready = in_c is not None  # False after an entry C would refuse: C waits for a plain one
        while True:
            batch = list(islice(it, size))
            n = len(batch)
            marked = n > 1 or exact
            out: list[bytes] = [pickle.MARK] if marked else []
            pos = 0
            while pos < n:
                if ready and in_c is not None:  # the run of entries C writes, then the one it left, here
                    run, count, following = in_c(batch, pos, len(memo) + self._unlisted)
                    if count:
                        out.append(run)
                        self._unlisted = following - len(memo)
                        pos += count
                        if pos == n:
                            break
                k, v = batch[pos]
                pos += 1
                if type(k) is str and type(v) is TensorRef and id(k) not in memo and id(v) not in memo:
                    op = self._plain_ref(v, k)
                    if op is not None:
                        out.append(op)
                        ready = in_c is not None  # its dtype and layout are known now
                        continue
                    ready = False
                    out.append(_str_op(k) + self._put(k))
                    write(b"".join(out))
                    out.clear()
                    self.save(v)
                    continue
                ready = False
                write(b"".join(out))
                out.clear()
                self.save(k)
                self.save(v)
            if n or marked:
                out.append(pickle.SETITEMS if marked else pickle.SETITEM)
            write(b"".join(out))
            if n < size:
                return

    def _save_tensor(self, obj: Any, func: Any, args: Any) -> None:
        """``save_reduce(func, args)`` for a tensor's rebuild call, with its usual arguments (ints,
        tuples of ints, a persistent storage, empty hooks, a wrapped tensor) written as opcodes;
        anything else goes through :meth:`save`. The tensor is memoised, as ``save_reduce`` does."""
        if type(args) is not tuple:
            self.save_reduce(func, args, obj=obj)
            return
        buf: list[bytes] = []
        write = self.write

        def save(item: Any) -> None:  # the general way, after what is buffered
            write(b"".join(buf))
            buf.clear()
            self.save(item)

        got = self._memo_ref(func)
        if got is None:
            save(func)
        else:
            buf.append(got)
        buf.append(pickle.MARK)
        for item in args:
            t = type(item)
            if t is int or t is bool:
                buf.append(_int_op(item))
                continue
            if t is tuple:
                encoded = _int_tuple(item)
                if encoded is not None:  # put, unless empty, as save_tuple does; never got
                    buf.append(encoded if encoded == pickle.EMPTY_TUPLE else encoded + self._put_unlisted())
                    continue
            elif t is _PersistentStorage and _plain_pid(item.pid):
                kind, storage_type, key, location, numel = item.pid
                buf.append(pickle.MARK + self._text(kind))
                got = self._memo_ref(storage_type)
                if got is None:
                    save(storage_type)
                else:
                    buf.append(got)
                buf.append(self._text(key) + self._text(location) + _int_op(numel) + pickle.TUPLE
                           + self._put_unlisted() + pickle.BINPERSID)
                continue
            elif t is collections.OrderedDict and not item and not vars(item) and id(item) not in self._memo:
                got = self._memo_ref(collections.OrderedDict)
                if got is None:
                    save(collections.OrderedDict)
                else:
                    buf.append(got)
                buf.append(pickle.EMPTY_TUPLE + pickle.REDUCE + self._put(item))
                continue
            elif t is _Reduced and id(item) not in self._memo:
                write(b"".join(buf))
                buf.clear()
                self._save_tensor(item, *item.reduced)
                continue
            save(item)
        buf.append(pickle.TUPLE + self._put_unlisted() + pickle.REDUCE + self._put(obj))
        write(b"".join(buf))

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
        if isinstance(obj, ComposedTensor):  # the same call of torch's rebuild function, parts and all
            module, _, name = obj.builder.rpartition(".")
            return (standin(module, name), obj.args)
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
        metadata: dict[str, bool] = {}
        if isinstance(obj, TensorRef):
            offset, shape, stride, requires_grad = (
                obj.storage_offset, obj.shape, obj.stride,
                obj.requires_grad if requires_grad is None else requires_grad,
            )
            metadata = obj.metadata
        elif not isinstance(obj, Deferred):
            # a torch tensor: storage_of gave its whole storage, so it keeps its own view of it
            shape, stride = shape_of(obj), tuple(int(s) for s in obj.stride())
            offset, requires_grad = int(obj.storage_offset()), False
            metadata = {k: True for k, on in (("conj", obj.is_conj()), ("neg", obj.is_neg())) if on}
        else:  # computed: the writer streams its values with the bits resolved
            from ckptmigrate.tensors.refs import contiguous_stride

            shape = shape_of(obj)
            offset, stride, requires_grad = 0, contiguous_stride(shape), False
        dtype = dtype_of(obj)
        hooks = collections.OrderedDict()  # type: ignore[var-annotated]
        persistent = _PersistentStorage(_storage_pid(dtype, key, storage))
        tail = (metadata,) if metadata else ()  # as torch writes it: only when a bit is set
        if dtype in STORAGE_FOR_DTYPE:
            args: tuple[Any, ...] = (persistent, offset, shape, stride, requires_grad, hooks, *tail)
            return (standin("torch._utils", "_rebuild_tensor_v2"), args)
        args = (persistent, offset, shape, stride, requires_grad, hooks, standin("torch", dtype), *tail)
        return (standin("torch._utils", "_rebuild_tensor_v3"), args)


_REBUILD_V2 = standin("torch._utils", "_rebuild_tensor_v2")
_STORAGE_TYPE = {dtype: standin("torch", name) for dtype, name in STORAGE_FOR_DTYPE.items()}
_STORAGE = "storage"
_DICT_ITEMS: Any = type({}.items())
_MARK_MARK = pickle.MARK + pickle.MARK
_EMPTY_REDUCE = pickle.EMPTY_TUPLE + pickle.REDUCE
_TUPLE_OP, _REDUCE_OP = pickle.TUPLE, pickle.REDUCE
_BININT = struct.Struct("<i")
_INDEX = struct.Struct("<I")
_BINUNICODE_LEN = struct.Struct("<BI")  # BINUNICODE and a length
_BINUNICODE = pickle.BINUNICODE[0]


def _put_op(idx: int) -> bytes:
    """``Pickler.put`` at protocol 2."""
    return pickle.BINPUT + bytes((idx,)) if idx < 256 else pickle.LONG_BINPUT + _INDEX.pack(idx)


def _get_op(idx: int) -> bytes:
    """``Pickler.get`` at protocol 2."""
    return pickle.BINGET + bytes((idx,)) if idx < 256 else pickle.LONG_BINGET + _INDEX.pack(idx)


_SMALL_INTS = [pickle.BININT1 + bytes([i]) for i in range(256)]


def _int_op(n: int) -> bytes:
    """An int (or bool) as protocol 2 pickles it; TypeError for anything else."""
    if type(n) is not int and type(n) is not bool:
        raise TypeError(f"not an int: {type(n).__name__}")
    if n is True:
        return pickle.NEWTRUE
    if n is False:
        return pickle.NEWFALSE
    if 0 <= n < 256:
        return _SMALL_INTS[n]
    if 0 <= n < 65536:
        return pickle.BININT2 + struct.pack("<H", n)
    if -(1 << 31) <= n < (1 << 31):
        return pickle.BININT + _BININT.pack(n)
    encoded = pickle.encode_long(n)
    if len(encoded) < 256:
        return pickle.LONG1 + bytes([len(encoded)]) + encoded
    return pickle.LONG4 + struct.pack("<i", len(encoded)) + encoded


_TUPLE_OPS = {0: pickle.EMPTY_TUPLE, 1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}


_TUPLES: dict[tuple[Any, ...], bytes] = {}


def _int_tuple(items: tuple[Any, ...]) -> bytes | None:
    """A tuple of ints (a shape, a stride) without its put (the caller puts it, unless empty, as
    torch's pickler does); None when it holds anything but ints. The shapes of a model repeat: the
    last few thousand are kept."""
    if type(items) is tuple and len(items) < 8:
        for d in items:  # only exact ints are looked up: (1,) == (True,) == (1.0,), and hashing runs code
            if type(d) is not int:
                break
        else:
            got = _TUPLES.get(items)
            if got is None:
                got = _encode_int_tuple(items)
                if got is not None and len(_TUPLES) < 4096:
                    _TUPLES[items] = got
            return got
    return _encode_int_tuple(items)


def _encode_int_tuple(items: tuple[Any, ...]) -> bytes | None:
    try:
        body = b"".join([_SMALL_INTS[d] if type(d) is int and 0 <= d < 256 else _int_op(d) for d in items])
    except TypeError:
        return None
    if len(items) in _TUPLE_OPS:
        return body + _TUPLE_OPS[len(items)]
    return pickle.MARK + body + pickle.TUPLE


def _plain_pid(pid: Any) -> bool:
    """A persistent id as :func:`_storage_pid` makes it: ``("storage", type, key, location, numel)``."""
    return (
        type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str and type(pid[2]) is str
        and type(pid[3]) is str and type(pid[4]) is int
    )


_LENGTH = struct.Struct("<I")


def _str_op(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return pickle.BINUNICODE + _LENGTH.pack(len(raw)) + raw


def _storage_pid(dtype: str, key: str, storage: Storage) -> tuple[Any, ...]:
    """The persistent id torch writes for a storage viewed as ``dtype``."""
    if dtype in STORAGE_FOR_DTYPE:
        return (_STORAGE, standin("torch", STORAGE_FOR_DTYPE[dtype]), key, storage.location,
                storage.nbytes // _itemsize(dtype))
    return (_STORAGE, standin("torch.storage", "UntypedStorage"), key, storage.location,
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


@pausing
def dump(obj: Any, storage_of: Callable[[Any], tuple[str, Storage]]) -> bytes:
    """Pickle ``obj`` as torch would; ``storage_of(tensor or storage)`` names its storage record."""
    buf = io.BytesIO()
    _Writer(buf, storage_of).dump(obj)
    return buf.getvalue()
