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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptmigrate.checkpoint import compaction, conversion, sanitizing, saving
from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput, CkptMigrateError, OutputExists, SchemaMismatch
from ckptmigrate.release import stamping
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
    state_dicts: Sequence[str] | None = None, against_chain: bool = False,
) -> dict[str, Any]:
    """Describe a checkpoint from its metadata alone (no tensor bytes read, torch not imported);
    ``state_dicts`` lists where every copy of the weights is (the main one first).
    ``against_chain``: a file stamped at a revision also gets :func:`chain_status` against the
    project's chain."""
    remote = isinstance(as_location(path), ObjectURL)
    if remote:
        from ckptmigrate.storage.ranges import TRANSFER

        before = TRANSFER.to_dict()
    with Checkpoint.open(path, key=key, state_dicts=state_dicts) as ckpt:
        info = ckpt.summary(keys=keys)
        if against_chain and ckpt.envelope is not None and ckpt.envelope.revision:
            info.update(chain_status(info["path"], ckpt.envelope))
    if remote:
        info["transfer"] = TRANSFER.since(before)
    return info


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

    from ckptmigrate.chain import project

    path = Path(path)
    payload = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(payload, Mapping):
        raise BadInput(f"save: expected a module or a dict, got {type(obj).__name__}")
    fmt = format or ("safetensors" if path.suffix == ".safetensors" else "torch-zip")
    graph = project.optional_graph(migrations)
    if graph is None and lineage is not None:
        from ckptmigrate.chain import registry

        graph = registry.ChainSource().for_lineage(lineage)  # a chain an installed package ships
    revision = None
    if graph is not None and len(graph):
        head = graph.head(lineage)
        revision, lineage = head.id, head.lineage
    return saving.save_payload(payload, path, fmt, lineage=lineage, revision=revision, tags=tags, include=include)


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
    from ckptmigrate.chain import in_memory
    from ckptmigrate.ops.optimizer import check_policy

    policy = check_policy(optimizer)
    ckpt = Checkpoint.open(path, key=key, state_dicts=state_dicts)
    try:
        return in_memory.upgrade_in_memory(ckpt, policy, map_location, mmap, trust_pickle, migrations, to, from_rev)
    except BaseException:
        ckpt.close()
        raise


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
    return compaction.compact_file(path, _check_output(path, output, overwrite))


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
    return sanitizing.sanitize_file(path, out, dry_run=dry_run, backup=backup, key=key)


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
    return conversion.convert_file(src, dst, fmt, to=to, max_shard_size=max_shard_size,
                                   state_dict_only=state_dict_only)


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


def chain_status(path: PathLike, env: Mapping[str, Any] | Envelope, *, migrations: Any = None,
                 verbose: bool = False) -> dict[str, Any]:
    """Where a stamped file stands against its chain: ``newer`` (the file is at a revision the chain
    does not know: ``known``, ``ahead``, ``written_by``), ``warnings`` (that, or applied scripts
    edited since they ran on it), and with ``verbose`` ``applied`` (each recorded step with the
    script's sha256 and the versions that ran it). Reads the scripts' ids without importing them,
    unless the file is newer or ``verbose`` asks for the script hashes."""
    from ckptmigrate.chain import project, provenance

    path = as_location(path)
    try:
        envelope = env if isinstance(env, Envelope) else Envelope.from_dict(dict(env), origin=str(path))
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
    target = as_location(output) if output is not None else None
    if isinstance(location, ObjectURL) and isinstance(target, ObjectURL) and _bucket_to_bucket(location, target) \
            and options.get("max_shard_size") is None:
        from ckptmigrate.chain.objects import NotStreamed, migrate_object

        streamed = {k: v for k, v in options.items() if k != "backup"}  # -o keeps the source: no backup
        with contextlib.suppress(NotStreamed):  # not a torch zip, or not streamable: staged below
            return migrate_object(location, chain_source(migrations), direction=direction, to=to, output=target,
                                  overwrite=overwrite, **streamed)
    if _names_object(path, output):
        from ckptmigrate.storage.ranges import TRANSFER
        from ckptmigrate.storage.staged import staged

        before = TRANSFER.to_dict()
        with staged(path, output, overwrite=overwrite, write_back=False) as stage:
            outcome = migrate_file(stage.source, chain_source(migrations), to=to, output=stage.output,
                                   direction=direction, **options)
            stage.what = outcome.plan.describe() if outcome.plan is not None else None
        outcome.path = stage.location(outcome.path) or outcome.path
        outcome.output = stage.location(outcome.output)
        outcome.transfer = TRANSFER.since(before)  # as a streamed -o reports it: the whole download and upload
        return outcome
    out = _check_output(path, output, overwrite)
    return migrate_file(Path(path), chain_source(migrations), to=to, output=out, direction=direction, **options)


def _bucket_to_bucket(source: ObjectURL, output: ObjectURL) -> bool:
    """Whether ``-o`` from ``source`` to ``output`` may be streamed: both in s3://, gs:// or az://
    (not the Hub, whose upload needs the whole file's SHA-256 first, nor a read-only scheme)."""
    from ckptmigrate.storage.writers import writable

    return writable(source.scheme) and writable(output.scheme)


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
    from ckptmigrate.release.manifest import verify_manifest_file

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
    return verify_manifest_file(Path(manifest), public_key, jobs=jobs, strict=strict)


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


def leftovers(paths: Sequence[str | os.PathLike[str]], *, older_than: float = 3600.0,
              delete: bool = False, abort_uploads: bool = False) -> dict[str, Any]:
    """What killed runs left under ``paths`` (directories, files, object and prefix URLs), and with
    ``delete`` removed when provably unused: ``{"leftovers": [...], "failing": N}``, the CLI's
    ``--json`` (:func:`ckptmigrate.leftovers.leftovers`; ``failing`` > 0 is its exit 1). An open S3
    multipart upload is not proven ours (S3 does not say who began it) unless ``abort_uploads``."""
    from ckptmigrate.leftovers import leftovers as found

    return found(paths, older_than=older_than, delete=delete, abort_uploads=abort_uploads).to_dict()


__all__ += ["leftovers"]
