"""The Python API reference as Markdown, from the docstrings: ``python scripts/api_reference.py > docs/api.md``.

The public API is what ``ckptmigrate`` exports (``__all__``), the ``Checkpoint``
``ckptmigrate.load`` hands you, the ``MigrationContext`` a migration script receives, and the ops
it calls on either. A test fails when a
public name has no docstring or when the committed page differs from what the code says.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from typing import Any

import ckptmigrate
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.ops.architecture import ArchitectureOps
from ckptmigrate.ops.context import MigrationContext
from ckptmigrate.ops.operations import Operations
from ckptmigrate.ops.pickle_globals import PickleOps


def public_objects() -> Iterator[tuple[str, Any]]:
    """(qualified name, object) for every documented public name."""
    for name in sorted(ckptmigrate.__all__):
        yield f"ckptmigrate.{name}", getattr(ckptmigrate, name)
    from ckptmigrate import api, testing

    for name in sorted(set(api.__all__) - set(ckptmigrate.__all__)):  # every command as a function
        yield f"ckptmigrate.api.{name}", getattr(api, name)
    from ckptmigrate import fleet

    for name in sorted(fleet.__all__):
        yield f"ckptmigrate.fleet.{name}", getattr(fleet, name)
    for name in ("check_chain", "record_fixture", "ChainBroken"):
        yield f"ckptmigrate.testing.{name}", getattr(testing, name)
    ops = (Operations, ArchitectureOps, PickleOps)
    for cls, prefix in (*((op, "ckpt") for op in ops), (MigrationContext, "ckpt"), (Checkpoint, "Checkpoint")):
        for name, member in sorted(vars(cls).items()):
            if name.startswith("_") or not (inspect.isfunction(member) or isinstance(member, (property, classmethod))):
                continue
            if cls is Checkpoint and any(name in vars(op) for op in ops):
                continue
            yield f"{prefix}.{name}", member


def _signature(obj: Any) -> str:
    target = obj.__func__ if isinstance(obj, classmethod) else obj
    if isinstance(target, property) or not callable(target):
        return ""
    try:
        sig = str(inspect.signature(target))
    except (TypeError, ValueError):
        return ""
    return sig.replace("(self, ", "(").replace("(self)", "()").replace("(cls, ", "(").replace("(cls)", "()")


def docstring(obj: Any) -> str:
    target = obj.__func__ if isinstance(obj, classmethod) else obj
    return inspect.cleandoc(target.__doc__ or "")


def render() -> str:
    lines = ["# ckptmigrate Python API", "",
             "Generated from the docstrings (`python scripts/api_reference.py > docs/api.md`).", ""]
    section = None
    for qualname, obj in public_objects():
        head = ("testing" if qualname.startswith("ckptmigrate.testing.")
                else "fleet" if qualname.startswith("ckptmigrate.fleet.")
                else "api" if qualname.startswith("ckptmigrate.api.") else qualname.split(".")[0])
        if head != section:
            section = head
            lines += [{"ckptmigrate": "## `ckptmigrate`", "ckpt": "## Ops: what a migration script calls on `ckpt`",
                       "Checkpoint": "## `Checkpoint`", "testing": "## `ckptmigrate.testing`",
                       "api": "## `ckptmigrate.api`: every command as a function",
                       "fleet": "## `ckptmigrate.fleet`: many checkpoints at once, as the CLI's fleet options"}[head],
                      ""]
        kind = "class " if inspect.isclass(obj) else ""
        lines += [f"### `{kind}{qualname}{_signature(obj)}`", "", docstring(obj), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
