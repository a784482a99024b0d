"""Where the model's state dict sits inside a checkpoint payload, and what else is there.

Bare state dict; ``{"state_dict": ...}`` (Lightning) and the other common wrapper keys; a nested
location such as ``model.state_dict``; a whole pickled ``nn.Module`` taken apart without importing
its class. Everything that is not the state dict is *extras* and is written back untouched.

A location is one path syntax everywhere (``--key``, ``--state-dict``, the config, the envelope):
segments joined by ``.`` — or by ``/``, in which case dots are part of the keys — with ``\\``
escaping the next character; a segment of digits indexes a list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptmigrate.formats.pickled import StandIn, global_name
from ckptmigrate.tensors.refs import TensorRef, is_entry

WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "net")
#: How deep :func:`locate` looks for a state dict when no wrapper key holds one (chgnet: model.state_dict).
SEARCH_DEPTH = 3

Segment = str | int
Path_ = tuple[Segment, ...]


class LayoutError(ValueError):
    pass


def parse_location(text: str) -> Path_:
    """``"model.state_dict"`` or ``"callbacks/EMA{'decay': 0.9}/ema"`` into its segments."""
    sep = "/" if _unescaped(text, "/") else "."
    parts: list[str] = [""]
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            parts[-1] += next(chars, "\\")
        elif ch == sep:
            parts.append("")
        else:
            parts[-1] += ch
    if any(p == "" for p in parts):
        raise LayoutError(f"{text!r} is not a location (an empty segment); separate keys with '.' or '/'")
    return tuple(parts)


def _unescaped(text: str, ch: str) -> bool:
    escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ch:
            return True
    return False


def format_location(path: Path_) -> str:
    """The canonical spelling: dotted when no key holds a dot, else ``/``-separated."""
    segments = [str(s).replace("\\", "\\\\").replace("/", "\\/") for s in path]
    if len(segments) > 1 and any("." in s for s in segments):
        return "/".join(segments)
    return ".".join(s.replace(".", "\\.") for s in segments)


def get_at(payload: Any, path: Path_) -> Any:
    """The value at ``path``; KeyError naming the first segment that is not there."""
    node = payload
    for i, seg in enumerate(path):
        if isinstance(node, Mapping) and seg in node:
            node = node[seg]
        elif isinstance(node, (list, tuple)) and isinstance(seg, str) and seg.isdigit() and int(seg) < len(node):
            node = node[int(seg)]
        else:
            raise KeyError(format_location(path[: i + 1]))
    return node


def set_at(payload: Any, path: Path_, value: Any) -> None:
    parent = get_at(payload, path[:-1])
    leaf = path[-1]
    if isinstance(parent, list) and isinstance(leaf, str) and leaf.isdigit():
        parent[int(leaf)] = value
    else:
        parent[leaf] = value


def resolve(payload: Any, text: str) -> Path_:
    """A location as the user wrote it: a top-level key spelled exactly (dots and all) wins."""
    if isinstance(payload, Mapping) and text in payload:
        return (text,)
    return parse_location(text)


def is_tensor_dict(value: Any) -> bool:
    if type(value) is TensorRef:  # the most frequent value of a payload, and no mapping (no ABC check)
        return False
    return isinstance(value, Mapping) and any(is_entry(v) for v in value.values())


def is_optimizer(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("state"), dict) and "param_groups" in value


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


def module_class(payload: Any) -> str:
    return global_name(payload) or type(payload).__name__


@dataclass(frozen=True)
class Layout:
    """``kind`` is "bare", "key" (the state dict is at the location ``key``) or "module"."""

    kind: str
    key: str | None = None

    @property
    def name(self) -> str:
        return f"key:{self.key}" if self.kind == "key" else self.kind

    @property
    def path(self) -> Path_:
        return parse_location(self.key) if self.key is not None else ()

    @classmethod
    def at(cls, path: Path_) -> Layout:
        return cls("key", format_location(path))

    @classmethod
    def from_name(cls, name: str) -> Layout | None:
        """The layout an envelope recorded (``bare``, ``module``, ``key:LOCATION``)."""
        if name in ("bare", "module"):
            return cls(name)
        if name.startswith("key:") and len(name) > 4:
            return cls("key", name[4:])
        return None

    def state_dict(self, payload: Any) -> Any:
        if self.kind == "bare":
            return payload
        if self.kind == "key":
            return get_at(payload, self.path)
        out: OrderedDict[str, Any] = OrderedDict()
        _module_state_dict(payload, "", out)
        return out

    def extras(self, payload: Any) -> dict[str, Any]:
        """Everything but the state dict: the other top-level keys, and for a nested location the
        containers on the way with the state dict left out."""
        if self.kind != "key":
            return {}
        return dict(_without(payload, self.path))

    def rebuild(self, payload: Any, state_dict: Any, extras: Mapping[str, Any]) -> Any:
        """The payload with a new state dict and extras, in the original key order."""
        if self.kind != "key":
            return state_dict
        return _put(payload, extras, self.path, state_dict)


def _without(container: Mapping[Any, Any], path: Path_) -> Mapping[Any, Any]:
    out = type(container)() if isinstance(container, OrderedDict) else {}
    for k, v in container.items():
        if k != path[0]:
            out[k] = v
        elif len(path) > 1 and isinstance(v, Mapping):
            out[k] = _without(v, path[1:])
    return out


def _put(orig: Any, edited: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    edited = edited if isinstance(edited, Mapping) else {}
    out = type(orig)() if isinstance(orig, OrderedDict) else {}
    for k in orig:
        if k == head:
            out[k] = _put(orig[k], edited.get(k), rest, value)
        elif k in edited:
            out[k] = edited[k]
    for k, v in edited.items():
        if k not in out:
            out[k] = v
    return out


def _candidates(payload: Mapping[Any, Any]) -> list[Path_]:
    """Tensor dicts below the top level, shallowest first, not descending into optimizer state."""
    level: list[tuple[Path_, Any]] = [((k,), v) for k, v in payload.items() if isinstance(k, str)]
    for _depth in range(SEARCH_DEPTH):
        found = [p for p, v in level if is_tensor_dict(v)]
        if found:
            return found
        level = [((*p, k), c) for p, v in level if isinstance(v, Mapping) and not is_optimizer(v)
                 for k, c in v.items() if isinstance(k, str)]
    return []


def _pick(found: list[Path_]) -> Path_ | None:
    for name in WRAPPER_KEYS:
        for p in found:
            if p[-1] == name:
                return p
    return found[0] if len(found) == 1 else None


def locate(payload: Any, key: str | None = None, *, recorded: str | None = None) -> Layout:
    """Find the state dict; ``key`` names its location explicitly; ``recorded`` is the layout an
    envelope recorded, used when it still fits the payload."""
    if key is not None:
        if not isinstance(payload, Mapping):
            raise LayoutError(f"has no key {key!r}: the payload is a {module_class(payload)}")
        try:
            path = resolve(payload, key)
            value = get_at(payload, path)
        except KeyError as exc:
            top = ", ".join(map(str, list(payload)[:8]))
            raise LayoutError(f"has no key {exc.args[0]!r} (top level: [{top}])") from None
        if not isinstance(value, Mapping):
            raise LayoutError(f"{format_location(path)!r} is a {type(value).__name__}, not a state dict")
        return Layout.at(path)
    if recorded is not None:
        layout = Layout.from_name(recorded)
        if layout is not None and _fits(payload, layout):
            return layout
    if isinstance(payload, Mapping):
        if not payload:
            return Layout("bare")
        wrapped = [k for k in WRAPPER_KEYS if k in payload and is_tensor_dict(payload[k])]
        if wrapped:
            return Layout.at((wrapped[0],))
        values = payload.values()  # a state dict has many: C loops (a reference is no tensor dict)
        nested = set(map(type, values)) != {TensorRef} and any(map(is_tensor_dict, values))
        if any(is_entry(v) for v in payload.values()) and not nested:
            return Layout("bare")
        found = _candidates(payload)
        picked = _pick(found)
        if picked is not None:
            return Layout.at(picked)
        if found:
            names = ", ".join(format_location(p) for p in found[:8])
            raise LayoutError(f"several state dicts ({names}); name the model's with --key")
        top = ", ".join(map(str, list(payload)[:8]))
        raise LayoutError(f"no state dict found among the top-level keys [{top}]; name one with --key")
    if _module_state(payload) is not None:
        return Layout("module")
    name = "tensor" if is_entry(payload) else module_class(payload)
    raise LayoutError(f"the payload is a {name}, not a state dict or a checkpoint dict")


def _fits(payload: Any, layout: Layout) -> bool:
    if layout.kind == "module":
        return _module_state(payload) is not None
    if layout.kind == "bare":  # not a checkpoint dict an older detection took for a state dict
        if not isinstance(payload, Mapping):
            return False
        values = payload.values()  # a state dict of tensors alone is settled by one C loop
        return set(map(type, values)) == {TensorRef} or not any(map(is_tensor_dict, values))
    try:
        return isinstance(layout.state_dict(payload), Mapping)
    except (KeyError, LayoutError):
        return False
