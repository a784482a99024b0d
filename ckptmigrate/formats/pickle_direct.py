"""One decode of a state dict pickled as torch pickles it, instead of a safety scan and an unpickler.

``torch.save(state_dict)`` (and ckptmigrate's writer) pickle a dict or OrderedDict whose values are
tensors, each thirty opcodes of the same shape. The general path reads such a pickle twice: the scan
(:mod:`~ckptmigrate.formats.pickle_scan`) steps over it, then the C unpickler runs it with two Python
callbacks a tensor. :func:`decode` reads it once: a tensor is one regex match, its arguments are
handed to the rebuild function the unpickler would call, and the few other opcodes (the dict, its
keys, ``_metadata``) are run by a small interpreter for plain values. Past the first ~30 tensors of a
state dict, a run of keys and tensors is decoded at once (:meth:`_Decoder.tiles`): one scanner
matches them unit after unit and C loops over the matches check and build them, taking only the
units that tile the bytes exactly as the opcode-by-opcode read would read them. Where the optional
``_tiles.c`` is built, it reads the run instead, unit by unit, to the same objects.

It accepts only a narrow language, in which the result provably equals the general path's: dicts,
OrderedDicts (with ``_metadata``), lists and tuples of strings, ints, floats, bools, None and tensors
(a training checkpoint's model and optimizer state too); memo puts numbered as a pickler numbers
them (each the next index, so none exceeds the opcodes read and none is overwritten); memo gets only
of those plain values, tensors and the globals it knows, never of a container, so none is shared;
containers nested at most :data:`MAX_NESTING` deep; tuples never a key; no trailing bytes. Anything else, one byte off
this language, returns None and the caller takes the general path, whose verdict is then the verdict:
a file refused by it is refused with the same message (``tests/test_pickle_direct.py`` compares both
on mutated, real and golden pickles).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import struct
import sys
from array import array
from collections.abc import Callable
from itertools import chain, islice, repeat
from operator import eq, mul
from types import MemberDescriptorType
from typing import Any

from ckptmigrate.formats import native
from ckptmigrate.tensors.refs import ITEMSIZE, LEGACY_STORAGE, Storage, TensorRef

#: The C decode of runs (``_tiles.c``), None where not built: :meth:`_Decoder.tiles` in Python then.
_tiles = native.load("_tiles")


def _maker(cls: type) -> Any:
    """How the C decode makes a ``cls`` (a dataclass with slots): (cls, its fields' slot descriptors,
    defaults and whether each is a factory), set as its ``__init__`` sets them; ``cls`` itself,
    called, when its ``__init__`` may do more than that."""
    fields = dataclasses.fields(cls)
    descriptors = [vars(cls).get(f.name) for f in fields]
    if (hasattr(cls, "__post_init__") or cls.__new__ is not object.__new__
            or not all(f.init and not f.kw_only for f in fields)
            or not all(type(d) is MemberDescriptorType for d in descriptors)):
        return cls
    return cls, tuple((d, f.default_factory, True) if f.default_factory is not dataclasses.MISSING
                      else (d, f.default, False) for d, f in zip(descriptors, fields, strict=True))


_STORAGE_MAKER, _TENSOR_MAKER = _maker(Storage), _maker(TensorRef)

#: How deeply the containers of a decoded payload may nest (a state dict and its ``_metadata``: 3; a
#: training checkpoint's optimizer state: 4).
MAX_NESTING = 8
#: The longest key or string decoded (the general path has no such bound; longer ones fall back).
_MAX_STRING = 1 << 16

_Rebuild = Callable[..., TensorRef]


class _Global:
    """A global the pickle names that :func:`decode` knows: what the unpickler's ``find_class`` gives."""

    __slots__ = ("module", "name", "dtype")

    def __init__(self, module: str, name: str, dtype: str | None = None) -> None:
        self.module, self.name, self.dtype = module, name, dtype


_ORDERED_DICT = _Global("collections", "OrderedDict")
_REBUILD_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_GLOBALS: dict[bytes, _Global] = {
    b"collections\nOrderedDict\n": _ORDERED_DICT,
    b"torch._utils\n_rebuild_tensor_v2\n": _REBUILD_V2,
    **{f"torch\n{name}\n".encode(): _Global("torch", name, dtype) for name, dtype in LEGACY_STORAGE.items()
       if dtype in ITEMSIZE},
    b"torch\nUntypedStorage\n": _Global("torch", "UntypedStorage", "uint8"),
}
_GLOBAL_LINES = re.compile(rb"c([A-Za-z_.]+\n[A-Za-z_0-9]+\n)")

