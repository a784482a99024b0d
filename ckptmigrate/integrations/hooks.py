"""Upgrades on every loading path: a ``load_state_dict`` pre-hook that migrates old state dicts.

After ``ckptmigrate.attach(model_or_class, migrations=...)``, a plain
``model.load_state_dict(torch.load(old_file))`` recognises the old state dict by its schema (the
snapshots recorded beside the revisions), runs the chain to head in memory and loads the result.
A state dict that already fits, or that matches no revision, is passed through untouched.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

from torch import nn

from ckptmigrate.errors import BadInput


def upgrade_state_dict(
    state_dict: dict[str, Any], migrations: Any = None, *, name: str = "<state dict>", module: nn.Module | None = None
) -> Any:
    """The state dict upgraded to head in memory (or the same object when nothing applies)."""
    from ckptmigrate.api import revision_graph
    from ckptmigrate.chain.engine import apply, plan_for
    from ckptmigrate.checkpoint.lazy import Checkpoint

    graph = revision_graph(migrations)
    ckpt = Checkpoint.from_payload(OrderedDict(state_dict), name=name)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        ckpt.state_dict.entries._metadata = meta  # type: ignore[attr-defined]
    try:
        plan = plan_for(ckpt, graph)
    except BadInput:
        return state_dict
    if not plan.steps:
        return state_dict
    apply(ckpt, plan, order=list(module.state_dict()) if module is not None else None)
    return ckpt.materialize()


def _hook(migrations: Any, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    if prefix:
        return
    expected = module.state_dict(keep_vars=True)
    if set(state_dict) == set(expected):
        return
    upgraded = upgrade_state_dict(state_dict, migrations, name=type(module).__name__, module=module)
    if upgraded is not state_dict:
        state_dict.clear()
        state_dict.update(upgraded)


def attach(module_or_class: nn.Module | type[nn.Module], migrations: Any = None) -> nn.Module | type[nn.Module]:
    """Make ``load_state_dict`` of this module (or of every instance of this class) upgrade old state dicts."""
    hook = functools.partial(_hook, migrations)
    if isinstance(module_or_class, nn.Module):
        module_or_class.register_load_state_dict_pre_hook(hook)
        return module_or_class
    if isinstance(module_or_class, type) and issubclass(module_or_class, nn.Module):
        cls = module_or_class
        original_init = cls.__init__

        @functools.wraps(original_init)
        def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            self.register_load_state_dict_pre_hook(hook)

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls
    raise TypeError(f"attach() takes an nn.Module or a subclass of it, not {module_or_class!r}")
