"""The revision graph: ids, parents, merges, branch labels, cross-lineage dependencies, heads, walks.

Like Alembic's: ``down_revision`` is one parent, ``None`` (a base) or a tuple (a merge);
``branch_labels`` name a branch (``LABEL@head`` is its newest revision); ``depends_on`` names
revisions — often of another lineage, a shared encoder's chain — that must be applied first.
Several heads in a lineage are a state (two pull requests each added a revision), not an error:
only a walk that needs one head (``head``) stops and says how to merge them.

A checkpoint is at one revision; what it has applied is that revision and all its ancestors
(parents and dependencies). A walk applies or undoes the difference, in :meth:`RevisionGraph.order`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptmigrate.errors import MultipleHeads, RevisionError


@dataclass
class Revision:
    id: str
    downs: tuple[str, ...]
    declared_lineage: str | None
    message: str
    path: Path
    upgrade: Callable[[Any], None] | None
    downgrade: Callable[[Any], None] | None
    branch_labels: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    #: the installed distribution that ships the script (``mylib 2.0``), None for a local directory
    source: str | None = None
    #: the revisions a squash replaced by this one, oldest first (the last is an exact alias)
    aliases: tuple[str, ...] = ()
    #: a floor: files below it are refused, naming ``last_release`` (the last release that reads them)
    final: bool = False
    last_release: str | None = None
    lineage: str | None = None
    children: list[str] = field(default_factory=list)
    #: ``depends_on`` resolved to revision ids (a branch label names the revision that declares it)
    dependencies: tuple[str, ...] = ()
    #: the branch labels this revision carries: its own and those of its ancestors along its branch
    labels: set[str] = field(default_factory=set)

    @property
    def is_merge(self) -> bool:
        return len(self.downs) > 1

    @property
    def schema_path(self) -> Path:
        return self.path.with_suffix(".schema.json")

    def schema(self) -> dict[str, Any] | None:
        """The schema this revision produces, when a snapshot was recorded beside the script."""
        if not self.schema_path.exists():
            return None
        try:
            return json.loads(self.schema_path.read_text())
        except ValueError as exc:
            raise RevisionError(f"{self.schema_path}: not valid JSON ({exc})") from exc

    def sha256(self) -> str | None:
        """The script's sha256 as it is now (None for a revision known only from a file's history)."""
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def __str__(self) -> str:
        return f"{self.id} ({self.path.name})"


def merge_hint(heads: Iterable[str]) -> str:
    return f"merge them: ckptmigrate merge -m MESSAGE {' '.join(heads)}"


class RevisionGraph:
    """Revisions by id, validated: every parent and dependency known, no cycle, lineages consistent."""

    def __init__(self, revisions: list[Revision]) -> None:
        self.revisions: dict[str, Revision] = {}
        for rev in revisions:
            if rev.id in self.revisions:
                other = self.revisions[rev.id]
                raise RevisionError(f"revision {rev.id!r} is defined twice: {other.path} and {rev.path}")
            self.revisions[rev.id] = rev
        self.labels: dict[str, Revision] = {}
        for rev in revisions:
            for label in rev.branch_labels:
                if label in self.revisions or label in self.labels:
                    other = self.labels.get(label) or self.revisions[label]
                    raise RevisionError(f"{rev.path}: branch label {label!r} is already used by {other}")
                self.labels[label] = rev
        #: the last id a squash replaced → the squashed revision (a file there is exactly at it)
        self.aliases: dict[str, str] = {}
        #: earlier ids a squash replaced → the squashed revision (a file there is part-way through it)
        self.squashed: dict[str, str] = {}
        for rev in revisions:
            for n, alias in enumerate(rev.aliases):
                if alias in self.revisions or alias in self.labels or alias in self.aliases or alias in self.squashed:
                    raise RevisionError(f"{rev.path}: alias {alias!r} is already a revision, label or alias")
                (self.aliases if n == len(rev.aliases) - 1 else self.squashed)[alias] = rev.id
        for rev in revisions:
            rev.downs = tuple(self.aliases.get(d, d) for d in rev.downs)
            for down in rev.downs:
                if down not in self.revisions:
                    raise RevisionError(f"{rev.path}: down_revision {down!r} is not a known revision")
                self.revisions[down].children.append(rev.id)
            deps = []
            for dep in rev.depends_on:
                target = self.revisions.get(dep) or self.labels.get(dep)
                if target is None:
                    raise RevisionError(f"{rev.path}: depends_on {dep!r} is neither a revision nor a branch label")
                deps.append(target.id)
            rev.dependencies = tuple(deps)
        self._topo = self._check_cycles()
        self._assign_lineages()
        for label, rev in self.labels.items():
            for member in [rev, *(self.revisions[d] for d in self.descendants(rev.id))]:
                member.labels.add(label)
        self._ancestors: dict[str, frozenset[str]] = {}

    def _check_cycles(self) -> list[str]:
        """Every revision after its parents and dependencies (Kahn's algorithm, ties by id)."""
        waiting = {r.id: len(set(r.downs) | set(r.dependencies)) for r in self.revisions.values()}
        dependents: dict[str, list[str]] = {}
        for rev in self.revisions.values():
            for parent in set(rev.downs) | set(rev.dependencies):
                dependents.setdefault(parent, []).append(rev.id)
        ready = sorted(r for r, n in waiting.items() if n == 0)
        out: list[str] = []
        while ready:
            rid = ready.pop(0)
            out.append(rid)
            for child in dependents.get(rid, []):
                waiting[child] -= 1
                if waiting[child] == 0:
                    ready.append(child)
            ready.sort()
        if len(out) < len(self.revisions):
            loop = self._find_loop({r for r in self.revisions if r not in out})
            files = ", ".join(self.revisions[r].path.name for r in loop[:-1])
            raise RevisionError(f"revisions form a cycle: {' -> '.join(loop)} (files: {files})")
        return out

    def _find_loop(self, stuck: set[str]) -> list[str]:
        start = min(stuck)
        seen = [start]
        while True:
            rev = self.revisions[seen[-1]]
            nxt = min(p for p in (*rev.downs, *rev.dependencies) if p in stuck)
            if nxt in seen:
                return seen[seen.index(nxt):] + [nxt]
            seen.append(nxt)

    def _assign_lineages(self) -> None:
        for rid in self._topo:
            rev = self.revisions[rid]
            inherited = {self.revisions[d].lineage for d in rev.downs}
            if len(inherited) > 1:
                names = ", ".join(f"{d} ({self.revisions[d].lineage!r})" for d in rev.downs)
                raise RevisionError(
                    f"{rev.path}: a merge joins revisions of one lineage, not {names}; "
                    "use depends_on for a revision that needs another lineage's"
                )
            parent = next(iter(inherited)) if inherited else None
            if rev.declared_lineage is not None and parent is not None and rev.declared_lineage != parent:
                raise RevisionError(
                    f"{rev.path}: lineage {rev.declared_lineage!r} differs from its parent's {parent!r}")
            rev.lineage = rev.declared_lineage or parent

    def __len__(self) -> int:
        return len(self.revisions)

    # -- heads and lineages ------------------------------------------------------------------

    def heads(self) -> dict[str | None, list[Revision]]:
        """Each lineage's heads (revisions no other revision names as its parent), by id."""
        out: dict[str | None, list[Revision]] = {}
        for rid in self._topo:
            rev = self.revisions[rid]
            if not rev.children:
                out.setdefault(rev.lineage, []).append(rev)
        for heads in out.values():
            heads.sort(key=lambda r: r.id)
        return out

    def lineages(self) -> list[str | None]:
        return list(self.heads())

    def head(self, lineage: str | None = None) -> Revision:
        """The one head of ``lineage``; several stop with :class:`MultipleHeads`, which says how to merge."""
        heads = self.heads()
        if lineage is None and None not in heads and len(heads) == 1:
            lineage = next(iter(heads))
        if lineage not in heads:
            names = ", ".join(repr(k) for k in heads) or "none"
            what = f"lineage {lineage!r}" if lineage else "default lineage"
            error = RevisionError(f"there is no {what} (lineages: {names})",
                                  heads=[h.id for hs in heads.values() for h in hs])
            error.cli_hint = "pass --lineage NAME"
            raise error
        found = heads[lineage]
        if len(found) > 1:
            ids = [h.id for h in found]
            label = f"lineage {lineage!r}" if lineage else "the default lineage"
            raise MultipleHeads(
                f"{label} has {len(ids)} heads: {', '.join(str(h) for h in found)}; join them with a merge "
                "revision, or name one as the target", ids, lineage)
        return found[0]

    def lineage_of(self, rev_id: str) -> str | None:
        return self.get(rev_id).lineage

    # -- lookups ----------------------------------------------------------------------------

    def get(self, rev_id: str) -> Revision:
        """A revision by id, branch label or unique id prefix."""
        if rev_id in self.revisions:
            return self.revisions[rev_id]
        if rev_id in self.labels:
            return self.labels[rev_id]
        if rev_id in self.aliases:
            return self.revisions[self.aliases[rev_id]]
        found = [r for r in self.revisions.values() if r.id.startswith(rev_id)]
        if len(found) == 1:
            return found[0]
        if found:
            raise RevisionError(f"revision prefix {rev_id!r} is ambiguous: {', '.join(r.id for r in found)}",
                                revision=rev_id, candidates=[r.id for r in found])
        known = ", ".join(sorted(self.revisions)[:10])
        raise RevisionError(f"unknown revision {rev_id!r} (known: {known or 'none'})", revision=rev_id,
                            candidates=sorted(self.revisions))

    def knows(self, rev_id: str) -> bool:
        """An id this graph resolves exactly: a revision or the last id a squash replaced."""
        return rev_id in self.revisions or rev_id in self.aliases

    def ancestors(self, rev_id: str | None) -> frozenset[str]:
        """What a checkpoint at ``rev_id`` has applied: the revision, its parents and dependencies, theirs, ..."""
        if rev_id is None:
            return frozenset()
        if rev_id not in self._ancestors:
            rev = self.revisions[rev_id]
            out = {rev_id}
            for parent in (*rev.downs, *rev.dependencies):
                out |= self.ancestors(parent)
            self._ancestors[rev_id] = frozenset(out)
        return self._ancestors[rev_id]

    def descendants(self, rev_id: str) -> set[str]:
        out: set[str] = set()
        todo = list(self.revisions[rev_id].children)
        while todo:
            rid = todo.pop()
            if rid not in out:
                out.add(rid)
                todo.extend(self.revisions[rid].children)
        return out

    def order(self, ids: Iterable[str]) -> list[Revision]:
        """``ids`` in the order they are applied: every revision after its parents and dependencies;
        a merge's branches one after the other, in the order its ``down_revision`` lists them
        (each branch whole), dependencies before parents."""
        wanted = set(ids)
        out: list[Revision] = []
        done: set[str] = set()
        # a depth-first walk from the newest wanted revisions, parents in the order they are listed
        tops = [r for r in self._topo if r in wanted and not (set(self.revisions[r].children) & wanted)]
        for top in tops:
            stack: list[tuple[str, bool]] = [(top, False)]
            while stack:
                rid, expanded = stack.pop()
                if rid in done:
                    continue
                if expanded:
                    done.add(rid)
                    out.append(self.revisions[rid])
                    continue
                stack.append((rid, True))
                rev = self.revisions[rid]
                for parent in reversed((*rev.dependencies, *rev.downs)):
                    if parent in wanted and parent not in done:
                        stack.append((parent, False))
        return out

    def chain(self, lineage: str | None) -> list[Revision]:
        """Every revision of one lineage, in application order (base → head for a straight chain)."""
        heads = self.heads()
        if lineage is None and None not in heads and len(heads) == 1:
            lineage = next(iter(heads))  # the only lineage, as head() takes it
        if lineage not in heads:
            self.head(lineage)  # raises the error naming the lineages there are
        return self.order(r.id for r in self.revisions.values() if r.lineage == lineage)

    # -- targets and walks ------------------------------------------------------------------

    def resolve(self, target: str, current: str | None, lineage: str | None) -> str | None:
        """``head``, ``base``, ``LABEL@head``, ``+N``/``-N`` relative to ``current``, a branch label or
        a revision id → id (None: base)."""
        if target == "head":
            return self.head(lineage).id
        if target == "base":
            return None
        if target.endswith("@head"):
            label = target[: -len("@head")]
            if label not in self.labels:
                raise RevisionError(f"{target}: no branch is labelled {label!r} (labels: "
                                    f"{', '.join(sorted(self.labels)) or 'none'})")
            heads = [r for rs in self.heads().values() for r in rs if label in r.labels]
            if len(heads) > 1:
                ids = [h.id for h in heads]
                raise MultipleHeads(f"branch {label!r} has {len(ids)} heads: {', '.join(ids)}; join them with a merge",
                                    ids, lineage)
            return heads[0].id
        if re.fullmatch(r"[+-]\d+", target):
            return self._relative(target, current, lineage)
        rev = self.get(target)
        if rev.lineage != lineage:
            raise RevisionError(f"revision {rev.id} is in lineage {rev.lineage!r}, not {lineage!r}")
        return rev.id

    def _relative(self, target: str, current: str | None, lineage: str | None) -> str | None:
        steps = int(target)
        if steps >= 0:
            ahead = [h for h in self.heads().get(lineage, []) if self.ancestors(current) <= self.ancestors(h.id)]
            if len(ahead) > 1:
                ids = [h.id for h in ahead]
                raise MultipleHeads(f"{target} from {current or 'base'} is ambiguous: the chain has heads "
                                    f"{', '.join(ids)}; join them with a merge", ids, lineage)
            todo = (self.order(self.ancestors(ahead[0].id) - self.ancestors(current)) if ahead else [])
            if steps > len(todo):
                total = len(self.chain(lineage))
                raise RevisionError(f"{target} from {current or 'base'} goes past the end of the chain "
                                    f"({total} revisions)")
            return todo[steps - 1].id if steps else current
        rid = current
        for _ in range(-steps):
            if rid is None:
                total = len(self.chain(lineage))
                raise RevisionError(f"{target} from {current or 'base'} goes past the end of the chain "
                                    f"({total} revisions)")
            downs = self.revisions[rid].downs
            rid = downs[0] if downs else None
        return rid

    def walk(self, current: str | None, target: str | None) -> tuple[str, list[Revision]]:
        """("upgrade", revisions to apply) or ("downgrade", revisions to undo), in order.

        Upgrading applies what ``target`` has and ``current`` lacks; downgrading undoes what
        ``current`` has and ``target`` lacks, newest first. A target on another branch — neither
        has everything the other has — is refused with what each side lacks.
        """
        have, want = self.ancestors(current), self.ancestors(target)
        if have <= want:
            return "upgrade", self.order(want - have)
        if want <= have:
            return "downgrade", self.order(have - want)[::-1]
        only_here = ", ".join(r.id for r in self.order(have - want))
        only_there = ", ".join(r.id for r in self.order(want - have))
        raise RevisionError(
            f"{target} is on another branch than {current}: {current} has {only_here} and {target} has "
            f"{only_there}; upgrade to a merge of both, or downgrade to a common ancestor first"
        )

    def branch_of(self, rev_id: str, among: Iterable[str]) -> list[str]:
        """The revisions of ``among`` on another branch than ``rev_id`` (neither is the other's ancestor)."""
        mine = self.ancestors(rev_id)
        return [o for o in among if o != rev_id and o not in mine and rev_id not in self.ancestors(o)]
