"""Holding each step of a walk to its revision's recorded schema snapshot: a script that did
nothing, or not enough, is refused before anything is written, with the difference grouped by
module as ``check`` prints it."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.checkpoint.envelope import key_text
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import MigrationError
from ckptmigrate.tensors.refs import dtype_of, is_entry, shape_of
from ckptmigrate.util.keygroups import group_keys


def _applied(graph: RevisionGraph | None, start: str | None) -> set[str] | None:
    """The revisions the file has applied when it is at ``start`` (None: not known from the graph)."""
    if graph is None or (start is not None and start not in graph.revisions):
        return None
    return set(graph.ancestors(start))


class SnapshotCheck:
    """Holds each step of a walk to the schema recorded for the revision the file lands at (the
    revision itself upgrading, the one below downgrading): a script that did nothing, or not enough,
    must not be stamped as having done it.

    Metadata only (keys, shapes, dtypes). Checked when the file then holds exactly that revision and
    its ancestors (not between the branches of a merge, not without a snapshot). What the file
    already had of its own before the step — a key beside the previous revision's snapshot, one it
    lacked, a shape — and the step left alone is the file's, not the script's; a dtype is compared
    only where the step changed the tensor, so a bfloat16 export of a float32 model migrates in its
    own precision.
    """

    def __init__(self, ckpt: Checkpoint, graph: RevisionGraph | None, start: str | None) -> None:
        self.ckpt, self.graph = ckpt, graph
        self.applied = _applied(graph, start)
        at = graph.revisions.get(start) if graph is not None and start else None
        self.previous = at.schema() if at is not None and self.applied is not None else None

    def step(self, rev: Revision, landed: Revision | None, action: str, before: dict[Any, Any]) -> None:
        if self.applied is None or self.graph is None:
            return
        if action == "upgrade":
            self.applied.add(rev.id)
        else:
            self.applied.discard(rev.id)
        exact = landed is not None and self.applied == self.graph.ancestors(landed.id)
        snapshot = landed.schema() if landed is not None and exact else None
        previous, self.previous = self.previous, snapshot
        if snapshot is None or landed is None:
            return
        entries = self.ckpt.state_dict.entries
        if _fits(entries, snapshot, before):
            return
        got = self.ckpt.schema()
        now = {key_text(k): v for k, v in entries.items() if is_entry(v)}
        was = {key_text(k): v for k, v in before.items() if is_entry(v)}
        kept = {id(v) for v in was.values()}
        changed = {k for k, v in now.items() if id(v) not in kept}  # a renamed tensor is the same object
        own = _own_deviations(was, now, previous)
        missing = [k for k in snapshot if k not in got and k not in own]
        unexpected = [k for k in got if k not in snapshot and k not in own]
        reshaped = [k for k in snapshot if k in got and k not in own and (
            list(got[k]["shape"]) != list(snapshot[k]["shape"])
            or (k in changed and got[k]["dtype"] != snapshot[k]["dtype"]))]
        if not (missing or unexpected or reshaped):
            return
        lines = _grouped([("missing", k, snapshot[k], None) for k in missing]
                         + [("unexpected", k, got[k], None) for k in unexpected]
                         + [("reshaped", k, snapshot[k], got[k]) for k in reshaped])
        shown = lines[:MAX_LINES] + ([f"... and {len(lines) - MAX_LINES} more lines"] if len(lines) > MAX_LINES else [])
        raise MigrationError(
            f"{self.ckpt.path}: revision {rev.id} ({rev.path}) {action} left the state dict different from the "
            f"schema recorded for {landed.id} ({landed.schema_path.name}); nothing was written. Make the script "
            "produce it, or record the schema again if the snapshot is what is wrong:\n"
            + "\n".join(f"  {ln}" for ln in shown),
            path=self.ckpt.path, revision=rev.id, script=rev.path, action=action,
            difference={"expected": landed.id, "missing": missing, "unexpected": unexpected, "reshaped": reshaped},
        )


def _own_deviations(was: dict[str, Any], now: dict[str, Any], previous: dict[str, Any] | None) -> set[str]:
    """Keys where the file differed from the snapshot of the revision it was at before the step
    (``previous``; None: not known, so nothing is the file's own) and which the step left alone or
    only renamed (a renamed tensor is the same object under its new key)."""
    if previous is None:
        return set()
    def untouched(k: str) -> bool:
        return k in now and now[k] is was[k]

    extra = {id(v) for k, v in was.items() if k not in previous}
    own = {k for k in previous if k not in was}
    own |= {k for k, v in now.items() if id(v) in extra}
    own |= {k for k in was if k in previous and untouched(k) and list(shape_of(was[k])) != list(previous[k]["shape"])}
    return own


def _fits(entries: MutableMapping[Any, Any], snapshot: dict[str, Any], before: dict[str, Any]) -> bool:
    """The quick form of the comparison (string keys, no schema built): True when every tensor is
    the snapshot's, by key and shape, and by dtype where the step changed it. False sends the
    caller to the exact comparison, which also words the difference."""
    kept = {id(v) for v in before.values()}
    seen = 0
    for key, value in entries.items():
        if not is_entry(value):
            continue
        want = snapshot.get(key) if isinstance(key, str) else None
        if want is None or list(value.shape) != want["shape"]:
            return False
        if id(value) not in kept and dtype_of(value) != want["dtype"]:
            return False
        seen += 1
    return seen == len(snapshot)


#: How many grouped lines of a difference an error shows.
MAX_LINES = 20


def _grouped(rows: list[tuple[str, str, dict[str, Any], dict[str, Any] | None]]) -> list[str]:
    """``missing     layers.{0..2}.weight  [4, 4] float32`` lines, as ``check`` prints a difference."""
    def sig(entry: dict[str, Any]) -> str:
        return f"{list(entry['shape'])} {entry['dtype']}"

    by: dict[tuple[str, str], list[str]] = {}
    for label, key, entry, new in rows:
        by.setdefault((label, sig(entry) + (f" -> {sig(new)}" if new is not None else "")), []).append(key)
    return [f"{label:<11} {line}  {what}" for (label, what), keys in by.items() for line in group_keys(keys)]
