"""Resume distributed training from an old DCP checkpoint: ``ckptmigrate.dcp.load``, called on every
rank like ``torch.distributed.checkpoint.load``, upgrades the checkpoint in memory on the way in.

Nothing is rewritten. Every rank reads ``.metadata`` (no tensor bytes) and runs the migration chain
on the lazy checkpoint. A value a migration only renamed (or left alone) is loaded by DCP itself
under its old name into the caller's tensor — a key translation, so each rank reads only the chunks
its shards need, and DTensors are resharded as DCP does. A value a migration changed (a transpose,
a ``map``) is computed whole on each rank and copied into the caller's tensor (its local shard, for
a DTensor): memory per rank is bounded by the largest such tensor.
"""

from __future__ import annotations

import os
from typing import Any

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput


def load(
    state_dict: dict[str, Any], *, checkpoint_id: str | os.PathLike[str], migrations: Any = None,
    to: str = "head", from_rev: str | None = None, process_group: Any = None,
) -> list[str]:
    """Load the DCP checkpoint ``checkpoint_id`` into ``state_dict`` in place (as ``dcp.load`` does),
    upgraded to ``to`` through ``migrations``; return the revisions applied."""
    import torch.distributed.checkpoint as dcp

    from ckptmigrate import api
    from ckptmigrate.chain.engine import apply
    from ckptmigrate.chain.planning import plan_for
    from ckptmigrate.formats.dcp import Dcp, flatten

    with Checkpoint.open(checkpoint_id) as ckpt:
        parts = ckpt.container.parts
        if not isinstance(parts, Dcp):
            raise BadInput(f"{checkpoint_id}: not a torch.distributed.checkpoint directory ({ckpt.format})")
        graph = api.revision_graph(migrations)
        applied: list[str] = []
        if len(graph):
            plan = plan_for(ckpt, graph, to=to, from_rev=from_rev)
            if plan.steps:
                apply(ckpt, plan)
                applied = [rev.id for rev in plan.steps]
        migrated = {fqn: value for fqn, _path, value in flatten(ckpt.payload())}
        wanted = flatten(state_dict)
        missing = [fqn for fqn, _p, _v in wanted if fqn not in migrated]
        if missing:
            raise BadInput(f"{checkpoint_id}: the checkpoint (at {to}) has no {missing[:5]}"
                           + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        by_old_name: dict[str, Any] = {}
        where: dict[str, tuple[Any, ...]] = {}
        computed = []
        for fqn, path, target in wanted:
            value = migrated[fqn]
            origin = parts.origin.get(id(value))
            if origin is not None:
                by_old_name[origin[0]] = target
                where[origin[0]] = path
            else:
                computed.append((fqn, target, value))
        if by_old_name:
            dcp.load(by_old_name, checkpoint_id=os.fspath(ckpt.path), process_group=process_group)
            for old, path in where.items():  # DCP replaces non-tensor values rather than copying into them
                _set(state_dict, path, by_old_name[old])
        for fqn, target, value in computed:
            _copy_into(fqn, target, value)
    return applied


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
    node = root
    for part in path[:-1]:
        node = node[part]
    if node[path[-1]] is not value:
        node[path[-1]] = value


def _copy_into(fqn: str, target: Any, value: Any) -> None:
    """A migrated value into the caller's tensor: the whole tensor, or a DTensor's local shard."""
    import torch

    from ckptmigrate.tensors.refs import is_entry, to_torch

    if not is_entry(value):
        raise BadInput(f"{fqn}: a migration changed a non-tensor value, which cannot be loaded in place")
    full = to_torch(value)
    if not isinstance(target, torch.Tensor):
        raise BadInput(f"{fqn}: the checkpoint holds a tensor, the state dict {type(target).__name__}")
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = None  # type: ignore[assignment,misc]  # noqa: N806
    if DTensor is not None and isinstance(target, DTensor):
        local = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements).to_local()
        target.to_local().copy_(local)
        return
    if tuple(target.shape) != tuple(full.shape):
        raise BadInput(f"{fqn}: the checkpoint's tensor is {tuple(full.shape)}, the state dict's {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(full)
