"""Applying a revision path to a checkpoint: plan, run each script, record history, write.

A migration that raises leaves nothing behind: the checkpoint is edited lazily in memory and only
written (atomically) when every revision has run. The envelope gets the new revision, schema and
hash and one history entry per revision, including the inverse of every op so the step can be
walked back without a hand-written ``downgrade``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptmigrate import formats
from ckptmigrate.chain.future import future_steps
from ckptmigrate.chain.merging import MergeCheck
from ckptmigrate.chain.registry import ChainSource
from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.chain.snapshot_check import SnapshotCheck
from ckptmigrate.checkpoint.copies import schema_difference
from ckptmigrate.checkpoint.envelope import Envelope, now_utc
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput, MigrationError, NewerThanChain, RevisionError, SchemaMismatch
from ckptmigrate.ops.context import MigrationContext
from ckptmigrate.ops.operations import OpError
from ckptmigrate.ops.optimizer import POLICIES, OptimizerAlignmentError, check_policy
from ckptmigrate.storage.atomic import keep_copy
from ckptmigrate.storage.locking import file_lock
from ckptmigrate.storage.safe_open import follow_user_link
from ckptmigrate.util.gcpause import pausing
from ckptmigrate.util.paths import CHECKPOINT_SUFFIXES as CHECKPOINT_SUFFIXES
from ckptmigrate.util.paths import expand_paths as expand_paths


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


@dataclass
class Outcome:
    """What happened to one file."""

    path: Path
    output: Path | None
    plan: Plan | None
    written: bool = False
    backup: Path | None = None
    error: str | None = None
    ops: list[dict[str, Any]] = field(default_factory=list)
    #: For an object in storage: requests and bytes over the network (``storage.ranges.Transfer``).
    transfer: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "path": str(self.path), "output": str(self.output) if self.output else None,
            "direction": plan.direction if plan else None,
            "from": plan.start if plan else None, "to": plan.target if plan else None,
            "revisions": [s.id for s in plan.steps] if plan else [],
            "written": self.written, "backup": str(self.backup) if self.backup else None,
            "error": self.error, "ops": self.ops,
            **({"transfer": self.transfer} if self.transfer is not None else {}),
        }


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
        if _recorded_inverse(ckpt, rev) is None:
            raise NewerThanChain(
                f"{ckpt.path}: cannot walk back from {newer.revision}: revision {rev.id} of the file's "
                "history recorded no invertible journal (it dropped, truncated or mapped tensors); only the "
                f"release that wrote it can downgrade it ({', '.join(newer.written_by)})",
                str(newer.revision), known, newer.ahead, newer.written_by, path=ckpt.path)
    start = ckpt.envelope.revision if ckpt.envelope is not None else None
    return Plan("downgrade", lineage, start, target, [*future, *steps], "the file's own history", graph)


def _own(value: Any) -> Any:
    """A tensor an op was given (``ckpt.add(key, tensor)``) is cloned for each copy: copies that
    shared its storage would be one tensor in the file, and an EMA updated in place would drag the
    other along."""
    return value.clone() if type(value).__module__.startswith("torch") and hasattr(value, "clone") else value


def _reset(target: Any) -> None:
    target.journal, target.irreversible, target.touched = [], [], []


def _run(ckpt: Checkpoint, rev: Revision, fn: Any, action: str, *, inverse: list[Any] | None = None,
         copy_journals: dict[str, Any] | None = None) -> None:
    """Run ``fn`` (a script's upgrade or downgrade) on a :class:`MigrationContext` over the checkpoint,
    or walk back by the recorded ``inverse``; then the same on each copy of the weights (walking
    back, each copy's own inverse journal from ``copy_journals`` where there is one)."""
    _reset(ckpt)
    context = MigrationContext(ckpt)
    where = f"{ckpt.path}: revision {rev.id} ({rev.path})"
    facts: dict[str, Any] = {"path": ckpt.path, "revision": rev.id, "script": rev.path, "action": action}
    try:
        if inverse is not None:
            ckpt.apply_inverse(inverse)
        else:
            fn(context)
    except OpError as exc:
        raise MigrationError(
            f"{where} {action} failed in {exc.op}" + (f" on {exc.key!r}" if exc.key else "") + f": {exc}",
            op=exc.op, key=exc.key, **facts,
        ) from exc
    except OptimizerAlignmentError as exc:
        raise MigrationError(f"{where}: {exc}", **facts) from exc
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's script can raise anything, exit included
        what = (f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit)
                else f"raised {type(exc).__name__}: {exc}")
        raise MigrationError(f"{where} {action} {what}", **facts) from exc
    schema = ckpt.schema() if ckpt.copies else {}
    for copy in ckpt.copies:
        _reset(copy)
        journal = (copy_journals or {}).get(copy.location)
        try:
            if inverse is not None:
                copy.apply_inverse(journal if isinstance(journal, list) else inverse)
            else:
                replay = MigrationContext(copy, record=False)
                for name, args, kwargs in context.calls:
                    getattr(replay, name)(*map(_own, args), **{k: _own(v) for k, v in kwargs.items()})
        except OpError as exc:
            raise MigrationError(
                f"{where} {action} failed on the copy of the weights at {copy.location!r} in {exc.op}"
                + (f" on {exc.key!r}" if exc.key else "") + f": {exc}", op=exc.op, key=exc.key, **facts,
            ) from exc
        except Exception as exc:  # noqa: BLE001 - a replayed map() runs the user's function
            raise MigrationError(
                f"{where} {action} raised {type(exc).__name__} on the copy of the weights at "
                f"{copy.location!r}: {exc}", **facts,
            ) from exc
        if copy.schema() != schema:
            raise MigrationError(
                f"{where} {action} left the copy of the weights at {copy.location!r} different from the state "
                "dict: it changed ckpt.state_dict directly, which cannot be repeated on each copy; use the ops "
                "(ckpt.add, ckpt.drop, ckpt.map, ...), or declare the state dicts with --state-dict", **facts,
            )


def _upgrade_entry(ckpt: Checkpoint, rev: Revision) -> dict[str, Any] | None:
    if ckpt.envelope is None:
        return None
    for entry in reversed(ckpt.envelope.history):
        if entry.get("revision") == rev.id and entry.get("action") == "upgrade":
            return entry
    return None


def _recorded_inverse(ckpt: Checkpoint, rev: Revision) -> list[Any] | None:
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


def _target_order(plan: Plan, order: Sequence[str] | None) -> list[str] | None:
    if order is not None:
        return list(order)
    if plan.steps:
        target = plan.steps[-1] if plan.direction == "upgrade" else None
        snapshot = target.schema() if target is not None else None
        if snapshot is not None:
            return list(snapshot)
    return None


def _reorder(entries: MutableMapping[str, Any], order: list[str]) -> None:
    """Put a state dict in the model's key order (what optimizer indices are counted in)."""
    rank = {k: i for i, k in enumerate(order)}
    items = sorted(entries.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    entries.clear()
    for k, v in items:
        entries[k] = v


def apply(ckpt: Checkpoint, plan: Plan, *, order: Sequence[str] | None = None,
          trace: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run the plan on the lazy checkpoint; return the history entries (nothing is written).

    ``order`` is the model's state-dict key order (default: the target revision's schema snapshot);
    the result is put in that order, which is also the order optimizer state is renumbered in.
    ``trace`` receives, per revision, each op and the keys it touched (what ``--dry-run`` shows).
    """
    if plan.steps:
        ckpt.refuse_copies_left_behind()
    entries: list[dict[str, Any]] = []
    current = plan.start
    legacy_ids = ckpt.optimizers.legacy_ids() if plan.direction == "upgrade" else None
    restore_ids = None
    merging = MergeCheck(ckpt, plan.graph if plan.direction == "upgrade" else None, plan.start)
    snapshots = SnapshotCheck(ckpt, plan.graph, plan.start)
    for rev in plan.steps:
        before = dict(ckpt.state_dict.entries)
        if plan.direction == "upgrade":
            assert rev.upgrade is not None
            merging.run(rev, functools.partial(_run, rev=rev, fn=rev.upgrade, action="upgrade"))
            changed = merging.changed(rev, before)
            snapshots.step(rev, rev, "upgrade", before)
            entry: dict[str, Any] = {"action": "upgrade", "revision": rev.id, "from": current, "at": now_utc(),
                     "message": rev.message, "script": rev.path.name,
                     "ops": [{"op": op, "keys": len(keys)} for op, keys in ckpt.touched],
                     "inverse": None if ckpt.irreversible else ckpt.journal,
                     "changed": sorted(changed), **provenance(rev)}
            if ckpt.copies:
                entry["copies"] = {c.location: None if c.irreversible else c.journal for c in ckpt.copies}
            if legacy_ids is not None and not entries:
                entry["optimizer_ids"] = legacy_ids
            if ckpt.optimizers.policy != "strict":
                entry["optimizer_policy"] = ckpt.optimizers.policy
            current = rev.id
        else:
            recorded = _upgrade_entry(ckpt, rev) or {}
            if rev.downgrade is not None:
                _run(ckpt, rev, rev.downgrade, "downgrade")
            else:
                inverse = _recorded_inverse(ckpt, rev)
                if inverse is None and _does_nothing(rev.upgrade):
                    inverse = []  # a baseline (or any revision) whose upgrade() is empty has nothing to undo
                if inverse is None:
                    raise MigrationError(
                        f"{ckpt.path}: revision {rev.id} ({rev.path}) has no downgrade() and the "
                        "checkpoint's history holds no invertible record of its upgrade; write a downgrade()",
                        path=ckpt.path, revision=rev.id, script=rev.path, action="downgrade",
                    )
                journals = recorded.get("copies") if isinstance(recorded.get("copies"), dict) else None
                policy = ckpt.optimizers.policy
                if recorded.get("optimizer_policy") in POLICIES:  # undoing what that policy allowed
                    ckpt.optimizers.policy = recorded["optimizer_policy"]
                try:
                    _run(ckpt, rev, None, "downgrade", inverse=inverse, copy_journals=journals)
                finally:
                    ckpt.optimizers.policy = policy
            if "optimizer_ids" in recorded:
                restore_ids = recorded["optimizer_ids"]
            below = plan.graph.revisions.get(rev.downs[0]) if plan.graph is not None and len(rev.downs) == 1 else None
            snapshots.step(rev, below, "downgrade", before)
            down: Any = rev.downs[0] if len(rev.downs) == 1 else (list(rev.downs) or None)
            entry = {"action": "downgrade", "revision": rev.id, "to": down, "at": now_utc(),
                     "script": rev.path.name,
                     "ops": [{"op": op, "keys": len(keys)} for op, keys in ckpt.touched], **provenance(rev)}
            current = down if isinstance(down, str) or down is None else rev.id
        entries.append(entry)
        if trace is not None:
            trace.append({"revision": rev.id, "ops": [{"op": op, "keys": len(keys), "touched": list(keys)}
                                                      for op, keys in ckpt.touched]})
        ckpt.applied.append(rev.id)
    final_order = _target_order(plan, order)
    if final_order is not None:
        _reorder(ckpt.state_dict.entries, final_order)
        for copy in ckpt.copies:
            _reorder(copy.state_dict.entries, final_order)
    for copy in ckpt.copies:
        copy.commit()
    try:
        ckpt.optimizers.finalize(list(ckpt.state_dict.entries))
    except OptimizerAlignmentError as exc:
        raise MigrationError(f"{ckpt.path}: {exc}", path=ckpt.path) from exc
    if restore_ids is not None:
        ckpt.optimizers.restore_ids(restore_ids)
    params = ckpt.optimizers.parameter_keys()
    if entries and params is not None and any(len(p) != len(ckpt.state_dict.entries) for p in params):
        entries[-1]["optimizer_params"] = params
    return entries


def _does_nothing(fn: Any) -> bool:
    """True when ``fn``'s body is only a docstring, ``pass`` or ``...`` (a baseline's upgrade)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    func = tree.body[0] if tree.body else None
    if not isinstance(func, ast.FunctionDef):
        return False
    return all(isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))
               for stmt in func.body)


