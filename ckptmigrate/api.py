"""The Python API: every command is a plain function here, and the CLI only parses and prints.

Checkpoints: :func:`save`, :func:`load`, :func:`inspect`, :func:`current`, :func:`stamp`,
:func:`upgrade`, :func:`downgrade`, :func:`compact`, :func:`sanitize`, :func:`verify`, :func:`verify_manifest`,
:func:`checkpoint_files`. The project: :func:`init`, :func:`new_revision`, :func:`heads`,
:func:`history`, :func:`record_schema`, :func:`check`, :func:`diff` (from
:mod:`ckptmigrate.chain.project` and :mod:`ckptmigrate.autogenerate.compare`). Validation lives
here, not in the CLI; errors are the types of :mod:`ckptmigrate.errors`, with their facts as fields.
A checkpoint (and an output, a key, a manifest) may be named by URL (``s3://bucket/key``): read by
range, rewritten in one conditional step, or, for what needs every byte, staged through a local
temporary copy (:mod:`ckptmigrate.storage.staged`). Fleets of files: :func:`ckptmigrate.fleet.run_fleet`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptmigrate.checkpoint.envelope import Envelope, now_utc
from ckptmigrate.checkpoint.layout import locate
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput, CkptMigrateError, OutputExists, SchemaMismatch, UnsafePickleWarning
from ckptmigrate.formats import safetensors_io, torchzip
from ckptmigrate.release import stamping
from ckptmigrate.storage.atomic import atomic_write
from ckptmigrate.storage.locking import file_lock
from ckptmigrate.util.gcpause import pausing
from ckptmigrate.util.urls import ObjectURL, as_location

__all__ = [
    "autogenerate_revision", "chain_source", "chain_status", "check", "checkpoint_files", "compact", "convert",
    "current", "diff",
    "downgrade", "heads", "history", "init", "inspect", "load", "new_revision", "record_schema",
    "keygen", "revision_graph", "sanitize", "save", "script_directory", "stamp", "upgrade", "verify", "verify_manifest",
]

if TYPE_CHECKING:  # the migration machinery is imported when used: `inspect` starts faster without it
    from ckptmigrate.autogenerate.compare import Check, Comparison
    from ckptmigrate.chain.engine import Outcome
    from ckptmigrate.chain.registry import ChainSource
    from ckptmigrate.chain.revisions import RevisionGraph
    from ckptmigrate.chain.scripts import ScriptDirectory
    from ckptmigrate.release.integrity import VerifyResult

PathLike = str | os.PathLike[str]


@pausing
def inspect(
    path: str | os.PathLike[str], *, keys: bool = False, key: str | None = None,
    state_dicts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Describe a checkpoint from its metadata alone (no tensor bytes read, torch not imported);
    ``state_dicts`` lists where every copy of the weights is (the main one first)."""
    if isinstance(as_location(path), ObjectURL):
        from ckptmigrate.storage.ranges import TRANSFER

        before = TRANSFER.to_dict()
        with Checkpoint.open(path, key=key, state_dicts=state_dicts) as ckpt:
            info = ckpt.summary(keys=keys)
        info["transfer"] = {k: v - before[k] for k, v in TRANSFER.to_dict().items()}
        return info
    with Checkpoint.open(path, key=key, state_dicts=state_dicts) as ckpt:
        return ckpt.summary(keys=keys)


# -- the project (chain/project.py), imported when used: `inspect` and `current` start without it --


def script_directory(migrations: str | os.PathLike[str] | None = None, *, cwd: Path | None = None) -> ScriptDirectory:
    """The script directory named by ``migrations`` (a path or a module), else by pyproject.toml."""
    from ckptmigrate.chain import project

    return project.script_directory(migrations, cwd=cwd)


def revision_graph(migrations: Any = None) -> RevisionGraph:
    """The validated revision graph of ``migrations`` (a path, a module, a graph), else pyproject.toml's."""
    from ckptmigrate.chain import project

    return project.revision_graph(migrations)


def init(directory: PathLike = "migrations", *, cwd: Path | None = None) -> tuple[Path, Path]:
    """Create a script directory and record it in pyproject.toml (:func:`ckptmigrate.chain.project.init`)."""
    from ckptmigrate.chain import project

    return project.init(directory, cwd=cwd)


def heads(migrations: Any = None) -> list[dict[str, Any]]:
    """The head of each lineage (:func:`ckptmigrate.chain.project.heads`)."""
    from ckptmigrate.chain import project

    return project.heads(migrations)


def history(migrations: Any = None) -> list[dict[str, Any]]:
    """Every revision, newest first per lineage (:func:`ckptmigrate.chain.project.history`)."""
    from ckptmigrate.chain import project

    return project.history(migrations)