# A tensor after its key, as :data:`ckptmigrate.formats.pickle_scan._TENSOR` matches it, with the
# parts the rebuild call needs as groups: key put, function get, "storage" (a get or the string),
# storage type get, storage key (string and put, or a get), location (get, or string and put),
# numel, pid put, offset, shape and put, stride and put, requires_grad, hooks' OrderedDict get, hooks
# put, arguments put, tensor put.
_INT = rb"(K.|M..|J....)"
_PUT = rb"(?:[qr]((?<=q).|(?<=r)....))?"  # the group is the index's bytes
_GET = rb"(h.|j....)"
_RI = rb"(?:K.|M..|J....)"
_TUPLE = rb"(\)|" + _RI + rb"\x85|" + _RI * 2 + rb"\x86|" + _RI * 3 + rb"\x87|\((?:" + _RI + rb")*t)"
_TENSOR = re.compile(
    _PUT + _GET + rb"\(\((?:" + _GET + rb"|X\x07\x00\x00\x00storage)" + _GET
    + rb"(?:X([\x01-\x7f])\x00\x00\x00([0-9]+)" + _PUT + rb"|" + _GET + rb")"
    + rb"(?:" + _GET + rb"|X([\x01-\x7f])\x00\x00\x00([a-z0-9:]+)" + _PUT + rb")"
    + _INT + rb"t" + _PUT + rb"Q" + _INT + _TUPLE + _PUT + _TUPLE + _PUT
    + rb"([\x88\x89])" + _GET + rb"\)R" + _PUT + rb"t" + _PUT + rb"R" + _PUT,
    re.DOTALL,
)
# A run of keys and their tensors as torch pickles all but the first ~30 of a state dict (every put a
# LONG_BINPUT, the storage key a new string, the function, "storage", storage type, location and
# OrderedDict gets): what :meth:`_Decoder.tensor` takes in one comparison, matched unit after unit
# by one scanner, so that a run of them is decoded by C loops over the matches' groups. A key's
# length is not checked by the pattern (its bytes are matched lazily, up to _MAX_TILE_KEY): by the
# decode, which takes only the units that tile the bytes exactly as the opcode-by-opcode read does.
_R4 = rb"r(....)"
_G = rb"(h.|j....)"
_BODY = (
    _R4 + _G + rb"\(\(" + _G + _G + rb"X([\x01-\x7f])\x00\x00\x00([0-9]+)" + _R4 + _G + _INT + rb"t" + _R4
    + rb"Q" + _INT + _TUPLE + _R4 + _TUPLE + _R4 + rb"([\x88\x89])" + _G + rb"\)R" + _R4 + rb"t" + _R4 + rb"R" + _R4
)
_MAX_TILE_KEY = 1024
_TILE_BODY = re.compile(_BODY, re.DOTALL)
_TILE = re.compile(rb"X(....)(.{0,%d}?)" % _MAX_TILE_KEY + _BODY, re.DOTALL)
# the groups of a _TILE match: key length and bytes; puts; gets; storage key length and bytes;
# numel, offset, shape, stride, requires_grad
_KEY_LEN, _KEY, _SKEY_LEN, _SKEY, _NUMEL, _OFFSET, _SHAPE, _STRIDE, _GRAD = 0, 1, 6, 7, 10, 12, 13, 15, 17
_PUTS = (2, 8, 11, 14, 16, 19, 20, 21)
_GETS = (3, 4, 5, 9, 18)  # function, "storage", storage type, location, OrderedDict
#: The first run of tiles decoded at once (then four times as many, up to _MAX_TILES): a run that
#: stops early costs little more than the tensors it decoded.
_FIRST_TILES = 16
_MAX_TILES = 4096
_EIGHT = struct.Struct("<8I")
_DOUBLE = struct.Struct(">d")
_INTS = re.compile(rb"K(.)|M(..)|J(....)", re.DOTALL)


def _int(op: bytes) -> int:
    """A BININT1, BININT2 or BININT (signed) opcode's value."""
    return int.from_bytes(op[1:], "little", signed=op[0] == 0x4A)


def _tuple(op: bytes) -> tuple[int, ...]:
    """The tuple of ints the tensor pattern matched as a shape or stride."""
    if op == b")":
        return ()
    return tuple(int.from_bytes(m[0][1:], "little", signed=m[0][0] == 0x4A) for m in _INTS.finditer(op))


