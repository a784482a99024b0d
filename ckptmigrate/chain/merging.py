"""The merge check: revisions on different branches must not change the same key.

At a merge the branches run one after the other, so a key both change would end as the last writer
left it. A revision *changes* the keys it adds, removes or replaces in the state dict (the state
dict is compared before and after it ran, so direct edits count as well as ops); every upgrade
history entry records them (``changed``), so revisions applied by an earlier upgrade are compared
too. A branch revision that fails on a key another branch changed is reported as the conflict it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import MergeConflict, MigrationError
from ckptmigrate.ops.operations import OpError


class MergeCheck:
    """Refuses an upgrade in which revisions of two branches (neither an ancestor of the other)
    change the same key; with ``graph`` None (a downgrade, a plan built by hand) it checks nothing."""

    def __init__(self, ckpt: Checkpoint, graph: RevisionGraph | None, start: str | None) -> None:
        self.ckpt, self.graph = ckpt, graph
        self.seen: dict[str, set[str] | None] = {}
        if self.graph is None:
            return
        history = ckpt.envelope.history if ckpt.envelope is not None else []
        recorded = {e.get("revision"): e.get("changed") for e in history if e.get("action") == "upgrade"}
        for rid in self.graph.ancestors(start):
            keys = recorded.get(rid)
            self.seen[rid] = set(keys) if isinstance(keys, list) else None

    def _others(self, rev: Revision) -> list[str]:
        return [] if self.graph is None else self.graph.branch_of(rev.id, self.seen)

    def run(self, rev: Revision, fn: Callable[[Checkpoint], None]) -> None:
        try:
            fn(self.ckpt)
        except MigrationError as exc:
            cause = exc.__cause__
            key = getattr(cause, "key", None)
            if isinstance(cause, OpError) and key:
                for other in self._others(rev):
                    hit = sorted(k for k in self.seen[other] or () if k == key or re.fullmatch(key, k))
                    if hit:
                        raise self._conflict(other, rev, hit[0], f" ({rev.id} failed: {cause})") from exc
            raise

    def changed(self, rev: Revision, before: dict[str, Any]) -> set[str]:
        after = self.ckpt.state_dict.entries
        keys = before.keys() ^ after.keys()
        keys.update(k for k in before.keys() & after.keys() if after[k] is not before[k])
        for other in self._others(rev):
            known = self.seen[other]
            if known is None and self.graph is not None and self.graph.revisions[other].lineage != rev.lineage:
                continue  # another lineage's revision (a dependency) with no record: nothing to compare
            if known is None:
                raise MigrationError(
                    f"{self.ckpt.path}: cannot check {rev.id} against {other}, a revision of another branch "
                    "applied without a record of the keys it changed (before ckptmigrate recorded them, or "
                    f"the file was unstamped); downgrade below {other} and upgrade again"
                )
            shared = sorted(keys & known)
            if shared:
                raise self._conflict(other, rev, shared[0], "")
        self.seen[rev.id] = keys
        return keys

    def _conflict(self, first: str, rev: Revision, key: str, detail: str) -> MergeConflict:
        assert self.graph is not None
        a, b = self.graph.revisions.get(first), rev
        where = f"{a} and {b}" if a is not None else f"{first} and {b}"
        return MergeConflict(
            f"{self.ckpt.path}: revisions {where} are on different branches and both change {key!r}{detail}; "
            "the result would depend on their order — make one branch's revision build on the other's "
            "(down_revision), or change the key in the merge revision only",
            (first, rev.id), key)