def new_revision(message: str, *, rev_id: str | None = None, lineage: str | None = None,
                 autogenerate: bool = False, model: str | None = None,
                 migrations: str | os.PathLike[str] | None = None) -> Path:
    """Write a revision on top of the head, with the model's schema snapshot when a model is named
    (:func:`ckptmigrate.chain.project.new_revision`)."""
    from ckptmigrate.chain import project

    return project.new_revision(message, rev_id=rev_id, lineage=lineage, autogenerate=autogenerate, model=model,
                                migrations=migrations)


def autogenerate_revision(message: str, *, rev_id: str | None = None, lineage: str | None = None,
                          migrations: str | os.PathLike[str] | None = None, model: str | None = None) -> Path:
    """Write a revision whose ops take head's schema to the model's
    (:func:`ckptmigrate.chain.project.autogenerate_revision`)."""
    from ckptmigrate.chain import project

    return project.autogenerate_revision(message, rev_id=rev_id, lineage=lineage, migrations=migrations,
                                         model=model)


def record_schema(revision: str, source: Any = None, *, model: str | None = None, migrations: Any = None) -> Path:
    """Record the schema ``revision`` produces, from a model, a state dict, a checkpoint file or the
    named/configured model (:func:`ckptmigrate.chain.project.record_schema`)."""
    from ckptmigrate.chain import project

    return project.record_schema(revision, source, model=model, migrations=migrations)


def chain_source(migrations: Any = None) -> ChainSource:
    """Where each checkpoint's chain comes from: ``migrations`` or the configured directory when
    there is one, else the installed chain the checkpoint's envelope names (``ckptmigrate.chains``);
    a ChainSource is returned as it is."""
    from ckptmigrate.chain import project, registry

    if isinstance(migrations, registry.ChainSource):
        return migrations
    if not project.configured(migrations):
        return registry.ChainSource()
    return registry.ChainSource(project.revision_graph(migrations))


def _optional_graph(migrations: Any, ckpt: Checkpoint | None = None) -> RevisionGraph | None:
    """The chain for ``ckpt`` (or, without one, the configured chain); None when there is none. With
    nothing configured, the installed chain that knows ``ckpt`` (see :mod:`ckptmigrate.chain.registry`)."""
    from ckptmigrate.chain import project, registry

    if not project.configured(migrations):
        return None if ckpt is None else registry.ChainSource().find(ckpt.envelope)
    return project.revision_graph(migrations)


