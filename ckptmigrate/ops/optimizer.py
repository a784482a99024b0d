"""Optimizer state that follows the weights through a migration.

``torch.optim`` state dicts refer to parameters by index (their position across ``param_groups``),
so a rename, split or reshape of the weights must carry each parameter's ``exp_avg``,
``momentum_buffer``, ... along, and the indices must be renumbered for the new layout, or training
resumes with the moments of the wrong tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ckptmigrate.errors import BadInput
from ckptmigrate.tensors.refs import is_entry, shape_of, to_torch

OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt", "optimizer_state")
LIGHTNING_KEY = "optimizer_states"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
#: What happens to optimizer state when a migration adds a parameter: "strict" refuses, "reset_new"
#: gives it fresh state (none: torch initialises it on the first step) in its module's group. A
#: dropped parameter's state goes under either.
POLICIES = ("strict", "reset_new")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise BadInput(f"optimizer policy {policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def _is_optimizer(value: Any) -> bool:
    return (
        isinstance(value, dict) and isinstance(value.get("state"), dict)
        and isinstance(value.get("param_groups"), list)
    )


class OptimizerAlignmentError(ValueError):
    pass


class _Tracked:
    """One optimizer: each parameter's state and group, by state-dict key."""

    def __init__(self, opt: dict[str, Any], keys: list[str]) -> None:
        self.opt = opt
        self.state: dict[str, dict[str, Any]] = {}
        self.group: dict[str, int] = {}
        self.order: list[str] = []
        self.ids = [pid for group in opt["param_groups"] for pid in group["params"]]
        index = 0
        for g, group in enumerate(opt["param_groups"]):
            names = group.get("param_names")
            for j, pid in enumerate(group["params"]):
                key = names[j] if names and j < len(names) else keys[index]
                self.group[key] = g
                self.order.append(key)
                if pid in opt["state"]:
                    self.state[key] = opt["state"][pid]
                index += 1

    @property
    def count(self) -> int:
        return sum(len(g["params"]) for g in self.opt["param_groups"])

    @property
    def legacy(self) -> bool:
        """Parameters keyed by ``id(param)`` (old training code), not by position."""
        return self.ids != list(range(len(self.ids)))

    def restore_ids(self, ids: Sequence[Any]) -> None:
        """Key the parameters by the ids the original file used, in order."""
        if len(ids) != self.count:
            return
        for group in self.opt["param_groups"]:
            group["params"] = [ids[i] for i in group["params"]]
        self.opt["state"] = {ids[i]: s for i, s in self.opt["state"].items()}

    def finalize(self, keys: Sequence[str]) -> None:
        position = {k: i for i, k in enumerate(_module_order(keys))}
        tracked = sorted(self.group, key=lambda k: position.get(k, len(position)))
        self.final: list[str] = []
        state: dict[int, Any] = {}
        index = 0
        for g, group in enumerate(self.opt["param_groups"]):
            members = [k for k in tracked if self.group[k] == g]
            group["params"] = list(range(index, index + len(members)))
            if "param_names" in group:
                group["param_names"] = members
            self.final += members
            for i, k in zip(group["params"], members, strict=True):
                if k in self.state:
                    state[i] = self.state[k]
            index += len(members)
        self.opt["state"] = state


