"""A fused tensor on one side, its parts as sibling keys on the other: a ``qkv`` projection split
into ``q``, ``k`` and ``v`` (or merged back), found by shapes that concatenate along one dim.
Proposed as ``ckpt.split`` or ``ckpt.merge``; a pairing by layer index and sizes alone, or parts in
an order the names do not settle, carries a ``# REVIEW:`` note. The per-index keys of a stacked
tensor are :mod:`ckptmigrate.autogenerate.stacks`'."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ckptmigrate.autogenerate.keys import Sig, digits, similarity

_QKV = {"q": 0, "query": 0, "wq": 0, "k": 1, "key": 1, "wk": 1, "v": 2, "value": 2, "wv": 2}


@dataclass(frozen=True)
class Fusion:
    """``fused`` and its ``parts`` (in the order they concatenate along ``dim``, ``sizes`` each)."""

    kind: str  # split: one fused key → parts; merge: parts → one fused key
    fused: str
    parts: tuple[str, ...]
    dim: int
    sizes: tuple[int, ...]
    loose: bool  # matched by layer index and sizes, not by a shared stem

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.fused, *self.parts)


def find(state: Mapping[str, Sig], new: Mapping[str, Sig]) -> list[Fusion]:
    """Fused tensors that became sibling keys (split) or siblings that became one (merge), sizes adding up."""
    removed = [k for k in state if k not in new]
    added = [k for k in new if k not in state]
    found: list[Fusion] = []
    used: set[str] = set()
    for kind, wholes, pieces, wsig, psig in (("split", removed, added, state, new),
                                             ("merge", added, removed, new, state)):
        order = {k: i for i, k in enumerate(pieces)}
        by_digits: dict[tuple[str, ...], list[tuple[int, list[str]]]] = {}
        for hole, keys in _siblings(pieces):
            keys.sort(key=lambda k, h=hole: (_qkv_rank(k.split(".")[h]), order[k]))  # type: ignore[misc]
            by_digits.setdefault(digits(keys[0]), []).append((hole, keys))
        for w in wholes:
            ws, best = w.split("."), None
            for hole, keys in by_digits.get(digits(w), []):
                ps = keys[0].split(".")
                strict = len(ws) == len(ps) and ws[:hole] + ws[hole + 1:] == ps[:hole] + ps[hole + 1:]
                if not strict and not (digits(w) and (ws[-1].endswith(ps[-1]) or ps[-1].endswith(ws[-1]))):
                    continue
                for run in _runs(keys):
                    dim = _cat_dim([psig[p] for p in run], wsig[w])
                    if dim is None or used.intersection(run):
                        continue
                    score = (strict, len(run) == len(keys), len(run), similarity(w, run[0]))
                    if best is None or score > best[0]:
                        sizes = tuple(psig[p][0][dim] for p in run)
                        best = (score, Fusion(kind, w, tuple(run), dim, sizes, not strict))
            if best is not None and w not in used:
                found.append(best[1])
                used.update(best[1].keys)
    return found


def _siblings(keys: Iterable[str]) -> list[tuple[int, list[str]]]:
    """Keys equal but for one non-numeric segment (the hole): ``attn.{q,k,v}.weight``."""
    groups: dict[tuple[int, tuple[str, ...]], list[str]] = {}
    for k in keys:
        segs = tuple(k.split("."))
        for i, s in enumerate(segs):
            if not s.isdigit():
                groups.setdefault((i, segs[:i] + segs[i + 1:]), []).append(k)
    return [(hole, ks) for (hole, _), ks in groups.items() if len(ks) > 1]


def _qkv_rank(segment: str) -> int:
    ranks = {_QKV[t] for t in re.split(r"[^a-z]+", segment.lower()) if t in _QKV}
    return ranks.pop() if len(ranks) == 1 else 3


def _runs(keys: list[str]) -> list[list[str]]:
    if len(keys) > 12:
        return [keys]
    return [keys[i:j] for i in range(len(keys)) for j in range(i + 2, len(keys) + 1)]


def _cat_dim(parts: list[Sig], whole: Sig) -> int | None:
    """The dim along which ``parts`` concatenate to ``whole``, if any."""
    shape, dtype = whole
    if any(dt != dtype or len(s) != len(shape) for s, dt in parts):
        return None
    for d in range(len(shape)):
        rest = shape[:d] + shape[d + 1:]
        if all(s[:d] + s[d + 1:] == rest for s, _ in parts) and sum(s[d] for s, _ in parts) == shape[d]:
            return d
    return None


def review(f: Fusion) -> str | None:
    if f.loose:
        return (f"matched by layer index and sizes ({'+'.join(map(str, f.sizes))} along dim {f.dim}), not by name: "
                f"check the parts and their order ({', '.join(p.rsplit('.', 2)[-2] for p in f.parts)})")
    segs = [p.split(".") for p in f.parts]
    names = [p[i] for p in segs for i in range(len(p)) if len({q[i] for q in segs}) > 1]
    if any(_qkv_rank(n) == 3 for n in names):
        return f"the order of the parts ({', '.join(names)}) follows the new model's key order; check it"
    return None
