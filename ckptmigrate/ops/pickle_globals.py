"""Pickle-level ops: the globals a file's pickle names, renamed (``rename_global``) or turned into
plain data (``sanitize``), without importing or calling any of them.

The restricted unpickler gives every global a file names its own inert stand-in class
(:mod:`ckptmigrate.formats.pickled`), which the writer writes back under the name it carries. A
class that moved between modules is therefore renamed by renaming its stand-in, wherever the file
refers to it: an instance in the extras, a class inside a pickled ``nn.Module``, a tensor subclass.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ckptmigrate.formats.pickle_safety import WEIGHTS_ONLY_GLOBALS, PickleSafety, assess, python3_name
from ckptmigrate.formats.pickled import StandIn
from ckptmigrate.ops.sanitize import Sanitizer
from ckptmigrate.tensors.refs import ComposedTensor, TensorRef


class _Refused(ValueError):
    """A pickle-level op's arguments do not fit the file (raised as the vocabulary's OpError)."""


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def stand_ins(roots: Iterable[Any]) -> Iterator[type[StandIn]]:
    """Every stand-in class reachable from ``roots`` (instances' classes and classes held as
    values), once each; cycles are followed once."""
    seen: set[int] = set()
    classes: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        cls = obj if isinstance(obj, type) else type(obj)
        if isinstance(cls, type) and issubclass(cls, StandIn) and cls is not StandIn and id(cls) not in classes:
            classes.add(id(cls))
            yield cls
        if isinstance(obj, type):
            continue
        if isinstance(obj, StandIn):
            stack += [obj.args, obj.state, obj.listitems, obj.dictitems]
        elif isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
            if hasattr(obj, "__dict__"):  # an OrderedDict's _metadata
                stack += list(vars(obj).values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif isinstance(obj, TensorRef):
            stack += list(obj.extra.values())
        elif isinstance(obj, ComposedTensor):
            stack.append(obj.args)


def named_globals(roots: Iterable[Any]) -> dict[str, bool]:
    """``module.qualname`` → whether the pickle calls it, for the stand-ins reachable from ``roots``."""
    out: dict[str, bool] = {}
    for cls in stand_ins(roots):
        name = f"{cls.module}.{cls.qualname}"
        out[name] = out.get(name, False) or cls.called
    return out


def _torchs_own(cls: type[StandIn]) -> bool:
    """A global torch's ``weights_only`` loader itself reads (a dtype, a storage type): not the
    file's to rename."""
    return python3_name(f"{cls.module}.{cls.qualname}") in WEIGHTS_ONLY_GLOBALS


def split_global(op: str, name: str) -> tuple[str, str]:
    """``module:qualname`` as written, or ``a.b.C`` split at its last dot."""
    module, colon, qualname = name.partition(":")
    if not colon:
        module, _, qualname = name.rpartition(".")
    if not (_DOTTED.fullmatch(module) and _DOTTED.fullmatch(qualname)):
        raise _Refused(f"{op}: {name!r} is not a global's name (module.Class, or module:Outer.Inner)")
    return module, qualname


@dataclass
class SanitizeReport:
    """What :meth:`PickleOps.sanitize` converted (``(global, what it became)`` → count) and the
    verdict on what is left."""

    converted: Counter[tuple[str, str]] = field(default_factory=Counter)
    safety: PickleSafety = field(default_factory=PickleSafety)

    @property
    def blocking(self) -> tuple[str, ...]:
        """The globals that still keep ``torch.load(weights_only=True)`` from reading the file."""
        return self.safety.unsafe

    def to_dict(self) -> dict[str, Any]:
        return {"converted": [{"global": g, "to": to, "count": n} for (g, to), n in sorted(self.converted.items())],
                **self.safety.to_dict()}


