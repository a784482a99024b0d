"""The operations vocabulary a migration script calls on the checkpoint it receives.

Every op edits the lazy state dict: renames move references (no tensor bytes), tensor ops leave a
:class:`~ckptmigrate.tensors.refs.Deferred` whose values are computed when the file is written. Each op
records its exact inverse (the old shape, dtype or key names it saw) so a chain of invertible ops
can be walked back without a hand-written ``downgrade``. Selection patterns (``drop``, ``cast``,
``split``, ...) are regular expressions matched against the whole key; ``rename_regex`` follows
``re.sub`` (searched, anchor with ``^``), like transformers' ``key_mapping``. Replacement templates may
use back-references (``\\1``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from functools import partial
from operator import itemgetter, methodcaller, ne
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ckptmigrate.errors import BadInput
from ckptmigrate.ops import tensor_values as values
from ckptmigrate.ops.optimizer import OptimizerTrack
from ckptmigrate.ops.pickle_globals import PickleOps
from ckptmigrate.tensors.refs import (
    Deferred,
    Entry,
    TensorRef,
    contiguous_stride,
    dtype_of,
    is_entry,
    shape_of,
    to_torch,
)

if TYPE_CHECKING:
    import torch

    from ckptmigrate.tensors.state_dict import LazyStateDict

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
Inverse = list[Any]
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}
#: The ops an inverse journal may name (it is read back from the file's envelope).
INVERSE_OPS = frozenset({"rename_map", "drop", "reshape", "transpose", "permute", "cast", "truncate", "split", "merge",
                         "rename_global"})


class OpError(BadInput, ValueError):
    """An op could not apply; ``op`` and ``key`` (or the pattern) say which and where."""

    def __init__(self, op: str, key: str | None, message: str) -> None:
        super().__init__(message)
        self.op = op
        self.key = key

    def fields(self) -> dict[str, Any]:
        return {"op": self.op, "key": self.key}


class RegisteredOp(Protocol):
    """An op a project registered (:class:`~ckptmigrate.ops.registry.CustomOp`)."""

    def run(self, target: Operations, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None: ...


def _fullmatch(pattern: str, key: str) -> re.Match[str] | None:
    return re.fullmatch(pattern, key)


class Operations(PickleOps):
    """Mixin for :class:`~ckptmigrate.checkpoint.lazy.Checkpoint`: the ops and their inverse journal."""

    #: The op names an inverse journal may call (subclasses that add ops extend it).
    inverse_ops: ClassVar[frozenset[str]] = INVERSE_OPS
    #: The ops a project registered in this process (:mod:`ckptmigrate.ops.registry`), by name; a
    #: journal may name them too.
    custom_ops: ClassVar[dict[str, RegisteredOp]] = {}

    state_dict: LazyStateDict
    extras: dict[str, Any]

    def __init__(self) -> None:
        self.journal: list[Inverse] = []
        self.irreversible: list[str] = []
        self.touched: list[tuple[str, list[str]]] = []
        self.optimizers = OptimizerTrack.find(self.extras, list(self.state_dict.entries))

    # -- helpers ---------------------------------------------------------------------------

    @property
    def _entries(self) -> MutableMapping[str, Any]:
        return self.state_dict.entries

    def _record(self, op: str, keys: Iterable[str], inverse: Inverse | None) -> None:
        self.optimizers.finalize(list(self._entries))  # the extras stay in step with the weights
        self.touched.append((op, list(keys)))
        if inverse is None:
            self.irreversible.append(op)
            self.journal.append(["irreversible", {"op": op}])
        else:
            self.journal.append(inverse)

    def _closest(self, op: str, pattern: str, how: str = "matches no key") -> OpError:
        keys = [k for k in self._entries if isinstance(k, str)]
        close = difflib.get_close_matches(pattern, keys, n=3, cutoff=0.4)
        hint = f"; closest keys: {', '.join(close)}" if close else f"; the checkpoint has {len(keys)} keys"
        return OpError(op, pattern, f"{op}: {pattern!r} {how}{hint}")

    def _match(self, op: str, pattern: str, missing_ok: bool) -> list[tuple[str, re.Match[str] | None]]:
        if pattern in self._entries:
            return [(pattern, None)]
        try:
            found: list[tuple[str, re.Match[str] | None]] = [
                (k, m) for k in self._entries if (m := _fullmatch(pattern, k))
            ]
        except re.error as exc:
            raise OpError(op, pattern, f"{op}: {pattern!r} is not a valid pattern ({exc})") from None
        if not found and not missing_ok:
            raise self._closest(op, pattern, "matches no key (a pattern must match the whole key, as re.fullmatch)")
        return found

    def _op_error(self, op: str, key: str | None, message: str) -> OpError:
        return OpError(op, key, message)

    def _tensor(self, op: str, key: str) -> Entry:
        value = self._entries[key]
        if not is_entry(value):
            raise OpError(op, key, f"{op}: {key!r} is not a tensor")
        return value

    def _replace(self, key: str, value: Entry) -> None:
        self._entries[key] = value

    # -- names -----------------------------------------------------------------------------

    def rename_map(self, mapping: Mapping[str, str], *, _op: str = "rename",
                   metadata: Mapping[str, Any] | None = None) -> None:
        """Rename keys by an explicit ``{old: new}`` map, in one step, keeping their order.

        The state dict's ``_metadata`` (each module's version) follows: a module whose tensors all
        moved to another prefix moves with them (``metadata`` replays a recorded move exactly).
        """
        entries = self._entries
        if not mapping.keys() <= entries.keys():  # the first key missing, in the map's order, is named
            raise self._closest(_op, next(k for k in mapping if k not in entries))
        new_keys = list(map(mapping.get, entries, entries))  # C loops: a rename of 100,000 keys costs per key
        if len(set(new_keys)) != len(new_keys):  # a collision: found in order, to name it
            seen: set[str] = set()
            for old, new in zip(entries, new_keys, strict=True):
                if new in seen:
                    raise OpError(_op, old, f"{_op}: {old!r} -> {new!r} collides with another key named {new!r}")
                seen.add(new)
        meta_inverse = self._move_metadata(list(entries), mapping, metadata)
        moved = list(entries.values())
        entries.clear()
        entries.update(zip(new_keys, moved, strict=True))
        self.optimizers.rename(mapping)
        if all(map(ne, mapping.keys(), mapping.values())):
            changed = dict(mapping)
        else:
            changed = {o: n for o, n in mapping.items() if o != n}
        inverse: dict[str, Any] = {"mapping": dict(zip(changed.values(), changed.keys(), strict=True))}
        if meta_inverse is not None:
            inverse["metadata"] = meta_inverse
        self._record(_op, changed, ["rename_map", inverse])

    def rename(self, old: str, new: str, *, missing_ok: bool = False) -> None:
        """Rename one key."""
        if old not in self._entries:
            if missing_ok:
                return
            raise self._closest("rename", old)
        self.rename_map({old: new}, _op="rename")

    def rename_regex(self, pattern: str, repl: str, *, missing_ok: bool = False) -> None:
        """Rename keys as ``re.sub(pattern, repl, key)`` does: the pattern is searched (anchor it with
        ``^``) and the match replaced, like transformers' ``key_mapping`` and hand-written converters."""
        mapping: dict[str, str] = {}
        try:
            regex = re.compile(pattern)
            for k in self._entries:
                new, n = regex.subn(repl, k)
                if n:
                    mapping[k] = new
        except (re.error, IndexError) as exc:
            raise OpError("rename_regex", pattern, f"rename_regex: {pattern!r} is not a valid pattern, "
                          f"or {repl!r} not a valid replacement ({exc})") from None
        if not mapping:
            if missing_ok:
                return
            raise self._closest("rename_regex", pattern,
                                "matches no key (searched in each key, as re.sub does; anchor it with ^)")
        self.rename_map(mapping, _op="rename_regex")  # _metadata follows the keys there, walked back exactly

    def rename_prefix(self, old: str, new: str, *, missing_ok: bool = False, _op: str = "rename_prefix") -> None:
        """Replace the prefix ``old`` with ``new`` on every key that starts with it."""
        keys = list(filter(methodcaller("startswith", old), self._entries))  # C loops: a key at a time adds up
        mapping = dict(zip(keys, map(new.__add__, map(itemgetter(slice(len(old), None)), keys)), strict=True))
        if not mapping:
            if missing_ok:
                return
            raise self._closest(_op, old)
        self.rename_map(mapping, _op=_op)

    def unwrap(self, prefix: str = "module.", *, missing_ok: bool = False) -> None:
        """Strip a wrapper's prefix (DataParallel/DDP ``module.``, torch.compile ``_orig_mod.``, ...)."""
        self.rename_prefix(prefix, "", missing_ok=missing_ok, _op="unwrap")

    def _move_metadata(self, keys: list[str], mapping: Mapping[str, str],
                       recorded: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Move ``_metadata`` entries with the keys; return the exact inverse (None: nothing moved).

        An entry another moves onto (DataParallel's root when ``module`` becomes the root) is kept
        in the inverse with its position, so walking back restores the dict as it was.
        """
        meta = getattr(self._entries, "_metadata", None)
        if not isinstance(meta, dict):
            return None
        moves: dict[str, str]
        if recorded is not None:
            moves = {str(k): str(v) for k, v in (recorded.get("moves") or {}).items()}
            restore: list[Any] = list(recorded.get("restore") or [])
        else:
            moves, restore = _metadata_moves(list(meta), keys, mapping), []
        if not moves and not restore:
            return None
        items = list(meta.items())
        moved_to: set[str] = {moves[k] for k, _ in items if k in moves}
        out: OrderedDict[str, Any] = OrderedDict()
        lost: list[list[Any]] = []
        for i, (k, v) in enumerate(items):
            nk = moves[k] if k in moves else str(k)
            if (k not in moves and nk in moved_to) or nk in out:
                lost.append([i, k, v])
                continue
            out[nk] = v
        if restore:
            rebuilt = list(out.items())
            for i, k, v in sorted(restore, key=lambda r: r[0]):
                rebuilt.insert(i, (k, v))
            out = OrderedDict(rebuilt)
        self._entries._metadata = out  # type: ignore[attr-defined]
        back = {nk: k for k, nk in moves.items() if k in meta and nk in out and nk != k}
        return {"moves": back, "restore": lost}

    # -- adding and removing ---------------------------------------------------------------

    def drop(self, pattern: str, *, missing_ok: bool = False) -> None:
        """Remove every key the pattern matches (irreversible: write a downgrade to bring them back)."""
        keys = [k for k, _ in self._match("drop", pattern, missing_ok)]
        for k in keys:
            del self._entries[k]
        self.optimizers.drop(keys)
        if keys:
            self._record("drop", keys, None)

    def add(self, key: str, tensor_or_factory: Any, *, parameter: bool | None = None) -> None:
        """Add a tensor (or the result of calling a factory) under a new key.

        ``parameter`` says whether it is a parameter the optimizer state must cover (default: a
        tensor that requires grad, or one named ``weight``/``bias``); a buffer never is.
        """
        if key in self._entries:
            raise OpError("add", key, f"add: {key!r} already exists")
        value = tensor_or_factory() if callable(tensor_or_factory) else tensor_or_factory
        if not is_entry(value):
            raise OpError("add", key, f"add: {key!r} must be a tensor, got {type(value).__name__}")
        self._entries[key] = value
        if parameter if parameter is not None else _looks_like_parameter(key, value):
            self.optimizers.add([key])
        self._record("add", [key], ["drop", {"pattern": re.escape(key)}])

    # -- shapes and dtypes -----------------------------------------------------------------

    def _each(self, op: str, pattern: str, missing_ok: bool) -> list[str]:
        return [k for k, _ in self._match(op, pattern, missing_ok)]

    def _transform(
        self, op: str, key: str, shape: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor],
        dtype: str | None = None,
    ) -> None:
        src = self._tensor(op, key)
        src_shape = shape_of(src)
        out_dtype = dtype or dtype_of(src)
        self._replace(key, Deferred(shape, out_dtype, lambda: fn(to_torch(src)).contiguous()))
        self.optimizers.transform([key], [key], src_shape, lambda ts: [fn(ts[0])])

    def reshape(self, key: str, shape: Sequence[int], *, missing_ok: bool = False) -> None:
        """Give tensors a new shape with the same number of elements (free for stored tensors)."""
        for k in self._each("reshape", key, missing_ok):
            src = self._tensor("reshape", k)
            old = shape_of(src)
            new = _resolve_shape("reshape", k, old, shape)
            if isinstance(src, TensorRef) and src.stride == contiguous_stride(old):
                self._replace(k, src.view(src.storage_offset, new, contiguous_stride(new)))
                self.optimizers.transform([k], [k], old, partial(values.reshape_all, shape=new))
            else:
                self._transform("reshape", k, new, partial(values.reshape, shape=new))
            self._record("reshape", [k], ["reshape", {"key": re.escape(k), "shape": list(old)}])

    def transpose(self, key: str, dim0: int, dim1: int, *, missing_ok: bool = False) -> None:
        """Swap two dimensions (e.g. a Linear weight stored as [in, out])."""
        for k in self._each("transpose", key, missing_ok):
            old = list(shape_of(self._tensor("transpose", k)))
            try:
                old[dim0], old[dim1] = old[dim1], old[dim0]
            except IndexError:
                raise OpError("transpose", k, f"transpose: {k!r} has {len(old)} dims") from None
            self._transform("transpose", k, tuple(old), lambda t: t.transpose(dim0, dim1))
            self._record("transpose", [k], ["transpose", {"key": re.escape(k), "dim0": dim0, "dim1": dim1}])

    def permute(self, key: str, dims: Sequence[int], *, missing_ok: bool = False) -> None:
        """Reorder dimensions."""
        dims = list(dims)
        for k in self._each("permute", key, missing_ok):
            old = shape_of(self._tensor("permute", k))
            if sorted(dims) != list(range(len(old))):
                raise OpError("permute", k, f"permute: {dims} is not a permutation of {len(old)} dims of {k!r}")
            new = tuple(old[d] for d in dims)
            self._transform("permute", k, new, lambda t: t.permute(*dims))
            inverse = [dims.index(i) for i in range(len(dims))]
            self._record("permute", [k], ["permute", {"key": re.escape(k), "dims": inverse}])

    def cast(self, pattern: str, dtype: Any, *, missing_ok: bool = False) -> None:
        """Change the dtype of every matching tensor (irreversible when ``dtype`` cannot hold every value)."""
        name = str(dtype).removeprefix("torch.")
        for k in self._each("cast", pattern, missing_ok):
            src = self._tensor("cast", k)
            old = dtype_of(src)
            shape = shape_of(src)
            self._transform("cast", k, shape, partial(values.cast_exact, name=name), dtype=name)
            exact = values.keeps_values(old, name)
            self._record("cast", [k], ["cast", {"pattern": re.escape(k), "dtype": old}] if exact else None)

    def pad(self, key: str, shape: Sequence[int], value: float = 0, *, missing_ok: bool = False) -> None:
        """Grow a tensor to ``shape``, filling new elements with ``value`` (e.g. a grown vocabulary)."""
        for k in self._each("pad", key, missing_ok):
            old = shape_of(self._tensor("pad", k))
            new = tuple(shape)
            if len(new) != len(old) or any(n < o for n, o in zip(new, old, strict=True)):
                raise OpError("pad", k, f"pad: cannot pad {k!r} of shape {list(old)} to {list(new)}")
            self._transform("pad", k, new, partial(values.pad, shape=new, value=value))
            self._record("pad", [k], ["truncate", {"key": re.escape(k), "shape": list(old)}])

    def truncate(self, key: str, shape: Sequence[int], *, missing_ok: bool = False) -> None:
        """Cut a tensor down to ``shape`` (keeps the leading slice of every dimension)."""
        for k in self._each("truncate", key, missing_ok):
            old = shape_of(self._tensor("truncate", k))
            new = tuple(shape)
            if len(new) != len(old) or any(n > o for n, o in zip(new, old, strict=True)):
                raise OpError("truncate", k, f"truncate: cannot cut {k!r} of shape {list(old)} to {list(new)}")
            self._transform("truncate", k, new, partial(values.truncate, shape=new))
            self._record("truncate", [k], None)

    def map(self, key_or_pattern: str, fn: Callable[[torch.Tensor], torch.Tensor], *,
            missing_ok: bool = False) -> None:
        """Apply any tensor function (computed now, so the new shape is known; irreversible)."""
        for k in self._each("map", key_or_pattern, missing_ok):
            src = self._tensor("map", k)
            out = fn(to_torch(src))
            if not is_entry(out):
                raise OpError("map", k, f"map: the function returned {type(out).__name__} for {k!r}")
            self._replace(k, out)
            self._record("map", [k], None)

    # -- split and merge -------------------------------------------------------------------

    def split(self, key: str, new_keys: Sequence[str], dim: int = 0, sizes: Sequence[int] | None = None,
              *, missing_ok: bool = False, at: Sequence[int] | None = None) -> None:
        """Split a tensor along ``dim`` into several keys (a fused ``qkv`` into ``q``, ``k``, ``v``).

        With a pattern, ``new_keys`` are templates: ``split(r"l\\.(\\d+)\\.qkv", [r"l.\\1.q", ...])``.
        ``at`` puts the parts at these positions of the state dict instead of where the key was (the
        walk back of a ``merge`` passes the positions its keys had, so the order comes back too).
        """
        for k, m in self._match("split", key, missing_ok):
            src = self._tensor("split", k)
            shape = shape_of(src)
            targets = [m.expand(t) if m else t for t in new_keys]
            try:
                length = shape[dim]
            except IndexError:
                raise OpError("split", k, f"split: {k!r} of shape {list(shape)} has no dim {dim}") from None
            parts = list(sizes) if sizes is not None else _equal_parts("split", k, length, len(targets))
            if len(parts) != len(targets) or sum(parts) != length:
                raise OpError("split", k, f"split: sizes {parts} do not add up to {length} along dim {dim} of {k!r}")
            clash = [t for t in targets if t in self._entries and t != k]
            if clash:
                raise OpError("split", k, f"split: {clash[0]!r} already exists")
            position = list(self._entries).index(k)
            items = list(self._entries.items())
            new_items: list[tuple[str, Any]] = []
            start = 0
            for target, size in zip(targets, parts, strict=True):
                out_shape = list(shape)
                out_shape[dim] = size
                view = values.slice_view(src, dim, start, size)
                new_items.append((target, view if view is not None else Deferred(
                    tuple(out_shape), dtype_of(src),
                    partial(values.narrow, src, dim, start, size),
                )))
                start += size
            ordered = items[:position] + new_items + items[position + 1:]
            if at is not None and len(at) == len(new_items):
                ordered = items[:position] + items[position + 1:]
                for index, item in sorted(zip(at, new_items, strict=True), key=lambda p: p[0]):
                    ordered.insert(index, item)
            self._entries.clear()
            for key_, value in ordered:
                self._entries[key_] = value
            self.optimizers.transform(
                [k], targets, shape, partial(values.split_all, sizes=parts, dim=dim)
            )
            self._record("split", [k, *targets],
                         ["merge", {"keys": [re.escape(t) for t in targets], "new_key": k, "dim": dim}])

    def merge(self, keys: Sequence[str], new_key: str, dim: int = 0, *, missing_ok: bool = False) -> None:
        """Concatenate tensors along ``dim`` into one key (``q``, ``k``, ``v`` into a fused ``qkv``).

        With patterns, the first one drives: for each key it matches, the others are the keys their
        patterns match with the same groups, and ``new_key`` is a template.
        """
        first = self._match("merge", keys[0], missing_ok)
        for k0, m0 in first:
            groups = m0.groups() if m0 else ()
            sources = [k0]
            for pattern in keys[1:]:
                found = [k for k in self._entries if (m := _fullmatch(pattern, k)) and m.groups() == groups]
                if len(found) != 1:
                    raise OpError("merge", pattern, f"merge: {pattern!r} matches {len(found)} keys alongside {k0!r}")
                sources.append(found[0])
            target = m0.expand(new_key) if m0 else new_key
            tensors = [self._tensor("merge", s) for s in sources]
            shapes = [shape_of(t) for t in tensors]
            base = list(shapes[0])
            dtype = dtype_of(tensors[0])
            for s, src_key, tensor in zip(shapes, sources, tensors, strict=True):
                if len(s) != len(base) or any(a != b for i, (a, b) in enumerate(zip(s, base, strict=True)) if i != dim):
                    raise OpError(
                        "merge", src_key, f"merge: {src_key!r} of shape {list(s)} does not fit beside {list(base)}"
                    )
                if dtype_of(tensor) != dtype:
                    raise OpError("merge", src_key,
                                  f"merge: {src_key!r} is {dtype_of(tensor)}, not {dtype} like {k0!r}; cast first")
            sizes = [s[dim] for s in shapes]
            out_shape = list(base)
            out_shape[dim] = sum(sizes)
            order = list(self._entries)
            position = order.index(sources[0])
            places = [order.index(k) for k in sources]
            items = [(k, v) for k, v in self._entries.items() if k not in sources]
            if target in dict(items):
                raise OpError("merge", target, f"merge: {target!r} already exists")
            merged = (values.joined_view(tensors, dim)
                      or Deferred(tuple(out_shape), dtype, partial(values.cat, tensors, dim)))
            items.insert(min(position, len(items)), (target, merged))
            self._entries.clear()
            for key_, value in items:
                self._entries[key_] = value
            self.optimizers.transform(
                sources, [target], tuple(shapes[0]), lambda ts: [values.cat_tensors(ts, dim)], shapes=shapes
            )
            self._record("merge", [*sources, target],
                         ["split", {"key": re.escape(target), "new_keys": sources, "dim": dim, "sizes": sizes,
                                    "at": places}])

    # -- walking back ----------------------------------------------------------------------

    def apply_inverse(self, journal: Sequence[Inverse]) -> None:
        """Undo a revision from the inverse journal its upgrade recorded.

        The journal comes from the file, so every step is checked before any runs: it may name a
        built-in op with an inverse or an op registered in this process, nothing else.
        """
        steps = list(reversed(list(journal)))
        for name, kwargs in steps:
            if name == "irreversible":
                raise OpError(kwargs["op"], None, f"{kwargs['op']} cannot be undone automatically")
            if not isinstance(name, str) or not name.isidentifier() or not isinstance(kwargs, dict):
                raise OpError(str(name), None, f"{name!r} is not an op an inverse can name")
            if name not in self.inverse_ops and name not in self.custom_ops:
                raise OpError(name, None, (
                    f"{name!r} is not an op an inverse can name: neither a built-in op with an inverse nor one "
                    "registered in this process (register it with @ckptmigrate.op in the module "
                    "[tool.ckptmigrate] ops names, or one a migration script imports); nothing was run"))
        for name, kwargs in steps:
            custom = self.custom_ops.get(name) if name not in self.inverse_ops else None
            if custom is not None:
                custom.run(self, (), kwargs)
            else:
                getattr(self, name)(**kwargs)


def _metadata_moves(modules: list[str], keys: list[str], mapping: Mapping[str, str]) -> dict[str, str]:
    """``{old module: new module}`` for every module in ``_metadata`` whose tensors all moved
    to one new prefix, keeping their names below it (``module.layer`` → ``layer``, ``module`` → root)."""
    known = set(modules)
    under: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix in known:
                under.setdefault(prefix, []).append(k)
    moves = {}
    for module, members in under.items():
        targets = set()
        for k in members:
            new, rest = mapping.get(k, k), k[len(module) + 1:]
            if new == rest:
                targets.add("")
            elif new.endswith("." + rest):
                targets.add(new[: -len(rest) - 1])
            else:
                break
        else:
            if len(targets) == 1 and (target := targets.pop()) != module:
                moves[module] = target
    for module in modules:  # a module without tensors of its own (GELU, Dropout) moves with its parent
        if module in under or not module:
            continue
        parts = module.split(".")
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            if parent in moves:
                rest = ".".join(parts[i:])
                moves[module] = f"{moves[parent]}.{rest}" if moves[parent] else rest
                break
            if parent in under:
                break
    return moves


def _looks_like_parameter(key: str, value: Entry) -> bool:
    if getattr(value, "requires_grad", False):
        return True
    return key.rpartition(".")[2] in ("weight", "bias") and dtype_of(value).startswith(("float", "bfloat", "complex"))


def _resolve_shape(op: str, key: str, old: tuple[int, ...], shape: Sequence[int]) -> tuple[int, ...]:
    new = list(shape)
    total = math.prod(old)
    if new.count(-1) == 1:
        known = math.prod(d for d in new if d != -1)
        if known == 0 or total % known:
            raise OpError(op, key, f"{op}: cannot reshape {key!r} of shape {list(old)} to {list(shape)}")
        new[new.index(-1)] = total // known
    if math.prod(new) != total:
        raise OpError(op, key, f"{op}: cannot reshape {key!r} of shape {list(old)} to {list(shape)}")
    return tuple(new)


def _equal_parts(op: str, key: str, length: int, n: int) -> list[int]:
    if n == 0 or length % n:
        raise OpError(op, key, f"{op}: {length} does not split into {n} equal parts for {key!r}; pass sizes=")
    return [length // n] * n