def provenance(rev: Revision) -> dict[str, Any]:
    """What a history entry records about the code that ran: the script's sha256, ckptmigrate's
    version and, for an installed chain, its distribution and version."""
    from ckptmigrate.checkpoint.envelope import ckptmigrate_version

    out: dict[str, Any] = {"script_sha256": rev.sha256(), "ckptmigrate_version": ckptmigrate_version()}
    if rev.source:
        out["chain"] = rev.source
    return out


def new_envelope(
    ckpt: Checkpoint, plan: Plan, history: list[dict[str, Any]], repo: Path | None = None, *, written: bool = True
) -> Envelope:
    """The envelope after ``plan``; ``written=False`` for an upgrade in memory (no git lookup)."""
    env = Envelope.build(ckpt.state_dict.entries, layout=ckpt.output_layout().name,
                         previous=ckpt.envelope, repo=repo, describe_code=written)
    env.lineage = plan.lineage
    env.revision = plan.target
    env.state_dicts = ckpt.recorded_locations()
    # Release provenance: a digest or signature vouches for the bytes before this migration, so
    # Envelope.build does not carry it over; it is kept in this step's first history entry and the
    # result stays unsigned until stamped again.
    from ckptmigrate.checkpoint.envelope import superseded

    old_provenance = superseded(ckpt.envelope)
    if old_provenance is not None and history:
        history[0]["superseded"] = old_provenance
    env.history.extend(history)
    return env


