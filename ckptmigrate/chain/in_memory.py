"""Upgrading an open checkpoint in memory, as ``ckptmigrate.load`` does: the version notes and the
unsafe-pickle warning, the chain (configured, or the installed one that knows the file), the plan
and its steps run on the lazy state dict; the file on disk is not touched."""

from __future__ import annotations

import warnings
from typing import Any

from ckptmigrate.chain import project
from ckptmigrate.chain.engine import apply, new_envelope
from ckptmigrate.chain.planning import plan_for
from ckptmigrate.checkpoint.compat import version_notes
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import SchemaMismatch, UnsafePickleWarning


def upgrade_in_memory(
    ckpt: Checkpoint, policy: str, map_location: Any, mmap: bool, trust_pickle: bool, migrations: Any, to: str,
    from_rev: str | None,
) -> Checkpoint:
    """``ckpt`` upgraded to ``to`` with the options of :func:`ckptmigrate.api.load`; its warnings
    point at load's caller."""
    import torch

    ckpt.optimizers.policy = policy
    ckpt.map_location = map_location
    ckpt.mmap = mmap
    notes = version_notes(
        ckpt.metadata, ckpt.summary()["devices"], torch_version=torch.__version__,
        cuda_available=torch.cuda.is_available(), cuda_version=torch.version.cuda,
    )
    for note in notes:
        warnings.warn(f"{ckpt.path}: {note}", stacklevel=2)
    safety = ckpt.pickle_safety()
    if not safety.weights_only:
        warnings.warn(
            f"{ckpt.path}: its pickle names {', '.join(safety.unsafe[:5])}"
            f"{f' (+{len(safety.unsafe) - 5} more)' if len(safety.unsafe) > 5 else ''}, outside torch's "
            "weights_only allow-list: ckptmigrate keeps them inert, torch.load(weights_only=False) would run them",
            UnsafePickleWarning, stacklevel=2,
        )
    if trust_pickle:
        ckpt.trust_pickle()
    graph = project.optional_graph(migrations, ckpt)
    if graph is None or not len(graph):
        return ckpt
    try:
        plan = plan_for(ckpt, graph, to=to, from_rev=from_rev)
    except SchemaMismatch:
        if not project.configured(migrations):
            return ckpt  # a file no installed chain recognises is another model's: loaded as it is
        raise
    ckpt.head_revision = graph.head(plan.lineage).id
    if not plan.steps and ckpt.copy_problems:
        warnings.warn(f"{ckpt.path}: {ckpt.copy_problems[0]}", stacklevel=3)
    if plan.steps:
        history = apply(ckpt, plan)
        ckpt.envelope = new_envelope(ckpt, plan, history, written=False)
    return ckpt