class OptimizerTrack:
    """All optimizers found in a checkpoint's extras, aligned to the state dict's parameter keys."""

    def __init__(self, tracked: list[_Tracked], problem: str | None = None) -> None:
        self.tracked = tracked
        self.problem = problem
        self.policy = "strict"

    @classmethod
    def find(
        cls, extras: Mapping[str, Any], keys: list[str], known: Sequence[Sequence[str]] | None = None,
    ) -> OptimizerTrack:
        """``known`` is each optimizer's parameter keys as an earlier migration recorded them (for
        state dicts whose buffers cannot be told from parameters by name)."""
        opts = [v for k, v in extras.items() if k in OPTIMIZER_KEYS and _is_optimizer(v)]
        lightning = extras.get(LIGHTNING_KEY)
        if isinstance(lightning, list):
            opts += [v for v in lightning if _is_optimizer(v)]
        if not opts:
            return cls([])
        tracked = []
        for i, opt in enumerate(opts):
            count = sum(len(g.get("params", [])) for g in opt["param_groups"])
            named = all("param_names" in g for g in opt["param_groups"])
            params = keys if named else _parameter_keys(_module_order(keys), count)
            if params is None and known is not None and i < len(known):
                recorded = list(known[i])
                params = recorded if len(recorded) == count and set(recorded) <= set(keys) else None
            if params is None:
                return cls([], (
                    f"the optimizer state covers {count} parameters but the state dict has "
                    f"{len(keys)} tensors; ckptmigrate cannot tell which are parameters"
                ))
            tracked.append(_Tracked(opt, params))
        return cls(tracked)

    def _check(self) -> None:
        if self.problem:
            raise OptimizerAlignmentError(self.problem)

    def rename(self, mapping: Mapping[str, str]) -> None:
        self._check()
        for t in self.tracked:
            t.group = {mapping.get(k, k): g for k, g in t.group.items()}
            t.state = {mapping.get(k, k): s for k, s in t.state.items()}

    def drop(self, keys: Sequence[str]) -> None:
        """Dropped parameters leave their group and lose their state, under either policy: the
        optimizer then covers exactly the parameters that are left."""
        self._check()
        for t in self.tracked:
            for k in keys:
                t.group.pop(k, None)
                t.state.pop(k, None)

    def add(self, keys: Sequence[str]) -> None:
        """New parameters join the group of their module's other parameters (else the first group)
        with no state, which torch initialises on the first step (``reset_new``)."""
        self._check()
        if not self.tracked or not keys:
            return
        if self.policy == "strict":
            raise OptimizerAlignmentError(
                f"add: {keys[0]!r} is a new parameter and the optimizer state has none for it. Pass "
                "optimizer=\"reset_new\" (--optimizer reset_new) to start it with fresh state, or "
                "parameter=False to ckpt.add for a buffer"
            )
        for t in self.tracked:
            for k in keys:
                module = k.rpartition(".")[0]
                sibling = next((g for o, g in t.group.items() if o.rpartition(".")[0] == module), 0)
                t.group[k] = sibling

    def parameter_keys(self) -> list[list[str]] | None:
        """Each optimizer's parameter keys in index order, when the state dict also holds tensors
        the optimizer does not cover (buffers): the record a later migration needs to align them."""
        if not self.tracked or all(len(getattr(t, "final", [])) == len(t.group) == 0 for t in self.tracked):
            return None
        return [list(getattr(t, "final", t.order)) for t in self.tracked]

    def legacy_ids(self) -> list[list[Any] | None] | None:
        """Each optimizer's original parameter ids when any was keyed by ``id(param)``, else None."""
        if not any(t.legacy for t in self.tracked):
            return None
        return [list(t.ids) if t.legacy else None for t in self.tracked]

    def restore_ids(self, ids: Sequence[Any]) -> None:
        for t, own in zip(self.tracked, ids, strict=False):
            if isinstance(own, list):
                t.restore_ids(own)

    def transform(
        self, src: Sequence[str], dst: Sequence[str], src_shape: tuple[int, ...],
        fn: Callable[[list[Any]], list[Any]], shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        """Apply the op that turned the weights ``src`` into ``dst`` to their per-parameter state."""
        self._check()
        shapes = list(shapes) if shapes is not None else [src_shape] * len(src)
        for t in self.tracked:
            if not any(k in t.group for k in src):
                continue
            group = next(t.group[k] for k in src if k in t.group)
            states = [t.state.get(k) for k in src]
            for k in src:
                t.group.pop(k, None)
                t.state.pop(k, None)
            for k in dst:
                t.group[k] = group
            if any(s is None for s in states):
                continue
            new_states: list[dict[str, Any]] = [{} for _ in dst]
            for name, first in states[0].items():  # type: ignore[union-attr]
                values = [s[name] for s in states]  # type: ignore[index]
                if all(is_entry(v) and shape_of(v) == sh for v, sh in zip(values, shapes, strict=True)):
                    outs = fn([to_torch(v) for v in values])
                    for ns, out in zip(new_states, outs, strict=True):
                        ns[name] = out.contiguous().clone()
                else:  # e.g. Adam's ``step``: each part gets its own, torch increments it in place
                    for ns in new_states:
                        ns[name] = to_torch(first).clone() if is_entry(first) else first
            for k, ns in zip(dst, new_states, strict=True):
                t.state[k] = ns

    def finalize(self, keys: Sequence[str]) -> None:
        """Renumber every optimizer's parameters to the final order of the state dict."""
        for t in self.tracked:
            t.finalize(keys)


def _module_order(keys: Sequence[str]) -> list[str]:
    """Each module's tensors together, modules in order of first appearance: ``nn.Module.parameters()``
    order, also after a split left ``q.weight, k.weight, v.weight, q.bias, k.bias, v.bias``."""
    modules: dict[str, list[str]] = {}
    for k in keys:
        modules.setdefault(k.rpartition(".")[0], []).append(k)
    return [k for members in modules.values() for k in members]


def _parameter_keys(keys: list[str], count: int) -> list[str] | None:
    if len(keys) == count:
        return keys
    params = [k for k in keys if not k.endswith(BUFFER_SUFFIXES)]
    return params if len(params) == count else None
