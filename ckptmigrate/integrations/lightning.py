"""Lightning integration (``pip install ckptmigrate[lightning]``).

``Trainer(callbacks=[MigrationCallback(migrations=...)]).fit(model, ckpt_path=old)`` resumes from a
checkpoint written by older model code: the callback makes the module's ``on_load_checkpoint``
upgrade the checkpoint dict — weights and optimizer states — before Lightning loads it. For
``Model.load_from_checkpoint(old)``, which runs no callbacks, use :func:`ckptmigrate.attach` on the
class, or call :func:`upgrade_checkpoint` from your own ``on_load_checkpoint``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from ckptmigrate.errors import SchemaMismatch


def upgrade_checkpoint(
    checkpoint: dict[str, Any], migrations: Any = None, module: Any = None
) -> list[str]:
    """Upgrade a Lightning checkpoint dict in place; return the revisions applied (none if it fits).

    With ``module``, its state-dict order is the order optimizer state is renumbered in, a checkpoint
    that already fits it is left alone, and one that fits no revision, or still not the module after
    its upgrade, raises :class:`~ckptmigrate.errors.SchemaMismatch` with the same diagnosis as
    :func:`ckptmigrate.load_state_dict` (unless the module loads with ``strict_loading = False``).
    """
    from ckptmigrate.api import chain_source
    from ckptmigrate.chain.engine import apply
    from ckptmigrate.chain.planning import plan_for
    from ckptmigrate.checkpoint.lazy import Checkpoint
    from ckptmigrate.integrations.loading import diagnose, mismatch

    name = "<lightning checkpoint>"
    strict = module is None or getattr(module, "strict_loading", True) is not False
    if module is not None and set(checkpoint.get("state_dict") or {}) == set(module.state_dict()):
        return []
    ckpt = Checkpoint.from_payload(checkpoint, name=name, key="state_dict")
    graph = chain_source(migrations).for_envelope(ckpt.envelope)  # configured, else the installed chains
    try:
        plan = plan_for(ckpt, graph)
    except SchemaMismatch:
        if not strict:
            return []
        raise
    if not plan.steps:
        return []
    apply(ckpt, plan, order=list(module.state_dict()) if module is not None else None)
    upgraded = ckpt.materialize()
    if module is not None and strict and set(upgraded) != set(module.state_dict()):
        raise mismatch(name, diagnose(module, upgraded))
    checkpoint["state_dict"] = upgraded
    ckpt.materialize_copies()  # an EMA callback's copy, upgraded with the weights
    for key, value in ckpt.extras.items():
        checkpoint[key] = value
    return list(ckpt.applied)


class MigrationCallback(pl.Callback):
    """Upgrades the checkpoint a Trainer resumes from (``fit(ckpt_path=...)``)."""

    def __init__(self, migrations: Any = None) -> None:
        self.migrations = migrations
        self.applied: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self.applied = upgrade_checkpoint(checkpoint, self.migrations, pl_module)
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
