"""Autogenerate: turn the difference between two schemas into the ops of a migration script.

Like Alembic's autogenerate, the result is a draft to read. What the shapes prove (a wrapper prefix,
a module renamed in every layer, a fused projection whose parts add up) becomes plain ops; what is a
guess (a rename decided by position, a transpose, every drop and add) carries a ``# REVIEW:`` note
saying why. Works on schemas alone (key → shape, dtype), so a model built on ``meta`` is enough.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ckptmigrate.autogenerate import fusions, stacks
from ckptmigrate.autogenerate.keys import Sig, digits, regex, sig, undigit
from ckptmigrate.autogenerate.renames import Rule, common_prefixes, conflict, generalise, rule_for, subsequence
from ckptmigrate.autogenerate.render import Code, Step, string_literal, tensor_code
from ckptmigrate.autogenerate.reshapes import interpolation, resize, resize_note
from ckptmigrate.autogenerate.schema_diff import SchemaDiff
from ckptmigrate.checkpoint.envelope import Schema
from ckptmigrate.ops.operations import WRAPPER_PREFIXES

if TYPE_CHECKING:
    import torch


def diff_schemas(old: Schema, new: Schema) -> SchemaDiff:
    """Added, removed and reshaped keys, and the probable renames (equal tensors under related names)."""
    plan = _Plan(old, new)
    plan.prefix()
    plan.renames(plan.reserved())
    targets = set(plan.renamed.values())
    return SchemaDiff(
        added={k: dict(v) for k, v in new.items() if k not in old and k not in targets},
        removed={k: dict(v) for k, v in old.items() if k not in new and k not in plan.renamed},
        reshaped={k: (dict(old[k]), dict(new[k])) for k in old if k in new and sig(old[k]) != sig(new[k])},
        renamed=dict(plan.renamed),
    )


def generate(old: Schema, new: Schema, *, new_values: Mapping[str, torch.Tensor] | None = None) -> list[Step]:
    """The ops that take a checkpoint with schema ``old`` to ``new``, most certain first.

    Order: a prefix on every key, renamed modules (one op across layers), splits and merges, stacks
    and unstacks, casts/reshapes/transposes/resizes/interpolations, drops, adds (valued from
    ``new_values``, the fresh model, when they fit in a line of code).
    """
    plan = _Plan(old, new)
    plan.prefix()
    plan.renames(plan.reserved())
    plan.fuse()
    plan.stack()
    plan.changes()
    plan.drops()
    plan.adds(new_values or {})
    return plan.steps


# -- the plan: the old schema as the ops written so far leave it ---------------------------------------------


class _Plan:
    """``state``: the old schema as the steps written so far leave it; each stage adds steps and moves it on."""

    def __init__(self, old: Schema, new: Schema) -> None:
        self.state: dict[str, Sig] = {k: sig(v) for k, v in old.items()}
        self.new: dict[str, Sig] = {k: sig(v) for k, v in new.items()}
        self.origin = {k: k for k in self.state}
        self.renamed: dict[str, str] = {}  # original key → new key, same tensor
        self.steps: list[Step] = []
        self.add_notes: dict[str, str] = {}
        self.dropped: dict[str, Sig] = {}

    def _rename(self, mapping: Mapping[str, str], step: Step) -> None:
        self.state = {mapping.get(k, k): v for k, v in self.state.items()}
        self.origin = {mapping.get(k, k): o for k, o in self.origin.items()}
        self.renamed.update({self.origin[n]: n for n in mapping.values() if self.new.get(n) == self.state[n]})
        self.steps.append(step)

    def prefix(self) -> None:
        """A prefix changed on every key: a wrapper (``module.``, ``_orig_mod.``) came or went, or the root moved."""
        best: tuple[int, int, str, str] | None = None
        base = len(self.state.keys() & self.new.keys())
        for a in common_prefixes(self.state):
            olds = {k[len(a):] for k in self.state}
            for b in common_prefixes(self.new):
                score = len(olds & {k[len(b):] for k in self.new})
                if a != b and score > base and (best is None or (score, -len(a) - len(b)) > best[:2]):
                    best = (score, -len(a) - len(b), a, b)
        if best is not None:
            a, b = best[2:]
            wrapper = not b and all(s + "." in WRAPPER_PREFIXES for s in a.split(".")[:-1])
            self._rename({k: b + k[len(a):] for k in self.state},
                         Step("unwrap", (a,)) if wrapper else Step("rename_prefix", (a, b)))

    def renames(self, reserved: set[str]) -> None:
        """Moved modules: the rules that explain most removed→added pairs of equal tensors, best first."""
        while (pick := self._best_rule(reserved)) is not None:
            rule, mapping, review = pick
            self._rename(mapping, Step(rule.op, (rule.old, rule.new), review=review))

    def _best_rule(self, reserved: set[str]) -> tuple[Rule, dict[str, str], str | None] | None:
        added: dict[Sig, dict[tuple[str, ...], list[str]]] = {}
        for a in self.new:
            if a not in self.state and a not in reserved:
                added.setdefault(self.new[a], {}).setdefault(digits(a), []).append(a)
        pairs: dict[tuple[str, str], tuple[str, str]] = {}
        for k in self.state:
            if k in self.new or k in reserved:
                continue
            dk = digits(k)
            for dt, keys in added.get(self.state[k], {}).items():
                if dt == dk:  # the same rule for every layer: one pair per shape of the names is enough
                    pairs.update({(undigit(k), undigit(a)): (k, a) for a in keys})
                elif subsequence(dt, dk) or subsequence(dk, dt):  # a Sequential index came or went
                    pairs.update({(k, a): (k, a) for a in keys})
        rules = {r for k, a in pairs.values() if (r := rule_for(k, a)) is not None}
        pos_old, pos_new = {k: i for i, k in enumerate(self.state)}, {k: i for i, k in enumerate(self.new)}
        scored = []
        for rule in rules:
            if (got := self._evaluate(rule, reserved)) is not None:
                mapping, hits = got
                scored.append((len(hits), min(pos_old[k] for k in hits), min(pos_new[v] for v in hits.values()),
                               rule, mapping, hits))
        if not scored:
            return None
        most = max(s[0] for s in scored)
        top = [s for s in scored if s[0] == most]
        first = min(s[1] for s in top)
        group = sorted((s for s in top if s[1] == first), key=lambda s: (s[2], s[3].groups, s[3].old))
        choice = group[0]
        similar = max(group, key=lambda s: s[3].similarity)
        if similar[3].similarity - choice[3].similarity >= 0.25:
            choice = similar
        rivals = sorted({" -> ".join(s[3].shown) for s in top if s is not choice and conflict(s[5], choice[5])})
        rule = choice[3]
        review = None
        if rivals:
            review = f"chosen by key order; these pairings fit the shapes as well: {', '.join(rivals[:3])}"
        elif rule.similarity < 0.5 and not rule.groups and len({k.rsplit(".", 1)[0] for k in choice[5]}) == 1:
            review = "matched by shape and dtype only: the names have little in common"
        return rule, choice[4], review

    def _evaluate(self, rule: Rule, reserved: set[str]) -> tuple[dict[str, str], dict[str, str]] | None:
        """(every key the rule moves → its new name, the moves that land on an equal new tensor), or None if unsafe."""
        mapping: dict[str, str] = {}
        for k in self.state:
            if (image := rule.apply(k)) is not None:
                if k in self.new:
                    return None  # would move a key that is already right
                mapping[k] = image
        if len(set(mapping.values())) != len(mapping):
            return None
        hits, misses = {}, 0
        for k, image in mapping.items():
            if image in self.state and image not in mapping:
                return None
            if self.new.get(image) == self.state[k] and k not in reserved and image not in reserved:
                hits[k] = image
            elif image not in self.new or math.prod(self.new[image][0]) != math.prod(self.state[k][0]):
                misses += k not in reserved  # lands nowhere, or where only a drop and add can follow
        return (mapping, hits) if misses < len(hits) else None

    def reserved(self) -> set[str]:
        """Keys a split, merge, stack or unstack explains: renames leave them alone."""
        return {k for f in fusions.find(self.state, self.new) for k in f.keys} | {
            k for s in stacks.find(self.state, self.new, set()) for k in s.keys}

    def fuse(self) -> None:
        """Write the splits and merges, one op per pattern across layers where the pattern fits exactly."""
        groups: dict[tuple[Any, ...], list[fusions.Fusion]] = {}
        for f in fusions.find(self.state, self.new):
            if f.kind == "split":
                pat, tpls, n, _ = generalise(f.fused.split("."), [p.split(".") for p in f.parts])
                pats: tuple[str, ...] = (pat,)
            else:
                gens = [generalise(p.split("."), [f.fused.split(".")]) for p in f.parts]
                pats, tpls, n = tuple(g[0] for g in gens), gens[0][1], gens[0][2]
            equal = len(set(f.sizes)) == 1
            sig = (f.kind, pats, tuple(tpls), n, f.dim, None if equal and f.kind == "split" else f.sizes, f.loose)
            groups.setdefault(sig, []).append(f)
        for (kind, pats, tpls, n, dim, sizes, _), fs in groups.items():
            review = fusions.review(fs[0])
            extra = (("dim", dim),) + ((("sizes", list(sizes)),) if sizes is not None else ())
            if n and self._covers(pats[0], tpls, fs):
                args: tuple[Any, ...] = (pats[0], list(tpls)) if kind == "split" else (list(pats), tpls[0])
                self.steps.append(Step(kind, args, extra if kind == "split" else extra[:1], review))
            else:
                for f in fs:
                    args = (f.fused, list(f.parts)) if kind == "split" else (list(f.parts), f.fused)
                    self.steps.append(Step(kind, args, extra if kind == "split" else extra[:1], review))
            self._swap([([*f.parts], [f.fused]) if kind == "merge" else ([f.fused], [*f.parts]) for f in fs])

    def stack(self) -> None:
        """Per-expert keys stacked into one tensor, or one unstacked into per-expert keys."""
        found = stacks.find(self.state, self.new, set())
        self.steps += stacks.steps(found, self.state)
        dtypes = {k: self.state[s.parts[0] if s.kind == "stack" else s.fused][1] for s in found for k in s.keys}
        self._swap([([*s.parts], [s.fused]) if s.kind == "stack" else ([s.fused], [*s.parts]) for s in found])
        self.state.update({k: (self.state[k][0], dt) for k, dt in dtypes.items() if k in self.state})  # cast next

    def _swap(self, moves: Sequence[tuple[Sequence[str], Sequence[str]]]) -> None:
        """For each (gone, came): the keys ``gone`` leave the state, and ``came`` (as the new schema has
        them) take the place of ``gone[0]``."""
        gone = {k for g, _ in moves for k in g}
        came = {g[0]: c for g, c in moves}
        state: dict[str, Sig] = {}
        for k, v in self.state.items():
            if k in came:
                state.update((n, self.new[n]) for n in came[k])
            if k not in gone:
                state[k] = v
        self.state = state

    def _covers(self, pattern: str, templates: Sequence[str], fs: list[fusions.Fusion]) -> bool:
        """The pattern matches exactly the driving keys of ``fs`` and expands to exactly their counterparts."""
        want = {(f.fused if f.kind == "split" else f.parts[0]): f for f in fs}
        got = {k: m for k in self.state if (m := regex(pattern).fullmatch(k))}
        if got.keys() != want.keys():
            return False
        return all([m.expand(t) for t in templates] == ([*f.parts] if f.kind == "split" else [f.fused])
                   for k, m in got.items() if (f := want[k]))

    def changes(self) -> None:
        """Same key, new dtype or shape: cast, transpose or reshape when the elements stay; a resampled
        position embedding or a resized vocabulary when the names and shapes suggest one; else drop and add."""
        ops: dict[tuple[Any, ...], list[str]] = {}  # (op, args, kwargs, review, loses values) -> keys
        for k in [k for k in self.state if k in self.new and self.state[k] != self.new[k]]:
            (old, odt), (new, ndt) = self.state[k], self.new[k]
            if math.prod(old) != math.prod(new):
                refit = interpolation(k, old, new) or resize(old, new)
                if refit is None:
                    ops.setdefault(("drop", (), (), resize_note(old, new), True), []).append(k)
                    self.add_notes[k] = f"{list(new)} replaces the dropped {list(old)}"
                    continue
                if odt != ndt:
                    ops.setdefault(("cast", (ndt,), (), None, False), []).append(k)
                ops.setdefault(refit, []).append(k)
                continue
            if odt != ndt:
                ops.setdefault(("cast", (ndt,), (), None, False), []).append(k)
            if old == new:
                continue
            if len(old) == 2 and old == new[::-1]:
                ops.setdefault(("transpose", (0, 1), (), f"{list(old)} -> {list(new)}: guessed a transpose (a "
                                "Conv1D-style [in, out] weight becoming [out, in]); if it is a reshape, use "
                                "ckpt.reshape; square weights of the same layer cannot show it and may need it too",
                                False), []).append(k)
            else:
                plain = [d for d in old if d != 1] == [d for d in new if d != 1]
                note = None if plain else f"{list(old)} -> {list(new)}: same element count, assumed a row-major reshape"
                ops.setdefault(("reshape", (new,), (), note, False), []).append(k)
        for (op, args, kwargs, review, lossy), keys in sorted(ops.items(), key=lambda item: item[0][0] != "cast"):
            self._emit(op, keys, args, review, kwargs, irreversible=lossy)
            for k in keys:
                if op == "drop":
                    del self.state[k]
                else:
                    self.state[k] = (self.state[k][0], args[0]) if op == "cast" else self.new[k]

    def drops(self) -> None:
        self.dropped = {k: v for k, v in self.state.items() if k not in self.new}
        self._emit("drop", list(self.dropped), (), "dropped: the new model has no such key")
        self.state = {k: v for k, v in self.state.items() if k in self.new}

    def _emit(self, op: str, keys: list[str], args: tuple[Any, ...], review: str | None,
              kwargs: tuple[tuple[str, Any], ...] = (), *, irreversible: bool = False) -> None:
        self.steps += [Step(op, (p, *args), kwargs, review, irreversible=irreversible)
                       for p in _patterns(keys, self.state)]

    def adds(self, values: Mapping[str, Any]) -> None:
        groups: dict[tuple[str, str, str], list[tuple[str, int | None]]] = {}
        for k in [k for k in self.new if k not in self.state]:
            code, note = _init(k, self.new[k], values.get(k), self.new)
            note = f"{self.add_notes.get(k, 'new key')}: {note}"
            twins = sorted({undigit(d) for d, sig in self.dropped.items() if sig == self.new[k]})
            if twins:
                note += f"; if it is the dropped {' or '.join(twins[:2])} renamed, use ckpt.rename instead"
            segs = k.split(".")
            digits = [i for i, s in enumerate(segs) if s.isdigit()]
            if len(digits) == 1:
                tpl = ".".join("{i}" if i == digits[0] else s.replace("{", "{{").replace("}", "}}")
                               for i, s in enumerate(segs))
                groups.setdefault((tpl, code, note), []).append((k, int(segs[digits[0]])))
            else:
                groups.setdefault((k, code, note), []).append((k, None))
            self.state[k] = self.new[k]
        for (tpl, code, note), members in groups.items():
            if len(members) > 1:
                loop = tuple(i for _, i in members if i is not None)
                self.steps.append(Step("add", (Code("f" + string_literal(tpl)), Code(code)), review=note, loop=loop))
            else:
                self.steps += [Step("add", (k, Code(code)), review=note) for k, _ in members]


# -- helpers --------------------------------------------------------------------------------------------------


def _patterns(keys: list[str], universe: Iterable[str]) -> list[str]:
    """One pattern per set of keys that differ only in layer indices, when it matches nothing else."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(r"\.".join(r"\d+" if s.isdigit() else re.escape(s) for s in k.split(".")), []).append(k)
    universe = list(universe)
    out: list[str] = []
    for pattern, ks in groups.items():
        exact = len(ks) > 1 and {k for k in universe if regex(pattern).fullmatch(k)} == set(ks)
        out += [pattern] if exact else ks
    return out