class _Refused(Exception):
    """Not in the language :func:`decode` reads: the general path decides."""


def decode(data: bytes, storages: dict[str, Storage], rebuild: _Rebuild,
           named: dict[str, bool] | None = None) -> Any:
    """The payload of ``data`` as :func:`ckptmigrate.formats.pickled.load` would give it, with the
    storages its persistent ids make added to ``storages`` and its globals to ``named``; None (and
    nothing added) when ``data`` is not in the language read here. ``rebuild`` is the
    ``_rebuild_tensor_v2`` the unpickler calls."""
    if _names_other_globals(data):
        return None
    # the storages made, apart until the decode succeeds; in ``storages`` itself when it is empty
    # (emptied again on a refusal): a state dict's storages are not copied from one dict to another
    mine: dict[str, Storage] = {} if storages else storages
    globals_named: set[_Global] = set()
    try:
        payload = _Decoder(data, storages, mine, rebuild, globals_named).run()
    except BaseException as exc:
        if mine is storages:
            storages.clear()
        if isinstance(exc, (_Refused, ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError)):
            return None
        raise
    if mine is not storages:
        storages.update(mine)
    if named is not None:
        for g in globals_named:
            named.setdefault(f"{g.module}.{g.name}", False)
    return payload


_GLOBAL_OPS = tuple(b"c" + line for line in _GLOBALS)
_NAME_LINE = re.compile(rb"\n[A-Za-z_][\w.]*\n")
_MODULE_LINE = re.compile(rb"c[A-Za-z_][\w.]*\Z")


def _names_other_globals(data: bytes) -> bool:
    """Whether ``data`` seems to name a global :func:`decode` does not read (a config object, a
    Lightning checkpoint's hyper-parameters), which would make it give up, maybe after reading
    every tensor: a quick look at its newlines (a GLOBAL is the only opcode here that has them),
    so such a pickle goes to the general path at once. A wrong guess costs time, never a result."""
    for m in _NAME_LINE.finditer(data):
        end = m.end()
        if not any(data.startswith(op, end - len(op)) for op in _GLOBAL_OPS) \
                and _MODULE_LINE.search(data, max(0, m.start() - 256), m.start()):
            return True
    return False


_PLAIN = (str, int, bool, float, type(None))
_LEAVES = frozenset((*_PLAIN, TensorRef))  # what a container may hold that is not itself walked
#: What a memo get may fetch: never a container (sharing one would need the general path's checks).
_GETTABLE = {str, int, bool, float, type(None), TensorRef, _Global}


