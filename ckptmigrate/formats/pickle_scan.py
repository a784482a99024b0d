"""What the C unpickler must not be handed: one pass over a pickle's opcodes, before any of them runs.

The unpickler in C trusts some of what a pickle says in ways a hostile file can turn against the
process (a stack overflow, a 32 GiB allocation); :func:`scan` finds those without running
anything, and a pickle it cannot follow is malformed anyway.
"""

from __future__ import annotations

import pickletools
import re
from typing import Any


class PickleFormatError(ValueError):
    """The pickle is malformed or not one torch writes."""


#: How deeply a payload's containers may nest, counted as the code that walks payloads counts (a
#: stand-in object two levels, its arguments and state one more): deeper pickles are refused when
#: read, not half-way through a rewrite. A pickled model nests about four levels per submodule.
MAX_DEPTH = 100
#: How many more visits than it has slots a walk of the payload may make because objects are shared
#: (``a = [x] * 10; b = [a] * 10; ...`` is small but visits 10**n leaves). The scan applies it to
#: tuples before the unpickler runs: hashing a tuple (a dict key, a set member) visits every element
#: of every tuple inside it, shared or not, and is not cached, so 90 levels of ``t = (t, t)`` in
#: 642 bytes would hash 2**90 times.
MAX_SHARED_VISITS = 1_000_000


# How the scan below steps over each opcode: (what it does to the stack, how its argument is
# stored, width, pops below a mark, pushes). Built from pickletools' description of the protocol.
# ``no mutate``: it runs once at import, before mutmut switches a mutant on, so no test could kill
# one (README, Mutation testing).
_PLAIN, _PUSH, _NOOP, _MARK, _POP, _PUT, _MEMOIZE, _GET, _TUPLE, _EMPTY_TUPLE, _DUP, _STOP = range(12)
_FIXED, _COUNTED, _SIGNED_COUNTED, _LINES = range(4)


def _opcode_table() -> list[tuple[int, int, int, bool, int, int] | None]:  # pragma: no mutate block
    special = {
        "MARK": _MARK, "POP": _POP, "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "MEMOIZE": _MEMOIZE,
        "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET, "TUPLE": _TUPLE, "TUPLE1": _TUPLE,
        "TUPLE2": _TUPLE, "TUPLE3": _TUPLE, "EMPTY_TUPLE": _EMPTY_TUPLE, "DUP": _DUP, "STOP": _STOP,
    }
    counted = {pickletools.TAKEN_FROM_ARGUMENT1: (_COUNTED, 1), pickletools.TAKEN_FROM_ARGUMENT4: (_SIGNED_COUNTED, 4),
               pickletools.TAKEN_FROM_ARGUMENT4U: (_COUNTED, 4), pickletools.TAKEN_FROM_ARGUMENT8U: (_COUNTED, 8)}
    table: list[tuple[int, int, int, bool, int, int] | None] = [None] * 256
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            kind, width = _FIXED, 0
        elif arg.n >= 0:
            kind, width = _FIXED, arg.n
        elif arg.n == pickletools.UP_TO_NEWLINE:
            kind, width = _LINES, 2 if op.name in ("GLOBAL", "INST") else 1
        else:
            kind, width = counted[arg.n]
        before = op.stack_before
        marked = pickletools.markobject in before
        pops = before.index(pickletools.markobject) if marked else len(before)
        action = special.get(op.name, _PLAIN)
        if action == _PLAIN and not marked and not pops and len(op.stack_after) <= 1:
            action = _PUSH if op.stack_after else _NOOP
        table[ord(op.code)] = (action, kind, width, marked, pops, len(op.stack_after))
    return table


_OPCODES = _opcode_table()
_DEPTH_SHIFT = 96
_SIZE_MASK = (1 << _DEPTH_SHIFT) - 1
_PLAIN_SLOT = 1  # a stack slot that is not a tuple: one element to hash, no tuple depth


def _tuple_slot(depth: int, size: int, ops: int) -> int:
    """The packed slot of a new tuple; refuses one nested too deeply or too costly to hash."""
    if depth > MAX_DEPTH:
        raise PickleFormatError(f"the pickle nests tuples more than {MAX_DEPTH} deep")
    if size > MAX_SHARED_VISITS + ops:
        raise PickleFormatError(
            f"the pickle shares tuples so often that hashing one would visit over {size:,} elements"
        )
    return depth << _DEPTH_SHIFT | size