def backup_path(path: Path, start: int = 0) -> Path:
    """``x.pth.bak``, or ``x.pth.bak.1``, ``.2``, ... — the first name where nothing is, not even a
    dangling symbolic link: an existing backup is never overwritten, a planted link never followed."""
    n = start
    while True:
        candidate = path.with_name(path.name + ".bak" + (f".{n}" if n else ""))
        if not os.path.lexists(candidate):
            return candidate
        n += 1


def make_backup(path: Path) -> tuple[Path, bool]:
    """Keep the original at ``PATH.bak[.N]`` without copying it where possible (see
    :func:`~ckptmigrate.storage.atomic.keep_copy`); True when the backup is a file of its own, so that
    ``path`` may still be appended to in place. The backup is created as a new name only: a name
    taken between the look and the creation (another process, a planted link) moves on to the next."""
    source = follow_user_link(path)
    n = 0
    while True:
        dest = backup_path(path, n)
        try:
            return dest, keep_copy(source, dest)
        except FileExistsError:
            n = int(dest.name.rsplit(".", 1)[1]) + 1 if not dest.name.endswith(".bak") else 1


def refuse_left_behind(ckpt: Checkpoint, graph: RevisionGraph, lineage: str | None) -> None:
    """Refuse a file with a copy of the weights that does not fit, saying which revision it is at
    when its keys are one's (an earlier upgrade that left it behind)."""
    if not ckpt.copy_problems and not ckpt.other_tensor_dicts:
        return
    try:
        snapshots = [(rev.id, rev.schema()) for rev in graph.chain(lineage)]
    except BadInput:  # several lineages and none chosen: no snapshots to name a revision by
        snapshots = []
    for misfit in [*ckpt.copy_problems, *ckpt.other_tensor_dicts]:
        for rev_id, schema in snapshots:
            if schema is not None and schema == misfit.schema:
                raise BadInput(
                    f"{ckpt.path}: {misfit.location!r} is a copy of the weights at revision {rev_id} (its keys "
                    f"are {rev_id}'s), not where the state dict is: an earlier upgrade left it behind; bring "
                    f"it up alone with --key {misfit.location} --state-dict {misfit.location} --from {rev_id}"
                )
    ckpt.refuse_copies_left_behind()