class PickleOps:
    """Mixin for the op vocabulary: ops on the globals a file's pickle names.

    A copy of the weights (:class:`~ckptmigrate.checkpoint.copies.StateDictCopy`) is part of its
    file, whose call already covered it: there these ops do nothing (see :meth:`_pickle_roots`).
    """

    extras: dict[str, Any]

    def _record(self, op: str, keys: Iterable[str], inverse: list[Any] | None) -> None:
        raise NotImplementedError  # Operations records it

    def _op_error(self, op: str, key: str | None, message: str) -> Exception:
        raise NotImplementedError  # Operations' OpError

    def _pickle_roots(self) -> list[Any] | None:
        """What holds the payload's objects; None for a part of a file (its owner's call covers it)."""
        entries = getattr(getattr(self, "state_dict", None), "entries", {})
        return [self.extras, entries]

    def _pickle_changed(self, named: dict[str, bool]) -> None:
        """The globals the payload names now (a checkpoint keeps its verdict up to date)."""

    def _pickle_objects(self) -> str:
        """What the payload's objects are: ``inert`` (stand-ins, as the restricted unpickler read the
        file), ``real`` (a payload already in memory: Lightning's ``on_load_checkpoint``, a state dict
        handed to ``load_state_dict``; its objects are what their classes made them, and these ops
        leave them alone) or ``trusted`` (``trust_pickle`` rebuilt them from the file, which these ops
        refuse: the file would be written with the classes' real names)."""
        return "inert"

    def _real_objects(self, op: str) -> bool:
        """True when ``op`` has nothing to do on real objects; refused after ``trust_pickle``."""
        kind = self._pickle_objects()
        if kind == "trusted":
            raise _Refused(f"{op} works on the file's pickle as read, not on the objects trust_pickle rebuilt "
                           "(their classes name themselves when written); run it without --trust-pickle")
        return kind == "real"

    def rename_global(self, old: str, new: str) -> None:
        """A class (or function) the file's pickle names moved: ``rename_global("old.mod.Cls",
        "new.mod.Cls")``; ``module:Outer.Inner`` names a nested class; ``"old.pkg."`` → ``"new.pkg."``
        (both ending in a dot) renames every global under a module prefix. Nothing is imported: the
        file's inert stand-ins carry the new name, in the extras and inside a pickled module alike.
        The inverse is recorded, unless the new name was already in the file (then two globals
        become one, which cannot be told apart again)."""
        try:
            self._rename_global(old, new)
        except _Refused as exc:
            raise self._op_error("rename_global", old, str(exc)) from None

    def _rename_global(self, old: str, new: str) -> None:
        if not (isinstance(old, str) and isinstance(new, str)):  # a journal read back from a file
            raise _Refused(f"rename_global: the names must be strings, not {old!r:.40} and {new!r:.40}")
        roots = self._pickle_roots()
        if roots is None:
            return
        if self._real_objects("rename_global"):
            self._record("rename_global", [], ["rename_global", {"old": new, "new": old}])
            return
        classes = [c for c in stand_ins(roots) if not _torchs_own(c)]
        prefix = old.endswith(".")
        if prefix != new.endswith("."):
            raise _Refused(f"rename_global: {old!r} -> {new!r}: a module prefix is renamed to a module prefix, "
                           "both ending in '.'")
        renames: list[tuple[type[StandIn], str, str]] = []
        if prefix:
            for part in (old, new):
                if not _DOTTED.fullmatch(part[:-1]):
                    raise _Refused(f"rename_global: {part!r} is not a module prefix (pkg.sub.)")
            for cls in classes:
                if (cls.module + ".").startswith(old):
                    renames.append((cls, (new + (cls.module + ".")[len(old):])[:-1], cls.qualname))
            inverse_args = {"old": new, "new": old}
        else:
            old_module, old_qualname = split_global("rename_global", old)
            new_module, new_qualname = split_global("rename_global", new)
            exact = ":" in old
            for cls in classes:
                if ((cls.module, cls.qualname) == (old_module, old_qualname)
                        or (not exact and f"{cls.module}.{cls.qualname}" == old)):
                    renames.append((cls, new_module, new_qualname))
            inverse_args = {"old": f"{new_module}:{new_qualname}", "new": f"{old_module}:{old_qualname}"}
        if not renames:
            raise self._no_global(old, classes, prefix)
        torchs = sorted({f"{m}.{q}" for _, m, q in renames if python3_name(f"{m}.{q}") in WEIGHTS_ONLY_GLOBALS})
        if torchs:
            raise _Refused(f"rename_global: {old!r} -> {new!r} would name {', '.join(torchs[:3])}, one of torch's "
                           "own globals")
        renamed = {id(cls) for cls, _, _ in renames}
        targets = {(m, q) for _, m, q in renames}
        merged = len(renames) > 1 and not prefix  # a.b:C and a:b.C made one: no way to tell them apart
        merged = merged or any(id(c) not in renamed and (
            (c.module, c.qualname) in targets or (prefix and (c.module + ".").startswith(new))) for c in classes)
        touched = []
        for cls, module, qualname in renames:
            touched.append(f"{cls.module}.{cls.qualname} -> {module}.{qualname}")
            cls.module, cls.qualname = module, qualname
            cls.__name__ = qualname.rpartition(".")[2]
            cls.__qualname__ = qualname
        self._record("rename_global", touched, None if merged else ["rename_global", inverse_args])
        self._pickle_changed(named_globals(roots))

    def _no_global(self, old: str, classes: list[type[StandIn]], prefix: bool) -> _Refused:
        names = sorted({f"{c.module}.{c.qualname}" for c in classes})
        if prefix:
            modules = sorted({c.module + "." for c in classes})
            close = difflib.get_close_matches(old, modules, n=3, cutoff=0.3)
            names = [*close, *(m for m in modules if m not in close)]
        else:
            close = difflib.get_close_matches(old, names, n=3, cutoff=0.3)
            names = [*close, *(n for n in names if n not in close)]
        if not names:
            return _Refused(f"rename_global: {old!r} matches no global: the file's pickle names none of its own "
                            "(only tensors, plain data and torch's own)")
        hint = ""
        if not prefix and any(c.module == old or c.module.startswith(old + ".") for c in classes):
            hint = f"; to rename the module, end both names with '.' ({old + '.'!r})"
        shown = ", ".join(names[:12]) + (f" (+{len(names) - 12} more)" if len(names) > 12 else "")
        return _Refused(f"rename_global: {old!r} matches no {'module prefix' if prefix else 'global'} in the file; "
                        f"it names {shown}{hint}")

    def sanitize(self) -> SanitizeReport:
        """Turn the non-tensor payload into what ``torch.load(weights_only=True)`` reads
        (:mod:`ckptmigrate.ops.sanitize`): ``argparse.Namespace`` → dict, numpy scalars → Python
        scalars, numpy arrays → tensors, paths → str, OmegaConf configs → dicts and lists. Anything
        else stays as it was and is named in the report as still blocking. Irreversible."""
        roots = self._pickle_roots()
        if roots is None:
            return SanitizeReport()
        try:
            if self._real_objects("sanitize"):
                return SanitizeReport()
        except _Refused as exc:
            raise self._op_error("sanitize", None, str(exc)) from None
        sanitizer = Sanitizer()
        for holder in (self.extras, getattr(getattr(self, "state_dict", None), "entries", {})):
            for k, v in list(holder.items()):
                new = sanitizer.convert(v)
                if new is not v:
                    holder[k] = new
        named = named_globals(roots)
        if sanitizer.converted:
            self._record("sanitize", sorted(f"{g} -> {to}" for g, to in sanitizer.converted), None)
            self._pickle_changed(named)
        return SanitizeReport(sanitizer.converted, assess(named))
