"""Upgrades on every loading path: a ``load_state_dict`` pre-hook that migrates old state dicts.

After ``ckptmigrate.attach(model_or_class, migrations=...)``, a plain
``model.load_state_dict(torch.load(old_file))`` recognises the old state dict by its schema (the
snapshots recorded beside the revisions), runs the chain to head in memory and loads the result.
A state dict that already fits is passed through untouched. One that fits no revision, or still
does not fit after its upgrade, gets ckptmigrate's diagnosis — the same as
:func:`ckptmigrate.load_state_dict` gives — instead of torch's list of missing keys, unless the
load is ``strict=False``, which asked for leniency.
"""

from __future__ import annotations

import contextvars
import functools
from collections import OrderedDict
from typing import Any

from torch import nn

from ckptmigrate.errors import SchemaMismatch


def upgrade_state_dict(
    state_dict: dict[str, Any], migrations: Any = None, *, name: str = "<state dict>", module: nn.Module | None = None
) -> Any:
    """The state dict upgraded to head in memory (or the same object when it is already there).

    A state dict that matches no revision raises :class:`~ckptmigrate.errors.SchemaMismatch`, naming
    the nearest revision and the difference.
    """
    from ckptmigrate.api import chain_source
    from ckptmigrate.chain.engine import apply
    from ckptmigrate.chain.planning import plan_for
    from ckptmigrate.checkpoint.lazy import Checkpoint

    ckpt = Checkpoint.from_payload(OrderedDict(state_dict), name=name)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        ckpt.state_dict.entries._metadata = meta  # type: ignore[attr-defined]
    graph = chain_source(migrations).for_envelope(ckpt.envelope)  # configured, else the installed chains
    plan = plan_for(ckpt, graph)
    if not plan.steps:
        return state_dict
    apply(ckpt, plan, order=list(module.state_dict()) if module is not None else None)
    return ckpt.materialize()


#: The ``strict`` of the ``load_state_dict`` call in progress: torch hands its pre-hooks ``strict=True``
#: whatever the caller asked, so ``attach`` records the caller's own.
_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptmigrate_strict", default=True)


def _hook(migrations: Any, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    from ckptmigrate.integrations.loading import diagnose, mismatch

    if prefix:
        return
    expected = module.state_dict(keep_vars=True)
    if set(state_dict) == set(expected):
        return
    strict = _STRICT.get()
    name = f"<state dict for {type(module).__name__}>"
    try:
        upgraded = upgrade_state_dict(state_dict, migrations, name=name, module=module)
    except SchemaMismatch:
        if not strict:
            return  # a lenient load of a partial state dict: torch loads what fits
        raise
    if strict and set(upgraded) != set(expected):
        raise mismatch(name, diagnose(module, upgraded))
    if upgraded is not state_dict:
        state_dict.clear()
        state_dict.update(upgraded)


def _record_strict(cls: type[nn.Module]) -> None:
    """Make ``cls.load_state_dict`` let the hook know the caller's ``strict`` (once per class; the
    class, not the instance, so a module stays picklable). Instances without the hook are unaffected."""
    load = cls.load_state_dict
    if getattr(load, "_ckptmigrate_records_strict", False):
        return

    @functools.wraps(load)
    def load_state_dict(self: nn.Module, state_dict: Any, strict: bool = True, *args: Any, **kwargs: Any) -> Any:
        token = _STRICT.set(bool(strict))
        try:
            return load(self, state_dict, strict, *args, **kwargs)
        finally:
            _STRICT.reset(token)

    load_state_dict._ckptmigrate_records_strict = True  # type: ignore[attr-defined]
    cls.load_state_dict = load_state_dict  # type: ignore[method-assign]


def attach(module_or_class: nn.Module | type[nn.Module], migrations: Any = None) -> nn.Module | type[nn.Module]:
    """Make ``load_state_dict`` of this module (or of every instance of this class) upgrade old state dicts."""
    hook = functools.partial(_hook, migrations)
    if isinstance(module_or_class, nn.Module):
        module_or_class.register_load_state_dict_pre_hook(hook)
        _record_strict(type(module_or_class))
        return module_or_class
    if isinstance(module_or_class, type) and issubclass(module_or_class, nn.Module):
        cls = module_or_class
        original_init = cls.__init__

        @functools.wraps(original_init)
        def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            self.register_load_state_dict_pre_hook(hook)

        cls.__init__ = __init__  # type: ignore[method-assign]
        _record_strict(cls)
        return cls
    raise TypeError(f"attach() takes an nn.Module or a subclass of it, not {module_or_class!r}")