# One tensor of a state dict as torch (and ckptmigrate's writer) pickles it, after its key (a
# BINUNICODE): ``_rebuild_tensor_v2((storage pid), offset, shape, stride, requires_grad,
# OrderedDict())`` with memo puts after the objects (optional: ckptmigrate's writer puts fewer) and
# memo gets for what repeats. Each part is one opcode with its argument, as the scan steps over it;
# the lengths of the two strings in it are checked after the match.
_RE_INT = rb"(?:K.|M..|J....)"
_RE_PUT = rb"(q.|r....)?"
_RE_GET = rb"(h.|j....)"
_RE_TUPLE_OF_INTS = (
    rb"(\)|" + _RE_INT + rb"\x85|" + _RE_INT * 2 + rb"\x86|" + _RE_INT * 3 + rb"\x87|\((?:" + _RE_INT + rb")*t)"
)
_TENSOR = re.compile(
    _RE_PUT + _RE_GET + rb"\(\((?:" + _RE_GET + rb"|X\x07\x00\x00\x00storage)" + _RE_GET
    + rb"X([\x01-\x7f])\x00\x00\x00([0-9]+)" + _RE_PUT
    + rb"(?:" + _RE_GET + rb"|X([\x01-\x7f])\x00\x00\x00([a-z0-9:]+))"
    + _RE_INT + rb"t" + _RE_PUT + rb"Q" + _RE_INT + _RE_TUPLE_OF_INTS + _RE_PUT + _RE_TUPLE_OF_INTS + _RE_PUT
    + rb"[\x88\x89]" + _RE_GET + rb"\)R" + _RE_PUT + rb"t" + _RE_PUT + rb"R" + _RE_PUT,
    re.DOTALL,
)
_INT_WIDTH = {0x4B: 2, 0x4D: 3, 0x4A: 5}
#: Opcodes of a matched tensor besides its memo puts and the opcodes of its shape and stride.
_TENSOR_OPS = 18
_PID_SLOT = 1 << _DEPTH_SHIFT | 6  # ("storage", type, key, location, numel)


def _tuple_of_ints(op: bytes) -> tuple[int, int]:
    """(elements, opcodes) of a tuple of ints the tensor pattern matched."""
    last = op[-1]
    if 0x85 <= last <= 0x87:  # TUPLE1..3
        return last - 0x84, last - 0x83
    if op == b")":
        return 0, 1
    n, at = 0, 1
    while at < len(op) - 1:
        at += _INT_WIDTH[op[at]]
        n += 1
    return n, n + 2


def _tensor(match: re.Match[bytes], memo: dict[int, int], ops: int) -> tuple[int, int] | None:
    """What stepping over a tensor's opcodes one by one does, at once: (opcodes, size of its largest
    tuple) with its memo puts stored, when every memo get in it fetches a plain value stored before it
    and every put is within the opcodes read; None (nothing stored) otherwise."""
    (key_put, fn, storage, storage_type, key_len, key, pid_key_put, location, location_len, location_text,
     pid_put, shape, shape_put, stride, stride_put, hooks_type, hooks_put, args_put, tensor_put) = match.groups()
    if len(key) != key_len[0] or (location_len is not None and len(location_text) != location_len[0]):
        return None
    index = int.from_bytes
    gets = {index(fn[1:], "little"), index(storage_type[1:], "little"), index(hooks_type[1:], "little")}
    if storage is not None:
        gets.add(index(storage[1:], "little"))
    if location is not None:
        gets.add(index(location[1:], "little"))
    get = memo.get
    for i in gets:
        if get(i) != _PLAIN_SLOT:
            return None
    dims, shape_ops = _tuple_of_ints(shape)
    dims2, stride_ops = _tuple_of_ints(stride)
    size = 7 + dims + dims2
    puts: dict[int, int] = {}
    count = 0
    for op, slot in ((key_put, _PLAIN_SLOT), (pid_key_put, _PLAIN_SLOT), (pid_put, _PID_SLOT),
                     (shape_put, 1 << _DEPTH_SHIFT | 1 + dims), (stride_put, 1 << _DEPTH_SHIFT | 1 + dims2),
                     (hooks_put, _PLAIN_SLOT), (args_put, 2 << _DEPTH_SHIFT | size), (tensor_put, _PLAIN_SLOT)):
        if op is not None:
            puts[index(op[1:], "little")] = slot
            count += 1
    # an index put twice (their order would matter), one a get in it reads, or past the opcodes read
    if len(puts) != count or max(puts, default=0) > ops + 2 or not gets.isdisjoint(puts):
        return None
    memo.update(puts)
    return _TENSOR_OPS + count + shape_ops + stride_ops, size


