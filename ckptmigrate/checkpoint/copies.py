"""The other copies of the model's weights in a checkpoint: EMA, SWA, best, teacher/student.

A copy is a dict of tensors elsewhere in the payload whose keys are the state dict's, possibly
under a prefix (``AveragedModel`` adds ``module.`` and an ``n_averaged`` counter). A migration
replays on each copy the ops it ran on the state dict, and each copy keeps its own inverse journal,
so an upgrade leaves no copy behind and a downgrade restores each exactly. A dict that looks like a
copy but does not fit is an error naming it, never silently left at the old revision.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptmigrate.checkpoint.envelope import schema_of
from ckptmigrate.checkpoint.layout import (
    Layout,
    LayoutError,
    Path_,
    format_location,
    get_at,
    is_optimizer,
    is_tensor_dict,
    resolve,
)
from ckptmigrate.ops.architecture import ArchitectureOps
from ckptmigrate.tensors.state_dict import LazyStateDict


@dataclass(frozen=True)
class Misfit:
    """A dict that looks like a copy of the weights but does not fit the state dict."""

    location: str
    message: str
    schema: dict[str, dict[str, Any]]

    def __str__(self) -> str:
        return self.message


#: How deep the search for copies goes (Lightning: callbacks → callback state → ema_state_dict).
MAX_DEPTH = 6


class StateDictCopy(ArchitectureOps):
    """One copy, as a migration edits it: the same ops as the state dict, its own journal."""

    def __init__(self, path: Path_, source: MutableMapping[str, Any], prefix: str) -> None:
        #: The checkpoint it belongs to, whose ``config`` (head counts, ...) the ops read.
        self.owner: Any = None
        self.where = path
        self.location = format_location(path)
        self.source = source
        self.prefix = prefix
        entries: MutableMapping[str, Any] = source
        if prefix:
            entries = OrderedDict((k[len(prefix):], v) for k, v in source.items() if _under(k, prefix))
        self.state_dict = LazyStateDict(entries)
        self.extras: dict[str, Any] = {}
        super().__init__()

    @property
    def config(self) -> dict[str, Any]:
        return getattr(self.owner, "config", None) or {}

    def _pickle_roots(self) -> list[Any] | None:
        """None: a copy is part of its file, whose own ``rename_global``/``sanitize`` covered it."""
        return None

    def schema(self) -> dict[str, dict[str, Any]]:
        """The copy's keys, shapes and dtypes (after the prefix), to compare with the state dict's."""
        return schema_of(self.state_dict.entries)

    def commit(self) -> None:
        """Put the edited keys back under the prefix, where the first of them was."""
        if not self.prefix:
            return
        items = list(self.source.items())
        at = next((i for i, (k, _) in enumerate(items) if _under(k, self.prefix)), len(items))
        kept = [(k, v) for k, v in items if not _under(k, self.prefix)]
        ours = [(self.prefix + k, v) for k, v in self.state_dict.entries.items()]
        before = sum(1 for k, _ in items[:at] if not _under(k, self.prefix))
        self.source.clear()
        for k, v in kept[:before] + ours + kept[before:]:
            self.source[k] = v


def _under(key: Any, prefix: str) -> bool:
    return isinstance(key, str) and key.startswith(prefix)


def _align(candidate: Mapping[Any, Any], main: Sequence[str]) -> tuple[str, int]:
    """The prefix under which most of ``candidate``'s keys are the state dict's, and how many."""
    keys = [k for k in candidate if isinstance(k, str)]
    main_set = set(main)
    prefixes = {""}
    for m in main[:3]:
        prefixes.update(k[: -len(m)] for k in keys if k.endswith("." + m))
    best = ("", 0)
    for p in sorted(prefixes):
        shared = sum(1 for k in keys if k.startswith(p) and k[len(p):] in main_set)
        if shared > best[1]:
            best = (p, shared)
    return best


def _stripped(candidate: Mapping[Any, Any], main: Sequence[str]) -> tuple[str, int]:
    """A prefix the state dict's keys have and the candidate's lack (``module.`` from DDP), and how
    many keys agree without it: such a copy cannot replay ops written for the prefixed keys."""
    keys = [k for k in candidate if isinstance(k, str)]
    if not keys:
        return "", 0
    prefixes = {m[: -len(keys[0])] for m in main if m.endswith("." + keys[0])}
    prefixes = {q for q in prefixes if all(m.startswith(q) for m in main)}  # a wrapper's, on every key
    best = ("", 0)
    main_set = set(main)
    for q in sorted(prefixes):
        shared = sum(1 for k in keys if q + k in main_set)
        if shared > best[1]:
            best = (q, shared)
    return best


def schema_difference(got: Mapping[str, Any], want: Mapping[str, Any]) -> str:
    """The first few keys missing, unexpected and of another shape or dtype, on one line."""
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    reshaped = sorted(k for k in got.keys() & want.keys() if got[k] != want[k])
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"unexpected {extra[:3]}")
    if reshaped:
        parts.append(f"different shape/dtype {reshaped[:3]}")
    return "; ".join(parts)


def _walk(node: Any, path: Path_, skip: Path_, depth: int = 0) -> list[tuple[Path_, Mapping[Any, Any]]]:
    """Tensor dicts in the payload, outside the state dict and optimizer state."""
    if depth > MAX_DEPTH or path == skip:
        return []
    if isinstance(node, Mapping):
        if path and is_tensor_dict(node):
            return [(path, node)]
        if is_optimizer(node):
            return []
        items = [(k, v) for k, v in node.items() if isinstance(k, str)]
    elif isinstance(node, list):
        items = [(str(i), v) for i, v in enumerate(node)]
    else:
        return []
    out = []
    for k, v in items:
        out += _walk(v, (*path, k), skip, depth + 1)
    return out


def find(
    payload: Any, layout: Layout, main: Mapping[str, Any], declared: Sequence[str] | None = None,
) -> tuple[list[StateDictCopy], list[Misfit], list[Misfit]]:
    """Every copy of the state dict in ``payload``; ``declared`` names them instead of searching.

    Returns the copies, the problems — each a dict found that looks like a copy but does not fit
    the state dict's schema (a migration must refuse to leave it behind; ``inspect`` reports it) —
    and the other dicts of tensors, which the engine compares with the revisions' schemas (a copy
    an earlier upgrade left at an old revision shares few keys with today's). A declared location
    that is not there or does not fit raises LayoutError.
    """
    if layout.kind != "key" or not isinstance(payload, Mapping):
        if declared:
            raise LayoutError(
                f"the state dict is the whole payload ({layout.name}); there is no {declared[0]!r} beside it"
            )
        return [], [], []
    keys = [k for k in main if isinstance(k, str)]
    schema = schema_of(main)
    copies = []
    if declared is not None:
        for text in declared:
            try:
                path = resolve(payload, text)
                node = get_at(payload, path)
            except KeyError as exc:
                raise LayoutError(f"has no state dict at {text!r} (no {exc.args[0]!r})") from None
            if path == layout.path:
                continue
            if not isinstance(node, MutableMapping) or not is_tensor_dict(node):
                raise LayoutError(f"{format_location(path)!r} is not a dict of tensors")
            prefix, _ = _align(node, keys)
            copies.append(_fitting(path, node, prefix, schema, declared=True))
        return copies, [], []
    problems: list[Misfit] = []
    others: list[Misfit] = []
    for path, node in _walk(payload, (), layout.path):
        prefix, shared = _align(node, keys)
        size = sum(1 for k in node if isinstance(k, str) and k.startswith(prefix))
        # a copy of the weights: most of its keys are the model's, and it holds most of the model
        if shared and 2 * shared >= max(size, len(keys)) and isinstance(node, MutableMapping):
            try:
                copies.append(_fitting(path, node, prefix, schema, declared=False))
            except LayoutError as exc:
                sub = {k[len(prefix):]: v for k, v in node.items() if isinstance(k, str) and k.startswith(prefix)}
                problems.append(Misfit(format_location(path), str(exc), schema_of(sub)))
            continue
        wrapper, agree = _stripped(node, keys)
        if agree and 2 * agree >= max(len(node), len(keys)):
            problems.append(Misfit(format_location(path), (
                f"{format_location(path)!r} looks like a copy of the weights, but its keys are the state "
                f"dict's without the prefix {wrapper!r}, so the migration's ops cannot apply to it; "
                "declare the state dicts to migrate with --state-dict (or [tool.ckptmigrate] state_dicts)"
            ), schema_of(node)))
            continue
        others.append(Misfit(format_location(path), f"{format_location(path)!r} is a dict of tensors", schema_of(node)))
    return copies, problems, others


def _fitting(path: Path_, node: MutableMapping[str, Any], prefix: str, schema: Mapping[str, Any],
             *, declared: bool) -> StateDictCopy:
    copy = StateDictCopy(path, node, prefix)
    got = copy.schema()
    if got != schema:
        under = f" under {prefix!r}" if prefix else ""
        how = "is declared a state dict" if declared else "looks like a copy of the weights"
        raise LayoutError(
            f"{copy.location!r} {how}{under} but does not fit the state dict ({schema_difference(got, schema)}), "
            "so a migration would leave it behind; make it fit, or declare the state dicts to migrate "
            "with --state-dict (or [tool.ckptmigrate] state_dicts)"
        )
    return copy
