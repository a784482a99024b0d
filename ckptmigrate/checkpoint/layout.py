"""Where the model's state dict sits inside a checkpoint payload, and what else is there.

Bare state dict; ``{"state_dict": ...}`` (Lightning) and the other common wrapper keys; a whole
pickled ``nn.Module`` taken apart without importing its class. Everything that is not the state
dict is *extras* and is written back untouched.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptmigrate.formats.pickled import StandIn, global_name
from ckptmigrate.tensors.refs import is_entry

WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "net")


class LayoutError(ValueError):
    pass


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(is_entry(v) for v in value.values())


def _module_state(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, StandIn):
        return None
    state = obj.state[0] if isinstance(obj.state, tuple) and obj.state else obj.state
    if isinstance(state, dict) and "_modules" in state and "_parameters" in state:
        return state
    return None


def _module_state_dict(obj: Any, prefix: str, out: OrderedDict[str, Any], _path: frozenset[int] = frozenset()) -> None:
    state = _module_state(obj)
    if state is None or id(obj) in _path:  # a module among its own submodules (a cycle) adds nothing
        return
    skip = state.get("_non_persistent_buffers_set") or set()
    skip = set(skip.args[0]) if isinstance(skip, StandIn) and skip.args else set(skip)
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _module_state_dict(child, f"{prefix}{name}.", out, _path | {id(obj)})


@dataclass(frozen=True)
class Layout:
    """``kind`` is "bare", "key" (the state dict is ``payload[key]``) or "module"."""

    kind: str
    key: str | None = None

    @property
    def name(self) -> str:
        return f"key:{self.key}" if self.kind == "key" else self.kind

    def state_dict(self, payload: Any) -> Any:
        if self.kind == "bare":
            return payload
        if self.kind == "key":
            return payload[self.key]
        out: OrderedDict[str, Any] = OrderedDict()
        _module_state_dict(payload, "", out)
        return out

    def extras(self, payload: Any) -> dict[str, Any]:
        if self.kind == "key":
            return {k: v for k, v in payload.items() if k != self.key}
        return {}

    def rebuild(self, payload: Any, state_dict: Any, extras: Mapping[str, Any]) -> Any:
        """The payload with a new state dict and extras; a pickled module becomes a bare state dict."""
        if self.kind != "key":
            return state_dict
        out = type(payload)() if isinstance(payload, OrderedDict) else {}
        for k in payload:
            if k == self.key:
                out[k] = state_dict
            elif k in extras:
                out[k] = extras[k]
        for k, v in extras.items():
            if k not in out:
                out[k] = v
        return out


def locate(payload: Any, key: str | None = None) -> Layout:
    """Find the state dict; ``key`` names a wrapper key explicitly."""
    if key is not None:
        if not isinstance(payload, Mapping) or key not in payload:
            top = list(payload)[:8] if isinstance(payload, Mapping) else type(payload).__name__
            raise LayoutError(f"has no key {key!r} (top level: {top})")
        if not isinstance(payload[key], Mapping):
            raise LayoutError(f"payload[{key!r}] is not a state dict")
        return Layout("key", key)
    if isinstance(payload, Mapping):
        if any(is_entry(v) for v in payload.values()):
            return Layout("bare")
        for k in WRAPPER_KEYS:
            if k in payload and _tensor_dict(payload[k]):
                return Layout("key", k)
        if not payload:
            return Layout("bare")
        candidates = [k for k, v in payload.items() if _tensor_dict(v)]
        if len(candidates) == 1:
            return Layout("key", candidates[0])
        top = ", ".join(map(str, list(payload)[:8]))
        raise LayoutError(f"no state dict found among the top-level keys [{top}]; name one with --key")
    if _module_state(payload) is not None:
        return Layout("module")
    name = "tensor" if is_entry(payload) else global_name(payload) or type(payload).__name__
    raise LayoutError(f"the payload is a {name}, not a state dict or a checkpoint dict")