class _Decoder:
    def __init__(self, data: bytes, storages: dict[str, Storage], mine: dict[str, Storage], rebuild: _Rebuild,
                 globals_named: set[_Global]) -> None:
        self.data, self.storages, self.mine, self.rebuild = data, storages, mine, rebuild
        self.globals_named = globals_named
        # memo index: its object, for the objects a get may fetch; None for the others (a get of
        # one is refused). Indices are given in order, so the memo is a list.
        self.memo: list[Any] = []
        self.hooks = collections.OrderedDict()  # type: ignore[var-annotated]
        self.got: dict[bytes, Any] = {}  # a get opcode's bytes: what it fetches
        self.known: dict[tuple[bytes, ...], tuple[Any, str]] = {}  # see :meth:`check_gets`
        self.tuples: dict[bytes, tuple[int, ...]] = {}  # a shape's or stride's bytes: the tuple
        self.ints: dict[bytes, int] = {}  # an int opcode's bytes: its value
        #: (offset, shape, stride bytes, storage dtype, storage bytes) that the rebuild call accepted:
        #: the (offset, shape, stride) it built a plain TensorRef of
        self.layouts: dict[tuple[bytes, bytes, bytes, str, int], tuple[int, tuple[int, ...], tuple[int, ...]]] = {}
        #: the C decode's memory of the same, by its own keys (:meth:`tile_gets`, :meth:`tile_layout`)
        self.tile_gets_known: dict[bytes, tuple[str, int, str]] = {}
        self.tile_layouts: dict[bytes, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}

    def storage(self, stype: Any, key: str, location: Any, numel: int) -> Storage:
        """What ``SafeUnpickler.persistent_load`` returns for ``("storage", stype, key, location, numel)``."""
        if type(stype) is not _Global or stype.dtype is None or type(location) is not str or numel < 0:
            raise _Refused
        storage = self.mine.get(key) or self.storages.get(key)
        if storage is None:
            storage = self.mine[key] = Storage(key, stype.dtype, location, numel * ITEMSIZE[stype.dtype])
        return storage

    def run(self) -> Any:
        data = self.data
        end = len(data)
        if data[:2] != b"\x80\x02":
            raise _Refused
        memo = self.memo
        put = memo.append
        stack: list[Any] = []
        marks: list[int] = []
        pos = 2
        tensor = _TENSOR.match
        tile_body = _TILE_BODY.match
        while pos < end:
            op = data[pos]
            if op == 0x58:  # BINUNICODE: a string; a state dict's key, often followed by its tensor
                n = int.from_bytes(data[pos + 1 : pos + 5], "little")
                start = pos + 5
                if n <= _MAX_TILE_KEY and tile_body(data, start + n) is not None:
                    tiled = self.tiles(pos, stack)
                    if tiled is not None:
                        pos = tiled
                        continue
                pos = start + n
                if pos > end or n > _MAX_STRING:
                    raise _Refused
                stack.append(data[start:pos].decode("utf-8", "surrogatepass"))
                m = tensor(data, pos)
                if m is not None:
                    stack.append(self.tensor(m, stack[-1]))
                    pos = m.end()
                continue
            if op == 0x71 or op == 0x72:  # BINPUT, LONG_BINPUT: the next index, of the object on top
                width = 1 if op == 0x71 else 4
                if (int.from_bytes(data[pos + 1 : pos + 1 + width], "little") != len(memo)
                        or pos + 1 + width > end or len(stack) <= (marks[-1] if marks else 0)):
                    raise _Refused
                top = stack[-1]
                put(top if type(top) in _GETTABLE else None)
                pos += 1 + width
                continue
            if op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                width = 1 if op == 0x68 else 4
                got = memo[int.from_bytes(data[pos + 1 : pos + 1 + width], "little")]
                if got is None or pos + 1 + width > end:
                    raise _Refused
                stack.append(got)
                pos += 1 + width
                continue
            pos += 1
            if op == 0x28:  # MARK
                marks.append(len(stack))
            elif op == 0x75:  # SETITEMS
                start = marks.pop()
                items = stack[start:]
                del stack[start:]
                if len(items) % 2 or len(stack) <= (marks[-1] if marks else 0):
                    raise _Refused
                target = stack[-1]
                keys = items[0::2]
                if (type(target) is not dict and type(target) is not collections.OrderedDict) \
                        or not _KEY_TYPES.issuperset(map(type, keys)):
                    raise _Refused
                target.update(zip(keys, items[1::2], strict=True))
            elif op == 0x73:  # SETITEM
                if len(stack) < 3 or (marks and marks[-1] > len(stack) - 3):
                    raise _Refused
                value, k = stack.pop(), stack.pop()
                target = stack[-1]
                if type(target) is not dict and type(target) is not collections.OrderedDict:
                    raise _Refused
                if type(k) not in _KEY_TYPES:
                    raise _Refused
                target[k] = value
            elif op == 0x7D:  # EMPTY_DICT
                stack.append({})
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([])
            elif op == 0x61:  # APPEND
                if len(stack) < 2 or (marks and marks[-1] > len(stack) - 2) or type(stack[-2]) is not list:
                    raise _Refused
                value = stack.pop()
                stack[-1].append(value)
            elif op == 0x65:  # APPENDS
                start = marks.pop()
                if start <= (marks[-1] if marks else 0) or type(stack[start - 1]) is not list:
                    raise _Refused
                stack[start - 1].extend(stack[start:])
                del stack[start:]
            elif op == 0x47:  # BINFLOAT
                if pos + 8 > end:
                    raise _Refused
                stack.append(_DOUBLE.unpack_from(data, pos)[0])
                pos += 8
            elif op == 0x8A:  # LONG1
                n = data[pos]
                if pos + 1 + n > end:
                    raise _Refused
                stack.append(int.from_bytes(data[pos + 1 : pos + 1 + n], "little", signed=True))
                pos += 1 + n
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op == 0x63:  # GLOBAL
                m = _GLOBAL_LINES.match(data, pos - 1)
                g = None if m is None else _GLOBALS.get(m[1])
                if g is None:
                    raise _Refused
                self.globals_named.add(g)
                stack.append(g)
                pos = m.end()  # type: ignore[union-attr]
            elif op == 0x62:  # BUILD: an OrderedDict's attributes (a state dict's _metadata)
                state = stack.pop()
                target = stack[-1]
                if (type(target) is not collections.OrderedDict or type(state) is not dict
                        or (marks and marks[-1] > len(stack) - 1)):
                    raise _Refused
                attributes = vars(target)
                for k, v in state.items():
                    if type(k) is not str:
                        raise _Refused
                    attributes[sys.intern(k)] = v
            elif op == 0x74:  # TUPLE
                start = marks.pop()
                stack[start:] = [tuple(stack[start:])]
            elif 0x85 <= op <= 0x87:  # TUPLE1, TUPLE2, TUPLE3
                n = op - 0x84
                if len(stack) - n < (marks[-1] if marks else 0):
                    raise _Refused
                stack[-n:] = [tuple(stack[-n:])]
            elif op == 0x51:  # BINPERSID: a storage
                pid = stack.pop()
                if (type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage" or type(pid[2]) is not str
                        or type(pid[4]) is not int or len(stack) < (marks[-1] if marks else 0)):
                    raise _Refused
                stack.append(self.storage(pid[1], pid[2], pid[3], pid[4]))
            elif op == 0x52:  # REDUCE: OrderedDict(), or a tensor's rebuild call (the first of a file)
                args, fn = stack.pop(), stack.pop()
                if len(stack) < (marks[-1] if marks else 0) or type(args) is not tuple:
                    raise _Refused
                if fn is _ORDERED_DICT and not args:
                    stack.append(collections.OrderedDict())
                elif fn is _REBUILD_V2 and len(args) == 6 and type(args[0]) is Storage:
                    stack.append(self.rebuild(*args))
                else:
                    raise _Refused
            elif op == 0x4B:  # BININT1
                stack.append(data[pos])
                pos += 1
            elif op == 0x4D:  # BININT2
                stack.append(int.from_bytes(data[pos : pos + 2], "little"))
                pos += 2
            elif op == 0x4A:  # BININT
                stack.append(int.from_bytes(data[pos : pos + 4], "little", signed=True))
                pos += 4
            elif op == 0x88 or op == 0x89:  # NEWTRUE, NEWFALSE
                stack.append(op == 0x88)
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x2E:  # STOP
                if pos != end or len(stack) != 1 or marks:
                    raise _Refused
                payload = stack[0]
                _check_nesting(payload)
                return payload
            else:
                raise _Refused
        raise _Refused

    def tiles(self, pos: int, stack: list[Any]) -> int | None:
        """Decode the run of keys and tensors (:data:`_TILE` units) from the key at ``pos``: each
        pushed on ``stack`` and put in the memo as :meth:`tensor` does. The position after the last
        unit decoded, or None when none is (the opcode-by-opcode read then reads on, as it would).
        The C decode, where built, takes the longest run that decodes, unit by unit, in one call."""
        if _tiles is not None:
            return _tiles.scan(self.data, pos, _MAX_TILE_KEY, self.memo, stack, self.mine, self.storages,
                               self.tile_gets_known, self.tile_layouts, self.tile_gets, self.tile_layout,
                               _STORAGE_MAKER, _TENSOR_MAKER)
        scan = iter(_TILE.scanner(self.data, pos).match, None)  # type: ignore[attr-defined]
        want = _FIRST_TILES
        done = pos
        while True:
            units = list(islice(scan, want))
            decoded = self.decode_tiles(units) if units else None
            taken = len(units)
            if decoded is None and units:  # the longest run that decodes (bisected): the read goes on after it
                lo, hi = 0, len(units)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self.decode_tiles(units[:mid]) is not None:
                        lo = mid
                    else:
                        hi = mid
                taken = lo
                decoded = self.decode_tiles(units[:lo]) if lo else None
            if decoded is not None:
                keys, storage_keys, storages, refs = decoded
                self.mine.update(zip(storage_keys, storages, strict=True))
                nothing = repeat(None)
                self.memo.extend(chain.from_iterable(
                    zip(keys, storage_keys, nothing, nothing, nothing, nothing, nothing, refs, strict=False)))
                stack.extend(chain.from_iterable(zip(keys, refs, strict=True)))
                done = units[taken - 1].end()
            if taken < want:
                return done if done != pos else None
            want = min(4 * want, _MAX_TILES)

    def decode_tiles(self, units: list[re.Match[bytes]]) -> tuple[list[str], list[str], list[Storage],
                                                                 list[TensorRef]] | None:
        """(keys, storage keys, storages, tensors) of ``units``, consecutive :data:`_TILE` matches,
        each what :meth:`tensor` gives for the unit's key and tensor (the memo taken as it stands
        before the first); None unless every unit is read so: a key whose length is not what its
        opcode says, puts that are not the next indices, gets of anything else, a storage key met
        before, a layout the rebuild call does not accept plainly."""
        cols = list(zip(*map(re.Match.groups, units), strict=True))
        count = len(units)
        n = len(self.memo)
        key_lengths, indices = array("I", map(len, cols[_KEY])), array("I", range(n, n + 8 * count))
        if sys.byteorder != "little":
            key_lengths.byteswap()
            indices.byteswap()
        if (b"".join(cols[_KEY_LEN]) != key_lengths.tobytes()
                or bytes(map(len, cols[_SKEY])) != b"".join(cols[_SKEY_LEN])
                or b"".join(chain.from_iterable(zip(*(cols[i] for i in _PUTS), strict=True))) != indices.tobytes()):
            return None
        gets = list(zip(*(cols[i] for i in _GETS), strict=True))
        known = self.known
        for g in set(gets).difference(known):
            if not self.gets_before(g, n):
                return None
        storage_types = list(map(known.__getitem__, gets))  # (storage type, location)
        dtypes = [t.dtype for t, _loc in storage_types]
        locations = [loc for _t, loc in storage_types]
        ints = self.ints
        for op in set(cols[_NUMEL]).difference(ints):
            ints[op] = _int(op)
        counts = list(map(ints.__getitem__, cols[_NUMEL]))
        storage_keys = list(map(bytes.decode, cols[_SKEY]))
        if (min(counts) < 0 or len(set(storage_keys)) != count or not self.mine.keys().isdisjoint(storage_keys)
                or not self.storages.keys().isdisjoint(storage_keys)):
            return None
        try:
            keys = list(map(bytes.decode, cols[_KEY], repeat("utf-8"), repeat("surrogatepass")))
        except UnicodeDecodeError:
            return None
        nbytes = list(map(mul, counts, map(ITEMSIZE.__getitem__, dtypes)))
        storages = list(map(Storage, storage_keys, dtypes, locations, nbytes))
        grads = list(map(eq, cols[_GRAD], repeat(b"\x88")))
        layouts = list(zip(cols[_OFFSET], cols[_SHAPE], cols[_STRIDE], dtypes, nbytes, strict=True))
        accepted = self.layouts
        for layout in set(layouts).difference(accepted):
            i = layouts.index(layout)
            if not self.accepts(layout, storages[i], grads[i]):
                return None
        starts, shapes, strides = zip(*map(accepted.__getitem__, layouts), strict=True)
        refs = list(map(TensorRef, storages, starts, shapes, strides, dtypes, grads))
        return keys, storage_keys, storages, refs

    def tile_gets(self, gets: bytes, n: int) -> tuple[str, int, str] | None:
        """For the C decode: (dtype, item size, location) of a unit's five gets (their opcodes one
        after the other), as :meth:`check_gets` accepts them before memo index ``n``; None when it
        refuses them."""
        ops = []
        at = 0
        while at < len(gets):
            width = 2 if gets[at] == 0x68 else 5
            ops.append(gets[at : at + width])
            at += width
        key = tuple(ops)
        if key not in self.known and not self.gets_before(key, n):
            return None
        stype, location = self.known[key]
        return stype.dtype, ITEMSIZE[stype.dtype], location

    def tile_layout(self, offset: bytes, shape: bytes, stride: bytes, storage: Storage,
                    grad: bool) -> tuple[int, tuple[int, ...], tuple[int, ...]] | None:
        """For the C decode: the (offset, shape, stride) of a tensor of ``storage`` the rebuild call
        builds plainly from these opcodes (:meth:`accepts`), None when it does not."""
        layout = (offset, shape, stride, storage.dtype, storage.nbytes)
        if layout in self.layouts or self.accepts(layout, storage, grad):
            return self.layouts[layout]
        return None

    def gets_before(self, gets: tuple[bytes, ...], n: int) -> bool:
        """:meth:`check_gets` (its verdict remembered when it accepts), False for a refusal."""
        try:
            self.check_gets(gets, n)
        except _Refused:
            return False
        return True

    def accepts(self, layout: tuple[bytes, bytes, bytes, str, int], storage: Storage, grad: bool) -> bool:
        """Whether the rebuild call builds a plain TensorRef of ``layout`` (offset, shape and stride
        opcodes, storage dtype and bytes), remembered in :attr:`layouts` as :meth:`tensor` does."""
        offset, shape, stride, dtype, _nbytes = layout
        start, size, strides = self.layout_args(offset, shape, stride)
        try:
            ref = self.rebuild(storage, start, size, strides, grad, self.hooks)
        except Exception:  # noqa: BLE001 - the opcode-by-opcode read makes the same call and decides
            return False
        if (type(ref) is TensorRef and not ref.extra and ref.storage is storage and ref.dtype == dtype
                and (ref.storage_offset, ref.shape, ref.stride) == (start, size, strides)
                and ref.requires_grad is grad and not ref.neg and not ref.conj):
            self.layouts[layout] = start, size, strides
            return True
        return False

    def tensor(self, m: re.Match[bytes], key: Any) -> TensorRef:
        """The tensor matched after ``key``'s BINUNICODE, as torch pickles all but the first of a state
        dict (the storage key a new string, the location a get, every object put): its puts checked
        in one comparison, its gets once per distinct bytes; any other form by :meth:`tensor_parts`."""
        (key_put, fn, storage_get, stype, skey_len, skey, skey_put, skey_get, loc_get, loc_len, loc, loc_put,
         numel, pid_put, offset, shape, shape_put, stride, stride_put, grad, hooks_get, hooks_put, args_put,
         tensor_put) = m.groups()
        puts = (key_put, skey_put, pid_put, shape_put, stride_put, hooks_put, args_put, tensor_put)
        if skey is None or storage_get is None or loc_get is None or None in puts:
            return self.tensor_parts(m, key)
        memo = self.memo
        n = len(memo)
        joined = b"".join(puts)
        if not (joined == _EIGHT.pack(n, n + 1, n + 2, n + 3, n + 4, n + 5, n + 6, n + 7) if len(joined) == 32
                else joined == bytes(range(n, n + 8)) if len(joined) == 8 and n + 8 <= 256 else False):
            return self.tensor_parts(m, key)
        if len(skey) != skey_len[0]:
            raise _Refused
        gets = (fn, storage_get, stype, loc_get, hooks_get)
        known = self.known.get(gets)
        if known is None:
            known = self.check_gets(gets, n)
        storage_type, location = known
        storage_key = skey.decode("ascii")
        ints = self.ints
        count = ints.get(numel)
        if count is None:
            count = ints[numel] = _int(numel)
        if count < 0:
            raise _Refused
        storage = self.mine.get(storage_key)
        if storage is None:
            storage = self.storages.get(storage_key)
            if storage is None:  # what persistent_load makes (the storage type's dtype is checked)
                dtype = storage_type.dtype
                storage = self.mine[storage_key] = Storage(storage_key, dtype, location, count * ITEMSIZE[dtype])
        # the rebuild call's checks depend on these alone: once they passed, the same TensorRef is built
        layout = (offset, shape, stride, storage.dtype, storage.nbytes)
        args = self.layouts.get(layout)
        if args is not None:
            ref = TensorRef(storage, args[0], args[1], args[2], layout[3], grad == b"\x88")
        else:
            start, size, strides = self.layout_args(offset, shape, stride)
            ref = self.rebuild(storage, start, size, strides, grad == b"\x88", self.hooks)
            if (type(ref) is TensorRef and not ref.extra and ref.storage is storage and ref.dtype == layout[3]
                    and (ref.storage_offset, ref.shape, ref.stride) == (start, size, strides)
                    and not ref.neg and not ref.conj):
                self.layouts[layout] = start, size, strides
        memo += (key, storage_key, None, None, None, None, None, ref)
        return ref

    def check_gets(self, gets: tuple[bytes, ...], n: int) -> tuple[Any, str]:
        """(storage type, location) of a tensor's gets of its rebuild function, "storage", storage
        type, location and OrderedDict, each of an entry put before the tensor (the first ``n``)."""
        fn, storage_get, stype, loc_get, hooks_get = (self.memo[i] if i < n else None
                                                      for i in (int.from_bytes(g[1:], "little") for g in gets))
        if (fn is not _REBUILD_V2 or storage_get != "storage" or type(stype) is not _Global or stype.dtype is None
                or type(loc_get) is not str or hooks_get is not _ORDERED_DICT):
            raise _Refused
        self.known[gets] = stype, loc_get
        return stype, loc_get

    def tensor_parts(self, m: re.Match[bytes], key: Any) -> TensorRef:
        """:meth:`tensor` for any form the pattern matches, part by part."""
        (key_put, fn, storage_get, stype, skey_len, skey, skey_put, skey_get, loc_get, loc_len, loc, loc_put,
         numel, pid_put, offset, shape, shape_put, stride, stride_put, grad, hooks_get, hooks_put, args_put,
         tensor_put) = m.groups()
        memo = self.memo
        ifb = int.from_bytes
        if key_put is not None:
            if ifb(key_put, "little") != len(memo):
                raise _Refused
            memo.append(key)
        got = self.got
        resolved = got.get(fn) or self.get(fn)
        if resolved is not _REBUILD_V2:
            raise _Refused
        if storage_get is not None and (got.get(storage_get) or self.get(storage_get)) != "storage":
            raise _Refused
        storage_type = got.get(stype) or self.get(stype)
        if skey is not None:
            if len(skey) != skey_len[0]:
                raise _Refused
            storage_key = skey.decode("ascii")
            if skey_put is not None:
                if ifb(skey_put, "little") != len(memo):
                    raise _Refused
                memo.append(storage_key)
        else:
            storage_key = got.get(skey_get) or self.get(skey_get)
            if type(storage_key) is not str:
                raise _Refused
        if loc is not None:
            if len(loc) != loc_len[0]:
                raise _Refused
            location = loc.decode("ascii")
            if loc_put is not None:
                if ifb(loc_put, "little") != len(memo):
                    raise _Refused
                memo.append(location)
        else:
            location = got.get(loc_get) or self.get(loc_get)
        ints = self.ints
        count = ints.get(numel)
        if count is None:
            count = ints[numel] = _int(numel)
        storage = self.mine.get(storage_key)
        if storage is None:
            storage = self.storage(storage_type, storage_key, location, count)
        elif (type(storage_type) is not _Global or storage_type.dtype is None or type(location) is not str
              or count < 0):
            raise _Refused
        n = len(memo)
        for op in (pid_put, shape_put, stride_put):
            if op is not None:
                if ifb(op, "little") != n:
                    raise _Refused
                n += 1
        if (got.get(hooks_get) or self.get(hooks_get)) is not _ORDERED_DICT:
            raise _Refused
        for op in (hooks_put, args_put):
            if op is not None:
                if ifb(op, "little") != n:
                    raise _Refused
                n += 1
        memo += [None] * (n - len(memo))
        start, size, strides = self.layout_args(offset, shape, stride)
        ref = self.rebuild(storage, start, size, strides, grad == b"\x88", self.hooks)
        if tensor_put is not None:
            if ifb(tensor_put, "little") != n:
                raise _Refused
            memo.append(ref)
        return ref

    def layout_args(self, offset: bytes, shape: bytes, stride: bytes) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """The storage offset, size and stride a rebuild call's opcodes give, each decoded once per
        distinct bytes."""
        tuples, ints = self.tuples, self.ints
        size = tuples.get(shape)
        if size is None:
            size = tuples[shape] = _tuple(shape)
        strides = tuples.get(stride)
        if strides is None:
            strides = tuples[stride] = _tuple(stride)
        start = ints.get(offset)
        if start is None:
            start = ints[offset] = _int(offset)
        return start, size, strides

    def get(self, op: bytes) -> Any:
        """The memo entry a get opcode fetches (remembered by its bytes); refused for one no get may fetch."""
        got = self.memo[int.from_bytes(op[1:], "little")]
        if not got:  # a false entry is not remembered (``or`` would miss it): looked up each time
            if got is None:
                raise _Refused
            return got
        self.got[op] = got
        return got


#: The types a key may have (a tuple key would need the general path's hashing rules).
_KEY_TYPES = frozenset((str, int))


def _check_nesting(payload: Any) -> None:
    """Containers nest at most :data:`MAX_NESTING` deep (none is shared: no get fetches one), and
    hold only what the decode makes (no global)."""
    level = [payload]
    for _ in range(MAX_NESTING):
        inner: list[Any] = []
        for obj in level:
            t = type(obj)
            if t is dict or t is collections.OrderedDict:
                if not _LEAVES.issuperset(map(type, obj.values())):  # a state dict's: no loop in Python
                    inner.extend(v for v in obj.values() if type(v) is not TensorRef and type(v) not in _PLAIN)
                attributes = getattr(obj, "__dict__", None)
                if attributes:
                    inner.extend(attributes.values())
            elif t is list or t is tuple:
                inner.extend(v for v in obj if type(v) is not TensorRef and type(v) not in _PLAIN)
            elif t is not TensorRef and t not in _PLAIN:
                raise _Refused
        if not inner:
            return
        level = inner
    raise _Refused
