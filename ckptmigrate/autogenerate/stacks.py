"""Per-index keys on one side, one stacked tensor on the other: mixture-of-experts weights kept one
key per expert (``experts.{0..7}.w1.weight``, each ``[F, D]``) against one fused ``[8, F, D]``
tensor. Proposed as ``ckpt.stack`` (per-index → fused) or ``ckpt.unstack`` (fused → per-index).

A pairing is certain when the fused key is the per-index key with its index (and a trailing
``weight``) left out: ``experts.3.w1.weight`` ↔ ``experts.w1``. Any other pairing rests on shapes and
layer indices alone and carries a ``# REVIEW:`` note saying so. A dtype that changed too is left
to the cast that follows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ckptmigrate.autogenerate.keys import Sig, digits, regex, similarity
from ckptmigrate.autogenerate.render import Step


@dataclass(frozen=True)
class Stack:
    """``parts`` (index order 0..n-1, the index at segment ``hole``) stacked along ``dim`` into ``fused``."""

    kind: str  # stack: the parts are the old keys; unstack: the fused key is
    fused: str
    parts: tuple[str, ...]
    hole: int
    dim: int
    review: str | None

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.fused, *self.parts)


def find(state: Mapping[str, Sig], new: Mapping[str, Sig], reserved: set[str]) -> list[Stack]:
    """Stacks and unstacks among the keys only one side has, best-named pairings first."""
    removed = [k for k in state if k not in new and k not in reserved]
    added = [k for k in new if k not in state and k not in reserved]
    return [*_pair("stack", _indexed(removed, state), added, state, new),
            *_pair("unstack", _indexed(added, new), removed, new, state)]


def steps(found: Sequence[Stack], state: Mapping[str, Sig]) -> list[Step]:
    """One op per pattern across layers where the pattern matches exactly those keys, else one per stack."""
    groups: dict[tuple[str, str | None, str | None, int, str | None], list[Stack]] = {}
    for s in found:
        pattern, target = _templates(s)
        groups.setdefault((s.kind, pattern, target, s.dim, s.review), []).append(s)
    out: list[Step] = []
    for (kind, pattern, target, dim, review), members in groups.items():
        extra = (("dim", dim),) if dim else ()
        if pattern is not None and target is not None and _covers(pattern, target, members, state):
            out.append(Step(kind, (pattern, target), extra, review))
        else:
            out += [Step(kind, _one(s, state), extra, review) for s in members]
    return out


def _indexed(keys: Sequence[str], sigs: Mapping[str, Sig]) -> list[tuple[int, list[str]]]:
    """Runs of keys equal but for one numeric segment that counts 0..n-1 (n ≥ 2), all of one signature."""
    groups: dict[tuple[int, tuple[str, ...]], dict[int, str]] = {}
    for k in keys:
        segs = k.split(".")
        for i, s in enumerate(segs):
            if s.isdigit() and str(int(s)) == s:
                groups.setdefault((i, tuple(segs[:i] + segs[i + 1:])), {})[int(s)] = k
    return [(hole, [members[i] for i in range(len(members))]) for (hole, _), members in groups.items()
            if len(members) > 1 and sorted(members) == list(range(len(members)))
            and len({sigs[k] for k in members.values()}) == 1]


def _pair(kind: str, runs: list[tuple[int, list[str]]], wholes: Sequence[str], psig: Mapping[str, Sig],
          wsig: Mapping[str, Sig]) -> list[Stack]:
    by_digits: dict[tuple[str, ...], list[str]] = {}
    for w in wholes:
        by_digits.setdefault(digits(w), []).append(w)
    candidates = []
    for hole, parts in runs:
        shape, dtype = psig[parts[0]]
        stem = parts[0].split(".")
        del stem[hole]
        for w in by_digits.get(tuple(s for s in stem if s.isdigit()), []):
            wshape = wsig[w][0]
            if len(wshape) != len(shape) + 1:
                continue
            dims = [d for d in range(len(wshape)) if wshape[d] == len(parts) and wshape[:d] + wshape[d + 1:] == shape]
            if dims:
                named = w.split(".") == stem or (stem[-1] == "weight" and w.split(".") == stem[:-1])
                score = (named, wsig[w][1] == dtype, similarity(w, ".".join(stem)), hole)
                candidates.append((score, w, hole, parts, dims))
    candidates.sort(key=lambda c: c[0], reverse=True)
    used: set[str] = set()
    out = []
    for (named, *_), w, hole, parts, dims in candidates:
        if w in used or used.intersection(parts):
            continue
        used.update([w, *parts])
        shown = _shown(parts[0], hole)
        notes = []
        if not named:
            rivals = sorted({_shown(c[3][0], c[2]) if c[1] == w else _shown(c[1], None) for c in candidates
                             if (c[1] == w) != (c[3] == parts)})
            notes.append(f"matched by shape and layer index, not by name: check that {_shown(w, None)} holds "
                         f"{shown} in index order" + (f" ({', '.join(rivals[:3])} fit as well)" if rivals else ""))
        if len(dims) > 1:
            notes.append(f"dims {dims} of {list(wsig[w][0])} all fit; stacked along dim {dims[0]}")
        out.append(Stack(kind, w, tuple(parts), hole, dims[0], "; ".join(notes) or None))
    return out


def _shown(key: str, hole: int | None) -> str:
    """A key as the note names it, the same in every layer: ``layers.#.experts.{i}.w1.weight``."""
    return ".".join("{i}" if i == hole else "#" if s.isdigit() else s for i, s in enumerate(key.split(".")))


