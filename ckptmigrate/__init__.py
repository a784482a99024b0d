"""ckptmigrate: Alembic for PyTorch checkpoints.

Importing the package does not import torch; the functions below import it when they need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ckptmigrate.errors import (
    BadInput,
    CheckFailed,
    CkptMigrateError,
    CkptMigrateWarning,
    MigrationError,
    MultiFileObject,
    ObjectChanged,
    OutputExists,
    RemoteError,
    RevisionError,
    SchemaMismatch,
)
from ckptmigrate.version import __version__ as __version__

__all__ = [
    "BadInput", "CheckFailed", "Checkpoint", "CkptMigrateError", "CkptMigrateWarning", "LoadReport",
    "MigrationContext", "MigrationError", "MultiFileObject", "ObjectChanged", "OpError", "OutputExists",
    "RemoteError", "RevisionError", "SchemaMismatch", "attach", "dcp", "inspect", "load", "load_state_dict", "op",
    "save", "stamp",
]

if TYPE_CHECKING:
    from ckptmigrate.api import inspect, load, save, stamp
    from ckptmigrate.checkpoint.lazy import Checkpoint
    from ckptmigrate.integrations.hooks import attach
    from ckptmigrate.integrations.loading import LoadReport, load_state_dict
    from ckptmigrate.ops.context import MigrationContext
    from ckptmigrate.ops.operations import OpError
    from ckptmigrate.ops.registry import op


def __getattr__(name: str) -> Any:
    if name in ("inspect", "load", "save", "stamp"):
        from ckptmigrate import api

        return getattr(api, name)
    if name in ("load_state_dict", "LoadReport"):
        from ckptmigrate.integrations import loading

        return getattr(loading, name)
    if name == "attach":
        from ckptmigrate.integrations.hooks import attach

        return attach
    if name == "OpError":  # raised by the ops a script (or your code) calls on a Checkpoint
        from ckptmigrate.ops.operations import OpError

        return OpError
    if name == "op":  # @ckptmigrate.op registers an op of a project's own (ckptmigrate.ops.registry)
        from ckptmigrate.ops.registry import op

        return op
    if name == "MigrationContext":  # what a migration script's upgrade(ckpt) receives
        from ckptmigrate.ops.context import MigrationContext

        return MigrationContext
    if name == "dcp":  # ckptmigrate.dcp.load: resume distributed training across a migration
        from ckptmigrate.integrations import dcp

        return dcp
    if name == "Checkpoint":
        from ckptmigrate.checkpoint.lazy import Checkpoint

        return Checkpoint
    raise AttributeError(f"module 'ckptmigrate' has no attribute {name!r}")
