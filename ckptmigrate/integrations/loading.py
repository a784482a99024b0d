"""Loading a checkpoint into a model: automatic upgrade, selective loading and a readable report."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ckptmigrate.errors import SchemaMismatch
from ckptmigrate.util.keygroups import group_keys

if TYPE_CHECKING:
    from torch import nn

    from ckptmigrate.checkpoint.lazy import Checkpoint

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
    causes: list[str] = field(default_factory=list)

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
        if self.causes:
            lines.append("likely causes:")
            lines += [f"  {c}" for c in self.causes]
        return "\n".join(lines)


WRAPPERS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def likely_causes(
    report: LoadReport, given: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
    tied: dict[str, str],
) -> list[str]:
    """Explanations for a mismatch: a wrapper prefix, renamed or transposed tensors, tied weights."""
    causes: list[str] = []
    for prefix in WRAPPERS:
        if given and all(k.startswith(prefix) for k in given):
            stripped = {k[len(prefix):] for k in given}
            if stripped & set(expected):
                causes.append(f"every checkpoint key starts with {prefix!r}: saved from a wrapped model; "
                              f"a migration with ckpt.unwrap({prefix!r}) fixes it")
    unexpected = list(report.unexpected)
    for key in report.missing:
        if key in tied:
            causes.append(f"{key} is tied to {tied[key]} (shared weight), which is missing too")
            continue
        if causes and causes[0].startswith("every checkpoint key"):
            continue
        same_shape = [u for u in unexpected if given.get(u) == expected.get(key)]
        close = difflib.get_close_matches(key, same_shape, n=1, cutoff=0.6)
        if close:
            causes.append(f"{key} is probably the checkpoint's {close[0]} (same shape, similar name)")
    for key, ckpt_shape, model_shape in report.mismatched:
        if len(ckpt_shape) == 2 and ckpt_shape[::-1] == model_shape:
            causes.append(f"{key} looks transposed ({ckpt_shape} vs {model_shape}): ckpt.transpose({key!r}, 0, 1)")
    return causes[:10]


def _tied(model: nn.Module) -> dict[str, str]:
    """Parameter names that share storage with an earlier one (``lm_head.weight`` → ``wte.weight``)."""
    import torch

    first: dict[int, str] = {}
    tied = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or tensor.is_quantized:
            continue  # a quantized module's packed params, a dtype: nothing to tie
        ptr = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if ptr in first and ptr != 0:
            tied[name] = first[ptr]
        else:
            first.setdefault(ptr, name)
    return tied


def diagnose(model: nn.Module, source: Mapping[str, Any], *, include: Patterns = None,
             exclude: Patterns = None) -> LoadReport:
    """How ``source`` fits ``model``: missing, unexpected and shape-mismatched keys, and their likely causes
    (the same report on every loading path: ``load_state_dict``, ``attach``, the Lightning callback)."""
    expected = model.state_dict()
    wanted = [k for k in expected if _matches(k, include) and not (exclude and _matches(k, exclude))]
    given = [k for k in source if _matches(k, include) and not (exclude and _matches(k, exclude))]
    report = LoadReport()
    report.missing = [k for k in wanted if k not in source]
    report.unexpected = [k for k in given if k not in expected]
    for k in wanted:
        if k in source and hasattr(source[k], "shape") and hasattr(expected[k], "shape") and (
                tuple(source[k].shape) != tuple(expected[k].shape)):
            report.mismatched.append((k, list(source[k].shape), list(expected[k].shape)))
    tied = _tied(model)
    report.missing = [k for k in report.missing if not (k in tied and tied[k] in source)]
    report.causes = likely_causes(
        report, {k: tuple(v.shape) for k, v in source.items() if hasattr(v, "shape")},
        {k: tuple(v.shape) for k, v in expected.items() if hasattr(v, "shape")}, tied,
    )
    return report


def mismatch(name: str | os.PathLike[str], report: LoadReport) -> SchemaMismatch:
    """The error for a checkpoint that does not fit the model, with the report's keys as fields."""
    return SchemaMismatch(f"{os.fspath(name)}: the checkpoint does not fit the model\n{report}", path=name,
                          nearest=report.revision, missing=report.missing, unexpected=report.unexpected,
                          reshaped=[k for k, _, _ in report.mismatched])


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
    from ckptmigrate.checkpoint.lazy import Checkpoint

    ckpt = path_or_checkpoint if isinstance(path_or_checkpoint, Checkpoint) else load(
        path_or_checkpoint, migrations=migrations, map_location=map_location
    )
    source = ckpt.materialize()
    expected = model.state_dict()
    report = diagnose(model, source, include=include, exclude=exclude)
    report.applied, report.revision, report.head = list(ckpt.applied), ckpt.revision, ckpt.head_revision
    wanted = [k for k in expected if _matches(k, include) and not (exclude and _matches(k, exclude))]
    bad = {k for k, _, _ in report.mismatched}
    chosen = {k: source[k] for k in wanted if k in source and k not in bad}
    if strict is True and not report.ok:
        raise mismatch(ckpt.path, report)
    meta = getattr(source, "_metadata", None)
    from collections import OrderedDict

    to_load: OrderedDict[str, Any] = OrderedDict(chosen)
    if meta is not None:
        to_load._metadata = meta  # type: ignore[attr-defined]
    model.load_state_dict(to_load, strict=False)
    report.loaded = list(chosen)
    return report
