"""Applying a revision path to a checkpoint: run each script, record history, write (the path is
planned by :mod:`ckptmigrate.chain.planning`; the backup kept by :mod:`ckptmigrate.checkpoint.backups`).

A migration that raises leaves nothing behind: the checkpoint is edited lazily in memory and only
written (atomically) when every revision has run. The envelope gets the new revision, schema and
hash and one history entry per revision, including the inverse of every op so the step can be
walked back without a hand-written ``downgrade``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptmigrate import formats
from ckptmigrate.chain.merging import MergeCheck
from ckptmigrate.chain.planning import Plan, plan_for, recorded_inverse
from ckptmigrate.chain.registry import ChainSource
from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.chain.snapshot_check import SnapshotCheck
from ckptmigrate.checkpoint.backups import make_backup
from ckptmigrate.checkpoint.envelope import Envelope, now_utc
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput, MigrationError
from ckptmigrate.ops.context import MigrationContext
from ckptmigrate.ops.operations import OpError
from ckptmigrate.ops.optimizer import POLICIES, OptimizerAlignmentError, check_policy
from ckptmigrate.storage.locking import file_lock
from ckptmigrate.util.gcpause import pausing
from ckptmigrate.util.paths import CHECKPOINT_SUFFIXES as CHECKPOINT_SUFFIXES
from ckptmigrate.util.paths import expand_paths as expand_paths


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
                inverse = recorded_inverse(ckpt, rev)
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