def checkpoint_files(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The files that ``paths`` (files, directories searched recursively, glob patterns) name.

    A directory or pattern that holds no checkpoint file is an error naming it, as is no path at all.
    """
    from ckptmigrate.util.paths import CHECKPOINT_SUFFIXES, expand_paths

    specs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not specs:
        raise BadInput("no checkpoint files given")
    files: list[Path] = []
    for spec in specs:
        found = list(expand_paths([os.fspath(spec)]))
        if not found:
            raise BadInput(f"{os.fspath(spec)}: no checkpoint files found (looked for "
                           f"{', '.join(CHECKPOINT_SUFFIXES)})", path=spec)
        files += found
    return files


def _names_object(*paths: PathLike | None) -> bool:
    """Whether any of ``paths`` is an object URL (the command then runs staged: storage/staged.py)."""
    return any(p is not None and isinstance(as_location(p), ObjectURL) for p in paths)


def _check_output(source: PathLike, output: PathLike | None, overwrite: bool) -> Path | None:
    """``output`` as a Path after the checks every writing function makes: its directory exists, and
    it is not an existing file (other than the source itself) unless ``overwrite``."""
    if output is None:
        return None
    out = Path(output)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise BadInput(f"{out}: the output's directory {parent} does not exist", path=out)
    if out.exists() and not overwrite and out.resolve() != Path(source).resolve():
        error = OutputExists(f"{out}: the output exists, and overwriting it was not asked for", path=out)
        error.cli_hint = "pass --overwrite to replace it"
        raise error
    return out


def save(
    obj: Any, path: str | os.PathLike[str], *, migrations: Any = None, lineage: str | None = None,
    tags: Mapping[str, str] | None = None, format: str | None = None,
    include: str | Sequence[str] | None = None,
) -> Path:
    """Save a module, a state dict or a checkpoint dict, stamped at the lineage's head revision."""
    import torch

    path = Path(path)
    payload = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(payload, Mapping):
        raise BadInput(f"save: expected a module or a dict, got {type(obj).__name__}")
    fmt = format or ("safetensors" if path.suffix == ".safetensors" else "torch-zip")
    graph = _optional_graph(migrations)
    if graph is None and lineage is not None:
        from ckptmigrate.chain import registry

        graph = registry.ChainSource().for_lineage(lineage)  # a chain an installed package ships
    revision = None
    if graph is not None and len(graph):
        head = graph.head(lineage)
        revision, lineage = head.id, head.lineage
    layout = locate(payload)
    state_dict = layout.state_dict(payload)
    if include is not None:
        patterns = [include] if isinstance(include, str) else list(include)
        kept = type(state_dict)((k, v) for k, v in state_dict.items()
                                if any(re.fullmatch(p, k) or k.startswith(p + ".") for p in patterns))
        if hasattr(state_dict, "_metadata"):
            kept._metadata = state_dict._metadata
        state_dict = kept
        payload = layout.rebuild(payload, state_dict, layout.extras(payload))
    env = Envelope.build(state_dict, layout=layout.name, tags=tags)
    env.lineage, env.revision = lineage, revision
    env.history.append({"action": "save", "at": now_utc(), "revision": revision})
    if fmt == "safetensors":
        if layout.kind != "bare":
            raise BadInput(f"{path}: safetensors holds only a flat dict of tensors; save a state dict")
        with atomic_write(path) as fh:
            safetensors_io.write(fh, dict(state_dict), env.to_dict(), {})
        return path
    with atomic_write(path) as fh:
        torch.save(payload, fh)
        fh.flush()
        torchzip.append_records(fh, {torchzip.ENVELOPE_RECORD: torchzip.envelope_bytes(env.to_dict())})
    return path


def load(
    path: str | os.PathLike[str], *, migrations: Any = None, to: str = "head",
    map_location: Any = None, mmap: bool = True, trust_pickle: bool = False, key: str | None = None,
    from_rev: str | None = None, state_dicts: Sequence[str] | None = None, optimizer: str = "strict",
) -> Checkpoint:
    """Open a checkpoint and upgrade it in memory to ``to``; the file on disk is not changed.

    Tensors are memory-mapped (``mmap``) and loaded on the CPU (a CUDA-saved file needs no
    ``map_location``); ``trust_pickle=True`` runs the file's pickle code to rebuild the extras as
    real objects — only for files you trust. ``from_rev`` says which revision an unstamped file is at
    when its schema matches none. ``key``/``state_dicts`` locate the state dict and its copies (EMA,
    best), which are upgraded alike; ``optimizer="reset_new"`` lets a migration add a parameter that
    optimizer state must cover.
    """
    from ckptmigrate.ops.optimizer import check_policy

    policy = check_policy(optimizer)
    ckpt = Checkpoint.open(path, key=key, state_dicts=state_dicts)
    try:
        return _upgrade_in_memory(ckpt, policy, map_location, mmap, trust_pickle, migrations, to, from_rev)
    except BaseException:
        ckpt.close()
        raise


def _upgrade_in_memory(
    ckpt: Checkpoint, policy: str, map_location: Any, mmap: bool, trust_pickle: bool, migrations: Any, to: str,
    from_rev: str | None,
) -> Checkpoint:
    import warnings

    import torch

    from ckptmigrate.chain.engine import apply, new_envelope
    from ckptmigrate.chain.planning import plan_for
    from ckptmigrate.checkpoint.compat import version_notes

    ckpt.optimizers.policy = policy
    ckpt.map_location = map_location
    ckpt.mmap = mmap
    notes = version_notes(
        ckpt.metadata, ckpt.summary()["devices"], torch_version=torch.__version__,
        cuda_available=torch.cuda.is_available(), cuda_version=torch.version.cuda,
    )
    for note in notes:
        warnings.warn(f"{ckpt.path}: {note}", stacklevel=2)
    safety = ckpt.pickle_safety()
    if not safety.weights_only:
        warnings.warn(
            f"{ckpt.path}: its pickle names {', '.join(safety.unsafe[:5])}"
            f"{f' (+{len(safety.unsafe) - 5} more)' if len(safety.unsafe) > 5 else ''}, outside torch's "
            "weights_only allow-list: ckptmigrate keeps them inert, torch.load(weights_only=False) would run them",
            UnsafePickleWarning, stacklevel=2,
        )
    if trust_pickle:
        ckpt.trust_pickle()
    from ckptmigrate.chain.project import configured
    from ckptmigrate.errors import SchemaMismatch

    graph = _optional_graph(migrations, ckpt)
    if graph is None or not len(graph):
        return ckpt
    try:
        plan = plan_for(ckpt, graph, to=to, from_rev=from_rev)
    except SchemaMismatch:
        if not configured(migrations):
            return ckpt  # a file no installed chain recognises is another model's: loaded as it is
        raise
    ckpt.head_revision = graph.head(plan.lineage).id
    if not plan.steps and ckpt.copy_problems:
        warnings.warn(f"{ckpt.path}: {ckpt.copy_problems[0]}", stacklevel=3)
    if plan.steps:
        history = apply(ckpt, plan)
        ckpt.envelope = new_envelope(ckpt, plan, history, written=False)
    return ckpt


def compact(path: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None,
            overwrite: bool = False) -> tuple[int, int]:
    """Rewrite a torch zip file with only its live records (in-place appends leave orphaned bytes),
    or a DCP directory's ``.distcp`` files with only the chunks its ``.metadata`` still names
    (a migration that drops or changes a tensor leaves its old chunks behind).

    Returns the sizes before and after (of all its files). The envelope is kept as it is; tensors
    are copied by the kernel.
    """
    from ckptmigrate import formats

    if _names_object(path, output):
        from ckptmigrate.storage.staged import staged

        with staged(path, output, overwrite=overwrite) as stage:
            return compact(stage.source, output=stage.output, overwrite=overwrite)
    path = formats.checkpoint_path(path)
    dest = _check_output(path, output, overwrite) or Path(path)
    with file_lock(dest), Checkpoint.open(path if output else formats.recovered(path)) as ckpt:
        before = _disk_bytes(ckpt)
        if output is None and ckpt.format == "hf-sharded":
            return before, before  # a shard whose tensors change is rewritten whole: no dead bytes
        written = ckpt.write(dest, ckpt.envelope, compact=True)
    if ckpt.format not in formats.MULTI_FORMATS:
        return before, os.stat(written).st_size
    with Checkpoint.open(written) as again:
        return before, _disk_bytes(again)


def _disk_bytes(ckpt: Checkpoint) -> int:
    """The bytes of a checkpoint's files: the file, or the commit file, shards and envelope file."""
    from ckptmigrate import formats

    if ckpt.format not in formats.MULTI_FORMATS:
        return os.stat(ckpt.path).st_size
    commit = formats.commit_file(ckpt.path)
    return sum(os.stat(commit.parent / name).st_size for name in {commit.name, *ckpt.container.parts.files()})


def sanitize(
    path: PathLike, *, output: PathLike | None = None, overwrite: bool = False, dry_run: bool = False,
    backup: bool = True, key: str | None = None,
) -> dict[str, Any]:
    """Rewrite a torch file so that ``torch.load(weights_only=True)`` reads it: ``argparse.Namespace``,
    numpy values, paths and OmegaConf configs in the non-tensor payload become plain data and tensors
    (``ckpt.sanitize()``, :mod:`ckptmigrate.ops.sanitize`; nothing the pickle names is imported or
    called). In place (keeping ``PATH.bak`` unless ``backup=False``) or into ``output``; ``dry_run``
    converts in memory and writes nothing. Not reversible: the envelope records a ``sanitize``
    history entry; a digest or signature is superseded, as by ``upgrade`` (stamp again to sign).

    Returns ``path``, ``output``, ``written``, ``backup``, ``converted`` (``[{"global", "to",
    "count"}]``), and the verdict on the result: ``weights_only``, ``unsafe_globals`` (what still
    blocks it, left as it was), ``called``; ``superseded`` when a digest or signature was dropped. A
    safetensors or multi-file checkpoint holds no pickle: ``weights_only`` is None, with a ``note``.
    """
    from ckptmigrate import formats
    from ckptmigrate.chain.backups import make_backup
    from ckptmigrate.checkpoint.envelope import superseded
    from ckptmigrate.checkpoint.layout import module_class

    if _names_object(path, output):
        from ckptmigrate.storage.staged import staged

        with staged(path, output, overwrite=overwrite, write_back=not dry_run,
                    backup=backup and output is None) as stage:
            staged_row = sanitize(stage.source, output=stage.output, overwrite=overwrite, dry_run=dry_run,
                                  backup=False, key=key)
        shown = stage.shown(staged_row["output"]) if staged_row["output"] else None
        return {**staged_row, "path": os.fspath(path), "output": shown,
                "backup": str(stage.backup) if stage.backup is not None else None}
    out = _check_output(path, output, overwrite)
    source = formats.checkpoint_path(path)
    dest = out or source
    lock = contextlib.nullcontext() if dry_run else file_lock(dest)
    with lock, Checkpoint.open(source, key=key) as ckpt:
        row: dict[str, Any] = {"path": os.fspath(path), "output": None, "written": False, "backup": None,
                               "converted": [], "superseded": False}
        if ckpt.format not in ("torch-zip", "torch-legacy"):  # nothing pickled: nothing to convert
            row.update(weights_only=None, unsafe_globals=[], called=[],
                       note=f"a {ckpt.format} checkpoint holds no pickle: nothing to sanitize")
            if out is not None and not dry_run:
                ckpt.write(out, ckpt.envelope, fmt=ckpt.format)
                row.update(output=str(out), written=True)
            return row
        if ckpt.layout.kind == "module":
            raise BadInput(
                f"{source}: holds a whole pickled nn.Module ({module_class(ckpt.container.payload)}), which "
                "torch.load(weights_only=True) refuses whatever its attributes hold; nothing was written. "
                "Save its state_dict() and sanitize that", path=source)
        report = ckpt.sanitize()
        row.update(report.to_dict())
        if dry_run:
            return row
        if not report.converted:
            if out is not None and out.resolve() != source.resolve():
                ckpt.write(out, ckpt.envelope)  # -o always leaves a file there, as upgrade -o does
                row.update(output=str(out), written=True)
            return row
        env = Envelope.build(ckpt.state_dict.entries, layout=ckpt.output_layout().name, previous=ckpt.envelope)
        env.state_dicts = ckpt.recorded_locations()
        entry: dict[str, Any] = {
            "action": "sanitize", "at": now_utc(), "revision": env.revision,
            "converted": {f"{c['global']} -> {c['to']}": c["count"] for c in row["converted"]},
            "blocking": list(report.blocking), "ckptmigrate_version": env.ckptmigrate_version,
        }
        old = superseded(ckpt.envelope)
        if old is not None:
            entry["superseded"] = old
            row["superseded"] = True
        env.history.append(entry)
        independent = True
        if out is None and backup:
            kept, independent = make_backup(source)
            row["backup"] = str(kept)
        try:
            ckpt.write(dest, env, append_in_place=independent)
        except BaseException:
            if row["backup"] is not None:
                Path(row["backup"]).unlink(missing_ok=True)
            raise
        row.update(output=str(dest), written=True)
    with Checkpoint.open(dest, key=key) as again:  # the verdict on the file as written
        row.update(again.pickle_safety().to_dict())
    return row


#: ``convert --to`` names and the containers they write.
CONVERT_TARGETS = {"torch": "torch-zip", "safetensors": "safetensors", "hf-sharded": "hf-sharded", "dcp": "dcp"}


def convert(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str, max_shard_size: int | None = None,
    state_dict_only: bool = False,
) -> Path:
    """Write ``src`` (any container, one file or several) as ``dst`` in the ``to`` container by byte-range
    copies: tensors whose bytes are a contiguous run are copied by the kernel, a DCP tensor sharded across
    ranks is assembled one at a time, so memory stays near the largest tensor. The envelope is carried
    (with a ``convert`` history entry); ``state_dict_only`` leaves the extras (safetensors holds no
    extras). ``max_shard_size`` (bytes) bounds the shards of an ``hf-sharded`` result (default 5 GB)."""
    from ckptmigrate import formats
    from ckptmigrate.util.memory import release_large_blocks

    release_large_blocks()
    if to not in CONVERT_TARGETS:
        raise BadInput(f"--to {to}: not one of {', '.join(CONVERT_TARGETS)}")
    fmt = CONVERT_TARGETS[to]
    if _names_object(src, dst):
        from ckptmigrate.formats import MULTI_FORMATS
        from ckptmigrate.storage.staged import staged

        if fmt in MULTI_FORMATS and isinstance(as_location(dst), ObjectURL):
            raise BadInput(f"{as_location(dst)}: writing a {fmt} checkpoint (several files) to object storage is "
                           "not supported (its files could not be replaced in one step); convert to a local "
                           "directory", path=str(as_location(dst)))
        with staged(src, dst, write_back=False) as stage:
            assert stage.output is not None
            written = convert(stage.source, stage.output, to=to, max_shard_size=max_shard_size,
                              state_dict_only=state_dict_only)
        located = stage.location(written)
        assert located is not None
        return located
    dst = Path(dst)
    src = formats.checkpoint_path(src)
    if dst.exists() and dst.resolve() == Path(src).resolve():
        raise BadInput(f"{dst}: converting a checkpoint onto itself; give another destination")
    with file_lock(dst), Checkpoint.open(src) as ckpt:
        target = ckpt
        if state_dict_only:  # tensors only, nested dicts flattened to dotted keys as DCP names them
            from ckptmigrate.formats.dcp import flatten
            from ckptmigrate.tensors.refs import is_entry

            flat = {fqn: v for fqn, _path, v in flatten(dict(ckpt.state_dict.entries)) if is_entry(v)}
            target = Checkpoint.from_payload(flat, name=str(src))
        elif fmt in ("safetensors", "hf-sharded") and ckpt.layout.kind != "bare":
            raise BadInput(
                f"{src}: {to} holds only a flat dict of tensors, and this checkpoint's state dict sits under "
                f"{ckpt.layout.name} with {sorted(map(str, ckpt.extras))[:5]} beside it; pass --state-dict-only"
            )
        env = Envelope.build(target.state_dict.entries, layout=target.output_layout().name, previous=ckpt.envelope)
        env.history.append({"action": "convert", "at": now_utc(), "revision": env.revision,
                            "from_container": ckpt.format, "to_container": fmt})
        return target.write(dst, env, fmt=fmt, max_shard_bytes=max_shard_size)


def current(path: PathLike, *, verbose: bool = False, migrations: Any = None) -> dict[str, Any]:
    """The revision a checkpoint is at, from its envelope: ``path``, ``revision`` (None when
    unstamped or at base), ``lineage``, ``stamped``; for a stamped file also :func:`chain_status`
    (``newer``, ``warnings``, and with ``verbose`` ``applied``)."""

    try:
        _fmt, env = _read_envelope(path)
    except CkptMigrateError as exc:
        exc.path = exc.path or os.fspath(path)
        raise
    env = env or None
    row: dict[str, Any] = {"path": os.fspath(path), "revision": env.get("revision") if env else None,
                           "lineage": env.get("lineage") if env else None, "stamped": env is not None}
    if env is not None:
        row.update(chain_status(path, env, migrations=migrations, verbose=verbose))
    return row


def _at(envelope: Mapping[str, Any] | None) -> str:
    """Where an envelope says its file is, as a stamp's commit message names it."""
    return "unstamped" if envelope is None else envelope.get("revision") or "base"


def _read_envelope(path: PathLike) -> tuple[str, dict[str, Any] | None]:
    """The envelope; of a multi-file checkpoint under a prefix, from its small files alone (by range)."""
    from ckptmigrate import formats

    return formats.read_envelope(as_location(path))


def chain_status(path: PathLike, env: Mapping[str, Any], *, migrations: Any = None,
                 verbose: bool = False) -> dict[str, Any]:
    """Where a stamped file stands against its chain: ``newer`` (the file is at a revision the chain
    does not know: ``known``, ``ahead``, ``written_by``), ``warnings`` (that, or applied scripts
    edited since they ran on it), and with ``verbose`` ``applied`` (each recorded step with the
    script's sha256 and the versions that ran it). Reads the scripts' ids without importing them,
    unless the file is newer or ``verbose`` asks for the script hashes."""
    from ckptmigrate.chain import project, provenance

    path = as_location(path)
    try:
        envelope = Envelope.from_dict(dict(env), origin=str(path))
    except (TypeError, ValueError):
        return {}  # an envelope this version cannot read has nothing to compare
    try:
        directory = project.script_directory(migrations) if project.configured(migrations) else None
    except CkptMigrateError:
        return {}  # no chain to compare with: the commands that need one say why
    newer = provenance.newer_than_chain(path, envelope, directory)
    out: dict[str, Any] = {"newer": None, "warnings": [str(newer)] if newer is not None else []}
    if newer is not None:
        out["newer"] = {"known": newer.known, "ahead": newer.ahead, "written_by": newer.written_by,
                        "hint": newer.cli_hint}
    if verbose:
        out["applied"] = [{k: e.get(k) for k in ("action", "revision", "at", "script", "script_sha256",
                                                   "ckptmigrate_version", "chain")}
                          for e in envelope.history if e.get("action") in ("upgrade", "downgrade")]
        if newer is None and envelope.revision is not None:
            try:
                out["warnings"] += provenance.edited_warnings(path, envelope, chain_source(migrations))
            except CkptMigrateError as exc:
                out["warnings"].append(f"{path}: cannot compare the scripts that ran on it: {exc}")
    return out


def stamp(
    path: PathLike, *, output: PathLike | None = None, overwrite: bool = False,
    tags: Mapping[str, str] | None = None, repo: PathLike | None = None, key: str | None = None,
    lineage: str | None = None, revision: str | None = None, migrations: Any = None,
    release: str | None = None, sign: Any = None, digest: bool = False, allow_dirty: bool = False,
    allow_unsafe_pickle: bool = False,
) -> Path:
    """Write the envelope into ``path`` (or ``output``) without changing any tensor; see
    :func:`ckptmigrate.release.stamping.stamp` (``allow_unsafe_pickle``: sign or release a file whose
    pickle names globals outside torch's ``weights_only`` allow-list).

    ``revision`` (an id or unique prefix) must be a revision of the chain (``migrations``, default
    pyproject.toml's); its lineage is recorded with it. A file whose schema is exactly another
    revision's snapshot is refused with the difference: stamping it would send the next upgrade
    down the wrong path.
    """
    if _names_object(output) or (_names_object(path) and output is not None):
        from ckptmigrate.storage.staged import staged

        with staged(path, output, overwrite=overwrite) as stage:
            before = _read_envelope(stage.source)[1]
            written = stamp(stage.source, output=stage.output, overwrite=overwrite, tags=tags, repo=repo, key=key,
                            lineage=lineage, revision=revision, migrations=migrations, release=release, sign=sign,
                            digest=digest, allow_dirty=allow_dirty, allow_unsafe_pickle=allow_unsafe_pickle)
            stage.what = f"stamp {_at(before)} -> {_at(_read_envelope(written)[1])}"
        located = stage.location(written)
        assert located is not None
        return located
    out = _check_output(path, output, overwrite)
    if revision is not None:
        graph = revision_graph(migrations)
        rev = graph.get(revision)
        revision, lineage = rev.id, rev.lineage
        _refuse_other_revisions_schema(as_location(path), revision, key, graph)
    return stamping.stamp(path, output=out, tags=tags, repo=repo, key=key, lineage=lineage, revision=revision,
                          release=release, sign=sign, digest=digest, allow_dirty=allow_dirty,
                          allow_unsafe_pickle=allow_unsafe_pickle)


def _refuse_other_revisions_schema(path: Path | ObjectURL, revision: str, key: str | None,
                                   graph: RevisionGraph) -> None:
    from ckptmigrate.autogenerate.plan import diff_schemas

    with Checkpoint.open(path, key=key) as ckpt:
        schema = ckpt.schema()
    wanted = graph.get(revision)
    snapshot = wanted.schema()
    if snapshot is None or snapshot == schema:
        return
    for lin in graph.lineages():
        for rev in graph.chain(lin):
            if rev.id != revision and rev.schema() == schema:
                difference = diff_schemas(snapshot, schema)
                raise SchemaMismatch(
                    f"{path}: its schema is revision {rev.id}'s, not {revision}'s ({'; '.join(difference.lines())}); "
                    f"stamp it at {rev.id}, or upgrade it there", path=path, nearest=rev.id,
                    missing=sorted(snapshot.keys() - schema.keys()), unexpected=sorted(schema.keys() - snapshot.keys()),
                    reshaped=sorted(k for k in snapshot.keys() & schema.keys() if snapshot[k] != schema[k]),
                )


def _migrate(direction: str, path: PathLike, *, to: str, output: PathLike | None, overwrite: bool,
             migrations: Any, **options: Any) -> Outcome:
    from ckptmigrate.chain.engine import migrate_file

    location = as_location(path)
    if isinstance(location, ObjectURL) and output is None:
        from ckptmigrate.chain.objects import migrate_object

        return migrate_object(location, chain_source(migrations), direction=direction, to=to, **options)
    if _names_object(path, output):
        from ckptmigrate.storage.staged import staged

        with staged(path, output, overwrite=overwrite, write_back=False) as stage:
            outcome = migrate_file(stage.source, chain_source(migrations), to=to, output=stage.output,
                                   direction=direction, **options)
            stage.what = outcome.plan.describe() if outcome.plan is not None else None
        outcome.path = stage.location(outcome.path) or outcome.path
        outcome.output = stage.location(outcome.output)
        return outcome
    out = _check_output(path, output, overwrite)
    return migrate_file(Path(path), chain_source(migrations), to=to, output=out, direction=direction, **options)


def upgrade(
    path: PathLike, *, to: str = "head", output: PathLike | None = None, overwrite: bool = False,
    dry_run: bool = False, backup: bool = True, from_rev: str | None = None, lineage: str | None = None,
    key: str | None = None, trust_pickle: bool = False, migrations: Any = None, **options: Any,
) -> Outcome:
    """Upgrade one file to ``to``, in place (keeping ``PATH.bak`` unless ``backup=False``) or into
    ``output``; ``dry_run`` plans and runs the migrations in memory and writes nothing. Further
    ``options`` go to :func:`ckptmigrate.chain.engine.migrate_file`. Returns what happened."""
    return _migrate("upgrade", path, to=to, output=output, overwrite=overwrite, migrations=migrations,
                    dry_run=dry_run, backup=backup, from_rev=from_rev, lineage=lineage, key=key,
                    trust_pickle=trust_pickle, **options)


def downgrade(
    path: PathLike, *, to: str, output: PathLike | None = None, overwrite: bool = False,
    dry_run: bool = False, backup: bool = True, from_rev: str | None = None, lineage: str | None = None,
    key: str | None = None, trust_pickle: bool = False, migrations: Any = None, **options: Any,
) -> Outcome:
    """Walk one file back to ``to`` (a revision, ``-N`` or ``base``); as :func:`upgrade` otherwise."""
    return _migrate("downgrade", path, to=to, output=output, overwrite=overwrite, migrations=migrations,
                    dry_run=dry_run, backup=backup, from_rev=from_rev, lineage=lineage, key=key,
                    trust_pickle=trust_pickle, **options)


def keygen(private: PathLike, public: PathLike) -> str:
    """Write a new Ed25519 key pair for signing (PEM; the private file mode 600; existing files are never
    overwritten) and return the public key's fingerprint."""
    from ckptmigrate.release import signing

    return signing.keygen(private, public)


def verify(path: PathLike, public_key: Any = None, *, key: str | None = None) -> VerifyResult:
    """Recompute a stamped file's digests and check its signature (``public_key``: a key or its PEM
    file, which must then have signed it); ``key`` is the state dict's location, as everywhere."""
    from ckptmigrate.release import integrity

    if _names_object(path):  # read by range, hashed as it streams by: nothing is staged on disk
        path = as_location(path)
    return integrity.verify(path, public_key, state_key=key)



def verify_manifest(manifest: PathLike, public_key: Any = None, *, jobs: int | None = None, strict: bool = False
                    ) -> tuple[dict[str, Any], list[VerifyResult]]:
    """Check a release manifest: its signature, and every file it lists (present, hashing to the
    listed digest, signed by the listed key, stamped for the release). Returns (the manifest's
    verdict: ``release``, ``commit``, ``files``, ``signature``, ``signed_by``, ``unlisted`` (checkpoint
    files in its directory it does not list: a problem with ``strict``), ``problems``, ``ok``;
    the verdict of each listed file)."""
    from ckptmigrate.release import signing
    from ckptmigrate.release.manifest import check_manifest_file, load_manifest, parallel, unlisted_checkpoints

    if _names_object(manifest):
        from ckptmigrate.storage.staged import mirrored

        location = as_location(manifest)
        assert isinstance(location, ObjectURL)
        with mirrored(location) as stage:
            info, results = verify_manifest(stage.source, public_key, jobs=jobs, strict=strict)
        for result in results:
            result.path = as_location(stage.shown(str(result.path)))
            result.problems = [stage.shown(p) for p in result.problems]
        info["path"] = str(location)
        info["unlisted"] = [{**item, "path": stage.shown(item["path"])} for item in info["unlisted"]]
        return info, results
    path = Path(manifest)
    key = signing.load_public_key(public_key) if isinstance(public_key, (str, os.PathLike)) else public_key
    doc = load_manifest(path)
    sig = signing.check_manifest_signature(doc, key)
    problems = [sig.problem] if sig.problem and (sig.status != "absent" or key is not None) else []
    root = path.resolve().parent
    unlisted = unlisted_checkpoints(doc, root, path.resolve())
    if strict and unlisted:
        problems.append(f"{len(unlisted)} checkpoint file(s) in its directory are not listed (--strict)")
    info = {"path": str(path), "release": doc.get("release"), "commit": doc.get("commit"),
            "files": len(doc["files"]), "signature": sig.status, "signed_by": sig.signed_by,
            "unlisted": [{"path": str(p), "format": kind} for p, kind in unlisted],
            "problems": problems, "ok": not problems}
    results = list(parallel(lambda e: check_manifest_file(e, root, doc.get("release"), key), doc["files"], jobs))
    return info, results


def check(*, model: str | None = None, migrations: str | os.PathLike[str] | None = None,
          lineage: str | None = None) -> Check:
    """Compare the head revision's schema snapshot with the current model's: ``.ok``, ``.difference``
    (:func:`ckptmigrate.autogenerate.compare.check`; imported here when used, it is slow to import)."""
    from ckptmigrate.autogenerate import compare

    return compare.check(model=model, migrations=migrations, lineage=lineage)


def diff(a: PathLike, b: PathLike = "model", *, model: str | None = None,
         migrations: str | os.PathLike[str] | None = None) -> Comparison:
    """The difference between two schemas, each a checkpoint, a revision id or ``"model"``
    (:func:`ckptmigrate.autogenerate.compare.diff`)."""
    from ckptmigrate.autogenerate import compare

    return compare.diff(a, b, model=model, migrations=migrations)
