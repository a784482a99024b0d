"""Ops a project adds to the vocabulary, Alembic's ``Operations.register_operation`` for checkpoints.

A function ``fn(ckpt, **arguments)`` registered with :func:`op` is called from migration scripts as
``ckpt.name(...)``. What it does inside (the built-in ops it calls, direct edits) is recorded as one
step: its name and arguments in the history, and its inverse — another registered op, given the same
arguments unless ``fn`` returns the inverse's — in the inverse journal, which ``downgrade`` replays.

The journal is read back from the file, so its arguments must be JSON (refused at call time
otherwise) and walking back calls only ops registered in the running process
(:meth:`~ckptmigrate.ops.operations.Operations.apply_inverse` refuses any other name before running
anything).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

from ckptmigrate.ops.architecture import ArchitectureOps
from ckptmigrate.ops.context import FACTS, NOT_OPS, MigrationContext, builtin_ops
from ckptmigrate.ops.operations import Operations, OpError

#: Names an op of a project's cannot take: the journal's own marker, and what the context offers.
RESERVED = frozenset({"irreversible", "available", "calls", *FACTS, *NOT_OPS})

OpFunction = Callable[..., Any]


class CustomOp:
    """A registered op: ``fn``, the op that undoes it (``inverse``, None: irreversible), and where
    it was defined (``origin``, so re-importing the same module registers it again silently)."""

    def __init__(self, name: str, fn: OpFunction, inverse: str | None) -> None:
        self.name = name
        self.fn = fn
        self.inverse_name = inverse
        self.origin = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', name)}"
        self.signature = inspect.signature(fn)
        self.__doc__ = fn.__doc__

    def inverse(self, fn: OpFunction) -> CustomOp:
        """Register ``fn`` as this op's inverse (and this op as its inverse), Alembic's ``reverse()``::

            @ckptmigrate.op
            def scale(ckpt, key, factor): ...

            @scale.inverse
            def unscale(ckpt, key, factor): ...
        """
        other = register(fn, inverse=self.name)
        self.inverse_name = other.name
        return other

    def __call__(self, ckpt: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the op on a checkpoint outside a script (``scale(ckpt, key="w", factor=2)``), or on a
        script's ``ckpt`` (the same as ``ckpt.scale(...)``)."""
        if isinstance(ckpt, MigrationContext):
            return getattr(ckpt, self.name)(*args, **kwargs)
        return self.run(ckpt, args, kwargs)

    def arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, defaults included, as the journal records them."""
        try:
            bound = self.signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            raise OpError(self.name, None, f"{self.name}: {exc}") from None
        bound.apply_defaults()
        arguments = dict(list(bound.arguments.items())[1:])
        for arg, value in arguments.items():
            problem = _not_json(value)
            if problem is not None:
                raise OpError(self.name, None, f"{self.name}: argument {arg!r} is {problem}, which the journal "
                              "cannot record; pass JSON values (None, bool, numbers, strings, lists, dicts)")
        recorded: dict[str, Any] = json.loads(json.dumps(arguments))
        return recorded

    def returned(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse arguments ``fn`` returned, checked as the journal records them."""
        for arg, value in result.items():
            problem = _not_json(value) if isinstance(arg, str) else "not named by a string"
            if problem is not None:
                raise OpError(self.name, None, f"{self.name}: the inverse's argument {arg!r} is {problem}, which "
                              "the journal cannot record")
        recorded: dict[str, Any] = json.loads(json.dumps(dict(result)))
        return recorded

    def run(self, target: Operations, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Call ``fn`` on ``target`` and record it as one step with its inverse."""
        arguments = self.arguments(args, kwargs)
        inverse = self.inverse_name
        if inverse is not None and inverse not in Operations.custom_ops and inverse not in target.inverse_ops:
            raise OpError(self.name, None, f"{self.name}: its inverse {inverse!r} is not a registered op")
        marks = len(target.journal), len(target.touched), len(target.irreversible)
        result = self.fn(MigrationContext(target, record=False), **arguments)
        touched = [k for _, keys in target.touched[marks[1]:] for k in keys]
        del target.journal[marks[0]:], target.touched[marks[1]:], target.irreversible[marks[2]:]
        step: list[Any] | None = None
        if inverse is not None:
            if result is None:
                step = [inverse, arguments]
            elif isinstance(result, Mapping):
                other = Operations.custom_ops.get(inverse)
                step = [inverse, other.arguments((), result) if isinstance(other, CustomOp)
                        else self.returned(result)]
            else:
                raise OpError(self.name, None, f"{self.name} returned {type(result).__name__}: return None "
                              "(its inverse gets the same arguments) or a dict of the inverse's arguments")
        target._record(self.name, dict.fromkeys(touched), step)

    def __repr__(self) -> str:
        return f"<ckptmigrate op {self.name} (inverse: {self.inverse_name}) from {self.origin}>"


def _not_json(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` cannot be a journal argument, or None."""
    if depth > 32:
        return "nested too deep"
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} (not finite)"
    if isinstance(value, (list, tuple)):
        return next((p for v in value if (p := _not_json(v, depth + 1)) is not None), None)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return "a dict with keys that are not strings"
        return next((p for v in value.values() if (p := _not_json(v, depth + 1)) is not None), None)
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def register(fn: OpFunction, *, inverse: str | None = None, name: str | None = None) -> CustomOp:
    """Register ``fn(ckpt, ...)`` as the op ``name`` (default: its ``__name__``); see :func:`op`."""
    name = name or str(getattr(fn, "__name__", ""))
    custom = CustomOp(name, fn, inverse)
    if not name.isidentifier() or name.startswith("_"):
        raise OpError(name, None, f"op {name!r}: an op's name is a public identifier")
    if name in builtin_ops(ArchitectureOps) or name in RESERVED:
        raise OpError(name, None, f"op {name!r} ({custom.origin}): ckptmigrate already has {name!r}; "
                                  "choose another name")
    if inverse is not None and not (isinstance(inverse, str) and inverse.isidentifier()):
        raise OpError(name, None, f"op {name!r}: inverse= names the op that undoes it, not {inverse!r}")
    params = list(custom.signature.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise OpError(name, None, f"op {name!r}: takes the checkpoint first: def {name}(ckpt, ...)")
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY) for p in params[1:]):
        raise OpError(name, None, f"op {name!r}: the journal records arguments by name; *args, **kwargs and "
                                  "positional-only arguments cannot be recorded")
    known = Operations.custom_ops.get(name)
    if isinstance(known, CustomOp) and known.origin != custom.origin:
        raise OpError(name, None, f"op {name!r} ({custom.origin}) is already registered by {known.origin}")
    Operations.custom_ops[name] = custom
    return custom


@overload
def op(fn: OpFunction, /) -> CustomOp: ...
@overload
def op(*, inverse: str | None = None, name: str | None = None) -> Callable[[OpFunction], CustomOp]: ...


def op(fn: OpFunction | None = None, /, *, inverse: str | None = None,
       name: str | None = None) -> CustomOp | Callable[[OpFunction], CustomOp]:
    """Register a function as an op migration scripts call as ``ckpt.<name>(...)``::

        @ckptmigrate.op(inverse="unscale_rows")
        def scale_rows(ckpt, key: str, factor: float):
            ckpt.map(key, lambda t: t * factor)

    ``inverse`` names the registered op that undoes it, called with the same arguments (or with the
    dict ``fn`` returns); without one the op is irreversible, as ``drop`` is. Arguments must be JSON
    values: they are recorded in the file's history.
    """
    if fn is not None:
        return register(fn, inverse=inverse, name=name)
    return lambda f: register(f, inverse=inverse, name=name)


def registered() -> dict[str, CustomOp]:
    """The ops registered in this process, by name."""
    return {n: custom for n, custom in Operations.custom_ops.items() if isinstance(custom, CustomOp)}