@pausing
def migrate_file(
    path: Path, chains: RevisionGraph | ChainSource, *, to: str = "head", output: Path | None = None,
    dry_run: bool = False, backup: bool = True, from_rev: str | None = None,
    lineage: str | None = None, key: str | None = None, direction: str | None = None,
    trust_pickle: bool = False, state_dicts: Sequence[str] | None = None, optimizer: str = "strict",
    max_shard_size: int | None = None,
) -> Outcome:
    """Upgrade or downgrade one file; ``direction`` refuses the other way (``upgrade --to`` an older rev);
    ``trust_pickle`` gives the migrations the extras as real objects (the file's pickle code runs);
    ``key`` and ``state_dicts`` locate the state dict and its copies (default: recorded or found);
    ``optimizer`` is the policy for parameters that appear or vanish (see ``ops.optimizer``);
    ``max_shard_size`` (bytes) re-plans a sharded model's shards as it is written.

    The destination is locked for the whole read-migrate-write, so concurrent runs serialise.
    ``chains`` is the graph, or where to find the one for this file (the installed chain its envelope names).
    """
    path = formats.checkpoint_path(path)
    lock = contextlib.nullcontext() if dry_run else file_lock(output or path)
    # a multi-file checkpoint a killed run left mid-switch is finished or undone under the lock
    with lock, Checkpoint.open(
        path if dry_run or output else formats.recovered(path), key=key, state_dicts=state_dicts
    ) as ckpt:
        ckpt.optimizers.policy = check_policy(optimizer)
        if max_shard_size is not None and ckpt.format != "hf-sharded":
            raise BadInput(f"{path}: --max-shard-size re-plans the shards of a sharded model (an index and its "
                           f"shards), not of a {ckpt.format} checkpoint")
        graph = chains if isinstance(chains, RevisionGraph) else chains.for_envelope(ckpt.envelope)
        plan = plan_for(ckpt, graph, to=to, from_rev=from_rev, lineage=lineage)
        if direction is not None and plan.steps and plan.direction != direction:
            raise BadInput(
                f"{path}: {direction} to {to} would {plan.direction} ({plan.describe()}); "
                f"use `ckptmigrate {plan.direction}`"
            )
        refuse_left_behind(ckpt, graph, plan.lineage)  # also at head: the file would claim what is not so
        if trust_pickle and plan.steps:
            ckpt.trust_pickle()
        outcome = Outcome(path, output, plan)
        if not plan.steps:
            if output is not None and not dry_run and output.resolve() != path.resolve():
                # `-o` always leaves a file there (in the container its name asks for): pipelines rely on it
                ckpt.write(output, ckpt.envelope, fmt=_output_format(ckpt, output), max_shard_bytes=max_shard_size)
                outcome.written = True
            return outcome
        history = apply(ckpt, plan, trace=outcome.ops)
        ckpt.refuse_changed_module()
        if dry_run:
            return outcome
        env = new_envelope(ckpt, plan, history)
        dest = output or path
        independent = True
        multi = ckpt.format in formats.MULTI_FORMATS
        if output is None and backup:
            # a multi-file checkpoint's backup is its index (or .metadata), and its old shards are kept
            outcome.backup, independent = make_backup(formats.commit_file(path) if multi else path)
        try:
            # a backup that is a hard link shares the original's inode: never append to it
            ckpt.write(dest, env, fmt=_output_format(ckpt, dest), append_in_place=independent,
                       keep_old=multi and outcome.backup is not None, max_shard_bytes=max_shard_size)
        except BaseException:
            if outcome.backup is not None:
                outcome.backup.unlink(missing_ok=True)
            raise
        outcome.output = dest
        outcome.written = True
        return outcome


def _output_format(ckpt: Checkpoint, dest: Path) -> str:
    if ckpt.format in formats.MULTI_FORMATS:
        return ckpt.format
    if dest.suffix == ".safetensors":
        return "safetensors"
    if ckpt.format == "safetensors" and dest.suffix in ("", ".safetensors"):
        return "safetensors"
    return "torch-zip"