def _init(key: str, sig: Sig, value: Any, schema: Mapping[str, Sig]) -> tuple[str, str]:
    """A tensor expression for a new key, and a note on where its values come from."""
    shape, dtype = sig
    dt = "" if dtype == "float32" else f", dtype=torch.{dtype}"
    size = ", ".join(map(str, shape)) if shape else "()"
    given = hasattr(value, "detach") and not value.is_meta  # a meta tensor has no values
    if given and tuple(value.shape) == shape and str(value.dtype).removeprefix("torch.") == dtype:
        code = tensor_code(value, shape, dt)
        if code is not None:
            return code, "the value the fresh model initialises it with"
    parent, _, leaf = key.rpartition(".")
    norm = leaf == "running_var" or (leaf == "weight" and len(shape) == 1 and (
        "norm" in parent.lower() or re.search(r"(^|\.)(ln|bn)(_?[a-z0-9]*)$", parent.lower()) is not None
        or f"{parent}.running_var" in schema))
    fill = "ones" if norm else "zeros"
    why = "the fresh model's values are too big to write here" if given else "no values from the fresh model"
    hint = ", how a norm layer's weight or running_var starts" if norm else "; write the initialisation you want"
    return f"torch.{fill}({size}{dt})", f"{fill} ({why}){hint}"