def scan(data: Any, pos: int = 0, *, whole_tensors: bool = True) -> None:
    """Step through the opcodes from ``pos`` without running them, and refuse what would hurt the C
    unpickler before it acts on it:

    * tuples nested deeper than MAX_DEPTH: hashing a tuple (a dict key, a set member) recurses in
      C without a depth check, about 60 bytes of stack a level, so 150,000 nested 1-tuples
      overflow an 8 MiB stack and crash the interpreter;
    * a memo index far past the entries stored so far: the unpickler grows its memo array to twice
      the index, so ``LONG_BINPUT 2**31`` asks for 32 GiB, and zeroes it;
    * tuples that share tuples so often that hashing one visits more than MAX_SHARED_VISITS
      elements beyond the pickle's own size (tuple hashes are not cached);
    * an argument longer than the bytes left: the unpickler allocates it before finding them missing.

    A tensor of a state dict pickled as torch pickles it is stepped over at once (``whole_tensors``;
    the tests compare it with the opcode-by-opcode reading, which gives the same verdict).

    Only each stack slot's tuple depth and hash size are followed; a pickle this cannot follow is malformed, and
    the unpickler refuses it no later than where the scan stopped.
    """
    # per stack slot and memo entry, packed in one int so that the hot path appends ints and a
    # tuple's are two builtin calls: tuple depth << 96 | elements a hash of it visits (a pickle has
    # under 2**48 opcodes of at most 2**48 each, so a sum of slots never carries into the depth);
    # a non-tuple is 0 | 1
    stack: list[int] = []
    marks: list[int] = []
    memo: dict[int, int] = {}
    worst = _PLAIN_SLOT  # what an unknown slot may hold: the deepest and the largest tuple seen
    plain = _PLAIN_SLOT
    end = len(data)
    table = _OPCODES
    tensor = _TENSOR.match if whole_tensors else None
    ops = 0
    try:
        while pos < end:
            op = data[pos]
            # the opcodes a torch pickle is mostly made of, stepped over inline (same checks as below)
            if op == 0x72 and pos + 5 <= end:  # LONG_BINPUT
                ops += 1
                index = int.from_bytes(data[pos + 1 : pos + 5], "little")
                if index > ops:
                    raise PickleFormatError(f"the pickle stores memo entry {index:,} after {ops:,} opcodes")
                memo[index] = stack[-1] if stack else worst
                pos += 5
                continue
            if op == 0x71 and pos + 2 <= end:  # BINPUT
                ops += 1
                index = data[pos + 1]
                if index > ops:
                    raise PickleFormatError(f"the pickle stores memo entry {index:,} after {ops:,} opcodes")
                memo[index] = stack[-1] if stack else worst
                pos += 2
                continue
            if op == 0x68 and pos + 2 <= end:  # BINGET
                ops += 1
                stack.append(memo.get(data[pos + 1], worst))
                pos += 2
                continue
            if op == 0x58 and pos + 5 <= end:  # BINUNICODE
                pos += 5 + int.from_bytes(data[pos + 1 : pos + 5], "little")
                # a state dict's key: the tensor after it at once, when it is pickled as torch does
                match = tensor(data, pos) if tensor is not None and pos < end else None
                done = None if match is None else _tensor(match, memo, ops)
                if done is not None:
                    ops += done[0]
                    stack += (plain, plain)
                    if done[1] > worst & _SIZE_MASK or worst >> _DEPTH_SHIFT < 2:
                        worst = max(worst >> _DEPTH_SHIFT, 2) << _DEPTH_SHIFT | max(worst & _SIZE_MASK, done[1])
                    pos = match.end()  # type: ignore[union-attr]
                    continue
                ops += 1
                if pos > end:
                    length = pos - end  # how far past the end it runs
                    raise PickleFormatError(f"the pickle is truncated: an argument runs {length:,} bytes past it")
                stack.append(plain)
                continue
            if op == 0x4B and pos + 2 <= end:  # BININT1
                ops += 1
                stack.append(plain)
                pos += 2
                continue
            if op == 0x28:  # MARK
                ops += 1
                marks.append(len(stack))
                pos += 1
                continue
            if op == 0x85 or op == 0x74:  # TUPLE1, TUPLE
                ops += 1
                pos += 1
                if op == 0x85:
                    item = stack.pop() if stack else plain
                    depth, size = 1 + (item >> _DEPTH_SHIFT), 1 + (item & _SIZE_MASK)
                else:
                    start = marks.pop() if marks else 0
                    items = stack[start:]
                    del stack[start:]
                    depth = 1 + (max(items, default=0) >> _DEPTH_SHIFT)
                    size = 1 + (sum(items) & _SIZE_MASK)
                stack.append(_tuple_slot(depth, size, ops))
                if depth > worst >> _DEPTH_SHIFT or size > worst & _SIZE_MASK:
                    worst = max(worst >> _DEPTH_SHIFT, depth) << _DEPTH_SHIFT | max(worst & _SIZE_MASK, size)
                continue
            if op == 0x52:  # REDUCE
                ops += 1
                pos += 1
                del stack[-2:]
                stack.append(plain)
                continue
            entry = table[op]
            if entry is None:
                return
            action, kind, width, marked, pops, pushes = entry
            ops += 1
            pos += 1
            arg = pos
            if kind == _FIXED:
                pos += width
            elif kind == _LINES:
                for _ in range(width):
                    pos = data.find(b"\n", pos) + 1
                    if pos == 0:
                        return
            else:
                length = int.from_bytes(data[pos : pos + width], "little", signed=kind == _SIGNED_COUNTED)
                if length < 0:
                    return
                pos += width + length
                if pos > end:
                    raise PickleFormatError(f"the pickle is truncated: an argument of {length:,} bytes runs past it")
            if pos > end:
                return
            if action == _PUSH:
                stack.append(plain)
            elif action == _PUT:
                index = int(data[arg : pos - 1]) if kind == _LINES else int.from_bytes(data[arg:pos], "little")
                if not 0 <= index <= ops:
                    raise PickleFormatError(f"the pickle stores memo entry {index:,} after {ops:,} opcodes")
                memo[index] = stack[-1] if stack else worst
            elif action == _GET:
                index = int(data[arg : pos - 1]) if kind == _LINES else int.from_bytes(data[arg:pos], "little")
                stack.append(memo.get(index, worst))
            elif action == _PLAIN:
                if marked:
                    del stack[marks.pop() if marks else 0 :]
                if pops:
                    del stack[-pops:]
                stack += [plain] * pushes
            elif action == _TUPLE:
                if marked:
                    start = marks.pop() if marks else 0
                    items = stack[start:]
                    del stack[start:]
                else:
                    items = stack[-pops:]
                    del stack[-pops:]
                depth = 1 + (max(items, default=0) >> _DEPTH_SHIFT)
                size = 1 + (sum(items) & _SIZE_MASK)
                stack.append(_tuple_slot(depth, size, ops))
                worst = max(worst >> _DEPTH_SHIFT, depth) << _DEPTH_SHIFT | max(worst & _SIZE_MASK, size)
            elif action == _MARK:
                marks.append(len(stack))
            elif action == _MEMOIZE:
                memo[len(memo)] = stack[-1] if stack else worst
            elif action == _POP:
                if marks and marks[-1] == len(stack):
                    marks.pop()
                elif stack:
                    stack.pop()
            elif action == _EMPTY_TUPLE:
                stack.append(1 << _DEPTH_SHIFT | 1)
            elif action == _DUP:
                stack.append(stack[-1] if stack else plain)
            elif action == _STOP:
                return
    except PickleFormatError:
        raise
    except (ValueError, IndexError):  # a malformed argument; the unpickler says how
        return