def _backref(n: int) -> str:
    return f"\\{n}" if n < 10 else f"\\g<{n}>"


def _fill(segs: list[str], hole: int | None) -> str:
    """A template: the index segment as ``{i}``, every other numeric segment a back-reference in order."""
    out, n = [], 0
    for i, s in enumerate(segs):
        if i == hole:
            out.append("{i}")
        elif s.isdigit():
            n += 1
            out.append(_backref(n))
        else:
            out.append(s)
    return ".".join(out)


def _templates(s: Stack) -> tuple[str | None, str | None]:
    """The stack as a pattern across layers and its target: numeric segments become groups (for a
    stack the index must be the last of them, as ``ckpt.stack`` reads it), or (None, None)."""
    part = s.parts[0].split(".")
    if s.kind == "stack":
        if any(seg.isdigit() for seg in part[s.hole + 1:]):
            return None, None
        return _pattern(part), _fill(s.fused.split("."), None)
    fused = s.fused.split(".")
    if not digits(s.fused):
        return None, None
    return _pattern(fused), _fill(part, s.hole)


def _pattern(segs: list[str]) -> str:
    return r"\.".join(r"(\d+)" if seg.isdigit() else re.escape(seg) for seg in segs)


def _covers(pattern: str, target: str, members: list[Stack], state: Mapping[str, Sig]) -> bool:
    """The pattern matches exactly the keys these stacks read, and the target names what each writes."""
    read = {k for s in members for k in (s.parts if s.kind == "stack" else (s.fused,))}
    if {k for k in state if regex(pattern).fullmatch(k)} != read:
        return False
    for s in members:  # the parts of one stack differ only in the index, which the target does not use
        m = regex(pattern).fullmatch(s.parts[0] if s.kind == "stack" else s.fused)
        assert m is not None
        if s.kind == "stack" and m.expand(target) != s.fused:
            return False
        if s.kind == "unstack" and [m.expand(target).replace("{i}", str(i)) for i in range(len(s.parts))] != [*s.parts]:
            return False
    return True


def _one(s: Stack, state: Mapping[str, Sig]) -> tuple[object, ...]:
    """A single stack's arguments: the index as the pattern's only group (or ``{i}``) where that names
    just these keys, else the keys listed."""
    segs = s.parts[0].split(".")
    if s.kind == "unstack":
        plain = sum(seg.isdigit() for seg in segs) == 1
        return s.fused, _fill(segs, s.hole) if plain else list(s.parts)
    pattern = r"\.".join(r"(\d+)" if i == s.hole else re.escape(seg) for i, seg in enumerate(segs))
    if {k for k in state if regex(pattern).fullmatch(k)} == set(s.parts):
        return pattern, s.fused
    return list(s.parts), s.fused
