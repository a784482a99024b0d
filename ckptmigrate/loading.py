"""Loading a checkpoint into a model: automatic upgrade, selective loading and a readable report."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ckptmigrate.errors import BadInput
from ckptmigrate.report import group_keys

if TYPE_CHECKING:
    from torch import nn

    from ckptmigrate.checkpoint import Checkpoint

Patterns = str | Sequence[str] | None


def _matches(key: str, patterns: Patterns) -> bool:
    if patterns is None:
        return True
    for p in [patterns] if isinstance(patterns, str) else patterns:
        if key == p or key.startswith(p + ".") or re.fullmatch(p, key):
            return True
    return False


@dataclass
class LoadReport:
    """What a load did: keys loaded, missing, unexpected and shape-mismatched, and the revisions run."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    revision: str | None = None
    head: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"
                 + (f" after upgrading through {', '.join(self.applied)}" if self.applied else "")]
        if self.revision or self.head:
            lines.append(f"checkpoint at revision {self.revision or 'unstamped'}; head is {self.head or '-'}")
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"{label} ({len(keys)}):")
                lines += [f"  {g}" for g in group_keys(keys)]
        if self.mismatched:
            lines.append(f"shape mismatch ({len(self.mismatched)}):")
            lines += [f"  {k}: checkpoint {c}, model {m}" for k, c, m in self.mismatched[:20]]
        return "\n".join(lines)


def load_state_dict(
    model: nn.Module, path_or_checkpoint: str | os.PathLike[str] | Checkpoint, *,
    migrations: Any = None, strict: bool | Literal["compatible"] = True,
    include: Patterns = None, exclude: Patterns = None, map_location: Any = None,
) -> LoadReport:
    """Load a checkpoint (upgraded in memory to head) into ``model``.

    ``include``/``exclude`` pick parameters by key, prefix or regex, strictly over that subset;
    ``strict="compatible"`` loads every key whose name and shape match and reports the rest.
    """
    from ckptmigrate.api import load
    from ckptmigrate.checkpoint import Checkpoint

    ckpt = path_or_checkpoint if isinstance(path_or_checkpoint, Checkpoint) else load(
        path_or_checkpoint, migrations=migrations, map_location=map_location
    )
    source = ckpt.materialize()
    expected = model.state_dict()
    wanted = [k for k in expected if _matches(k, include) and not (exclude and _matches(k, exclude))]
    given = [k for k in source if _matches(k, include) and not (exclude and _matches(k, exclude))]
    report = LoadReport(applied=list(ckpt.applied), revision=ckpt.revision, head=ckpt.head_revision)
    report.missing = [k for k in wanted if k not in source]
    report.unexpected = [k for k in given if k not in expected]
    for k in wanted:
        if k in source and tuple(source[k].shape) != tuple(expected[k].shape):
            report.mismatched.append((k, list(source[k].shape), list(expected[k].shape)))
    bad = {k for k, _, _ in report.mismatched}
    chosen = {k: source[k] for k in wanted if k in source and k not in bad}
    if strict is True and not report.ok:
        raise BadInput(f"{ckpt.path}: the checkpoint does not fit the model\n{report}")
    meta = getattr(source, "_metadata", None)
    from collections import OrderedDict

    to_load: OrderedDict[str, Any] = OrderedDict(chosen)
    if meta is not None:
        to_load._metadata = meta  # type: ignore[attr-defined]
    model.load_state_dict(to_load, strict=False)
    report.loaded = list(chosen)
    return report
