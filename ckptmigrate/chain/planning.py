"""Planning a walk: where a checkpoint is on its chain (its envelope, ``--from``, or the revision whose
schema it matches) and the revisions between there and the target, in the order they run.

A file from a newer release is planned back through the inverses its own history recorded; the
engine (:mod:`ckptmigrate.chain.engine`) runs the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckptmigrate.chain.future import future_steps
from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.checkpoint.copies import schema_difference
from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput, NewerThanChain, RevisionError, SchemaMismatch


@dataclass
class Plan:
    direction: str
    lineage: str | None
    start: str | None
    target: str | None
    steps: list[Revision]
    start_source: str = "envelope"
    #: the graph the steps come from (merge checks need it); None for a plan built by hand
    graph: RevisionGraph | None = None

    def describe(self) -> str:
        if not self.steps:
            return f"already at {self.target or 'base'}"
        if self.direction == "upgrade":
            arrow = " -> ".join([self.start or "base", *(s.id for s in self.steps)])
        elif all(len(s.downs) <= 1 for s in self.steps):
            arrow = " -> ".join([self.start or "base", *((s.downs or ("base",))[0] for s in self.steps)])
        else:  # through a merge the file is at no single revision in between
            arrow = f"{self.start or 'base'} -> {self.target or 'base'} (undoing {', '.join(s.id for s in self.steps)})"
        return f"{self.direction} {arrow}"


def fingerprint(ckpt: Checkpoint, graph: RevisionGraph, lineage: str | None) -> tuple[str | None, str]:
    """The revision whose recorded schema equals the checkpoint's; else an error naming the nearest."""
    schema = ckpt.schema()
    best: tuple[int, Revision | None, str, list[str], list[str], list[str]] = (10**9, None, "", [], [], [])
    lineages = [lineage] if lineage is not None or None in graph.heads() else graph.lineages()
    for lin in lineages:
        for rev in graph.chain(lin):
            snap = rev.schema()
            if snap is None:
                continue
            if snap == schema:
                return rev.id, lin or ""
            missing = snap.keys() - schema.keys()
            extra = schema.keys() - snap.keys()
            reshaped = [k for k in snap.keys() & schema.keys() if snap[k] != schema[k]]
            score = len(missing) + len(extra) + len(reshaped)
            if score < best[0]:
                best = (score, rev, schema_difference(schema, snap), sorted(missing), sorted(extra), sorted(reshaped))
    if best[1] is None:
        error = SchemaMismatch(
            f"{ckpt.path}: unstamped, and no revision has a recorded schema to match it against", path=ckpt.path
        )
    else:
        error = SchemaMismatch(
            f"{ckpt.path}: unstamped, and its schema matches no revision; nearest is {best[1].id} ({best[2]})",
            path=ckpt.path, nearest=best[1].id, missing=best[3], unexpected=best[4], reshaped=best[5],
        )
    error.cli_hint = "pass --from REV if you know where it starts"
    raise error


def _downgraded_to_base(env: Envelope) -> bool:
    """A stamped file without a revision is at base when its last step was a downgrade to base."""
    last = env.history[-1] if env.history else {}
    return last.get("action") == "downgrade" and last.get("to") is None


def plan_for(
    ckpt: Checkpoint, graph: RevisionGraph, *, to: str = "head", from_rev: str | None = None,
    lineage: str | None = None,
) -> Plan:
    source = "envelope"
    future: list[Revision] = []
    if from_rev is not None:
        start = None if from_rev == "base" else graph.get(from_rev).id
        lineage = graph.lineage_of(start) if start else lineage
        source = "--from"
    elif ckpt.envelope is not None and ckpt.envelope.revision is not None:
        if not graph.knows(ckpt.envelope.revision) and ckpt.envelope.revision not in graph.labels:
            future, start, newer = future_steps(ckpt.path, ckpt.envelope, graph)
            lineage = graph.lineage_of(start) if start else ckpt.envelope.lineage
            source = "the file's own history"
        else:
            start = graph.get(ckpt.envelope.revision).id
            lineage = graph.lineage_of(start)
    elif ckpt.envelope is not None and _downgraded_to_base(ckpt.envelope):
        start = None
        lineage = lineage if lineage is not None else ckpt.envelope.lineage
    else:
        if ckpt.envelope is not None and ckpt.envelope.lineage is not None and lineage is None:
            lineage = ckpt.envelope.lineage
        start, found_lineage = fingerprint(ckpt, graph, lineage)
        lineage = found_lineage or None
        source = "schema"
    if lineage is None and None not in graph.heads() and len(graph.heads()) == 1:
        lineage = next(iter(graph.heads()))
    if future:
        return _plan_from_the_future(ckpt, graph, future, newer, start, to, lineage)
    target = graph.resolve(to, start, lineage)
    direction, steps = graph.walk(start, target)
    floor = next((s for s in steps if s.final), None) if direction == "upgrade" else None
    if floor is not None:
        raise RevisionError(
            f"{ckpt.path}: at {start or 'base'}, below this chain's floor {floor} (final = True); "
            f"{floor.last_release or 'a release from before the floor'} is the last release that can upgrade it "
            f"to {floor.id}")
    return Plan(direction, lineage, start, target, steps, source, graph)


def _plan_from_the_future(ckpt: Checkpoint, graph: RevisionGraph, future: list[Revision], newer: NewerThanChain,
                          known: str | None, to: str, lineage: str | None) -> Plan:
    """Downgrade a file from the future: undo its unknown revisions by the inverses its history
    recorded, then walk the known chain."""
    if to == "head" or to.startswith("+"):
        raise newer
    target = graph.resolve(to, known, lineage) if not to.startswith("-") else None
    if to.startswith("-"):
        raise BadInput(f"{ckpt.path}: relative targets count revisions this chain knows; the file is at "
                       f"{newer.revision}, which it does not: give --to REV")
    direction, steps = graph.walk(known, target)
    if direction == "upgrade" and steps:
        raise newer
    for rev in future:
        if recorded_inverse(ckpt, rev) is None:
            raise NewerThanChain(
                f"{ckpt.path}: cannot walk back from {newer.revision}: revision {rev.id} of the file's "
                "history recorded no invertible journal (it dropped, truncated or mapped tensors); only the "
                f"release that wrote it can downgrade it ({', '.join(newer.written_by)})",
                str(newer.revision), known, newer.ahead, newer.written_by, path=ckpt.path)
    start = ckpt.envelope.revision if ckpt.envelope is not None else None
    return Plan("downgrade", lineage, start, target, [*future, *steps], "the file's own history", graph)


def recorded_inverse(ckpt: Checkpoint, rev: Revision) -> list[Any] | None:
    """The inverse journal the file's history recorded for ``rev`` — for a squashed revision applied
    before the squash, the journals of the revisions it replaced, one after the other."""
    if ckpt.envelope is None:
        return None
    last: dict[str, Any] = {}
    for entry in ckpt.envelope.history:
        if entry.get("action") == "upgrade":
            last[str(entry.get("revision"))] = entry.get("inverse")
    if rev.id in last or not rev.aliases:
        inverse = last.get(rev.id)
        return inverse if isinstance(inverse, list) else None
    journals = [last.get(alias) for alias in rev.aliases]
    if not all(isinstance(j, list) for j in journals):
        return None
    return [step for journal in journals for step in journal or []]
