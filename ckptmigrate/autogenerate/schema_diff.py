"""What changed between two schemas, as ``ckptmigrate diff`` and a refused stamp show it: added,
removed, reshaped and renamed keys, grouped by module prefix. :func:`ckptmigrate.autogenerate.plan.diff_schemas`
computes it (the renames are the plan's)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptmigrate.autogenerate.keys import Sig, sig
from ckptmigrate.util.keygroups import group_keys


@dataclass
class SchemaDiff:
    """What changed between two schemas; ``added``/``removed`` leave out the keys explained as renames."""

    added: dict[str, dict[str, Any]]
    removed: dict[str, dict[str, Any]]
    reshaped: dict[str, tuple[dict[str, Any], dict[str, Any]]]
    renamed: dict[str, str]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.reshaped or self.renamed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "added": {k: _entry(v) for k, v in self.added.items()},
            "removed": {k: _entry(v) for k, v in self.removed.items()},
            "reshaped": {k: {"old": _entry(o), "new": _entry(n)} for k, (o, n) in self.reshaped.items()},
            "renamed": dict(self.renamed),
        }

    def lines(self) -> list[str]:
        """A few lines grouped by module prefix: ``added     layers.{0..11}.attn.{k,q,v}.weight  [64, 64] float32``."""
        out = [f"renamed   {o} -> {n}" for o, n in _rename_lines(self.renamed)]
        for label, entries in (("removed", self.removed), ("added", self.added)):
            by_sig: dict[Sig, list[str]] = {}
            for key, e in entries.items():
                by_sig.setdefault(sig(e), []).append(key)
            out += [f"{label:<9} {line}  {_fmt(sig)}" for sig, keys in by_sig.items() for line in group_keys(keys)]
        pairs: dict[tuple[Sig, Sig], list[str]] = {}
        for key, (o, n) in self.reshaped.items():
            pairs.setdefault((sig(o), sig(n)), []).append(key)
        out += [f"reshaped  {line}  {_fmt(o)} -> {_fmt(n)}" for (o, n), ks in pairs.items() for line in group_keys(ks)]
        return out


def _entry(e: Mapping[str, Any]) -> dict[str, Any]:
    return {"shape": [int(d) for d in e["shape"]], "dtype": str(e["dtype"])}


def _fmt(sig: Sig) -> str:
    return f"{list(sig[0])} {sig[1]}"


def _rename_lines(renamed: Mapping[str, str]) -> list[tuple[str, str]]:
    """Renames grouped by the prefix change they share, each side as ``group_keys`` lines."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for o, n in renamed.items():
        os_, ns = o.split("."), n.split(".")
        c = 0
        while c < min(len(os_), len(ns)) - 1 and os_[-1 - c] == ns[-1 - c]:
            c += 1
        sig = tuple(".".join("#" if s.isdigit() else s for s in segs[: len(segs) - c]) for segs in (os_, ns))
        groups.setdefault((sig[0], sig[1]), []).append((o, n))
    out: list[tuple[str, str]] = []
    for pairs in groups.values():
        olds, news = group_keys(o for o, _ in pairs), group_keys(n for _, n in pairs)
        out += list(zip(olds, news, strict=True)) if len(olds) == len(news) else [(", ".join(olds), ", ".join(news))]
    return out
