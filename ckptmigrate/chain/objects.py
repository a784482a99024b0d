"""``upgrade``/``downgrade`` of a checkpoint in object storage (``s3://bucket/key``, ``gs://``, ``az://``).

Planned and migrated from the object's directory and ``data.pkl`` alone (range reads). A migration
that changes only metadata of a torch zip keeps every record where it is: on S3 the new object is
the old one's records, copied server-side, and a new tail (``data.pkl``, envelope, central
directory; storage/s3_compose); on GCS and Azure, which keep only whole objects (blocks)
server-side, the whole old object and the tail a local in-place append writes (storage/gcs_write,
storage/azure_write). The tail is read back through the object-to-be before it is sent. Any other
migration of a torch zip is streamed as the new archive is made (formats/zipstream: the kept
records copied server-side on S3, or read through, each new tensor computed in turn, no local
file); the Hub, a legacy (pre-zip) file and what cannot stream are staged: the local engine writes
the result into a temporary file and that is uploaded. Either way the object is
replaced in one step, only if it is still the one read (its ETag); the backup is the version read
(a versioned bucket) or a server-side copy ``KEY.bak``.
A safetensors rename is a new header before the same data, copied server-side. ``-o`` from a
torch zip in a bucket into a bucket is streamed the same way into a new object (create-only, or
conditional on the object found with ``overwrite``), the source untouched and no backup; any other
``-o`` is staged by the caller.

A multi-file checkpoint under a prefix is read by range too, and written by chain/object_prefixes.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ckptmigrate import formats
from ckptmigrate.chain import engine
from ckptmigrate.chain.object_prefixes import write_prefix
from ckptmigrate.chain.planning import Plan, plan_for
from ckptmigrate.chain.registry import ChainSource
from ckptmigrate.chain.revisions import RevisionGraph
from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput, CkptMigrateError, ObjectChanged
from ckptmigrate.formats import hf_sharded, safetensors_io, torchzip, zipstream
from ckptmigrate.ops.optimizer import check_policy
from ckptmigrate.storage import hf_commit, prefix_write, writers
from ckptmigrate.storage.pieces import Planned
from ckptmigrate.storage.ranges import TRANSFER, Prefixed, RangeFile, Spliced, changed, multi_file_marker
from ckptmigrate.storage.staged import check_output, refuse_multi_file
from ckptmigrate.util.urls import ObjectURL, filesystem, sync_tool


def migrate_object(
    url: ObjectURL, chains: RevisionGraph | ChainSource, *, to: str = "head", dry_run: bool = False,
    backup: bool = True, from_rev: str | None = None, lineage: str | None = None, key: str | None = None,
    direction: str | None = None, trust_pickle: bool = False, state_dicts: Sequence[str] | None = None,
    optimizer: str = "strict", max_shard_size: int | None = None, output: ObjectURL | None = None,
    overwrite: bool = False,
) -> engine.Outcome:
    """As :func:`ckptmigrate.chain.engine.migrate_file`, for an object; the outcome's ``transfer``
    says what crossed the network (requests, bytes received and sent, bytes copied server-side).
    ``output``: a new object in a bucket (replaced only if ``overwrite``), written as streamed
    (:func:`_write_new`) from a torch zip; :class:`NotStreamed` (before anything is written)
    when it cannot be, and the caller stages it."""
    if output is not None:
        return _migrate_to(url, chains, output, overwrite=overwrite, to=to, dry_run=dry_run, from_rev=from_rev,
                           lineage=lineage, key=key, direction=direction, trust_pickle=trust_pickle,
                           state_dicts=state_dicts, optimizer=optimizer)
    if max_shard_size is not None:
        raise BadInput(f"{url}: re-planning shards (a shard size) is not done in object storage; copy the prefix "
                       f"to a local directory ({sync_tool(url.scheme)}) and run there")
    before = TRANSFER.to_dict()
    with _open(url, key=key, state_dicts=state_dicts, recover=not dry_run) as ckpt:
        plan = _plan(ckpt, url, chains, to=to, from_rev=from_rev, lineage=lineage, direction=direction,
                     trust_pickle=trust_pickle, optimizer=optimizer)
        outcome = engine.Outcome(url, None, plan)
        if plan.steps:
            with _by_range(ckpt):  # an op that reads a tensor (``map``) fetches it, not the object
                history = engine.apply(ckpt, plan, trace=outcome.ops)
                ckpt.refuse_changed_module()
                if not dry_run:
                    outcome.backup = write_object(ckpt, url, engine.new_envelope(ckpt, plan, history),
                                                  backup=backup, what=plan.describe())
                    outcome.output = url
                    outcome.written = True
    outcome.transfer = TRANSFER.since(before)
    return outcome


def _plan(ckpt: Checkpoint, url: ObjectURL, chains: RevisionGraph | ChainSource, *, to: str, from_rev: str | None,
          lineage: str | None, direction: str | None, trust_pickle: bool, optimizer: str) -> Plan:
    """The walk for the object read, as migrate_file plans it: the chain for its envelope, the
    direction asked for, no revision of the lineage left behind."""
    ckpt.optimizers.policy = check_policy(optimizer)
    graph = chains if isinstance(chains, RevisionGraph) else chains.for_envelope(ckpt.envelope)
    plan = plan_for(ckpt, graph, to=to, from_rev=from_rev, lineage=lineage)
    if direction is not None and plan.steps and plan.direction != direction:
        raise BadInput(f"{url}: {direction} to {to} would {plan.direction} ({plan.describe()}); "
                       f"use `ckptmigrate {plan.direction}`")
    engine.refuse_left_behind(ckpt, graph, plan.lineage)
    if trust_pickle and plan.steps:
        ckpt.trust_pickle()
    return plan


class NotStreamed(Exception):
    """An ``-o`` migration between buckets that is not streamed (not a torch zip, a ``.safetensors``
    output, tensors that cannot be: formats/zipstream.refusal); nothing was written, it is staged."""


def _migrate_to(
    url: ObjectURL, chains: RevisionGraph | ChainSource, output: ObjectURL, *, overwrite: bool, to: str,
    dry_run: bool, from_rev: str | None, lineage: str | None, key: str | None, direction: str | None,
    trust_pickle: bool, state_dicts: Sequence[str] | None, optimizer: str,
) -> engine.Outcome:
    """:func:`migrate_object` into a new object at ``output``; the source is untouched, no backup."""
    check_output(output, overwrite)  # one line before any work when it exists
    target = writers.as_found(output) if overwrite else writers.object_target(output, None, create_only=True)
    before = TRANSFER.to_dict()
    with _open(url, key=key, state_dicts=state_dicts, recover=False) as ckpt:
        if ckpt.container.format != "torch-zip" or output.name.endswith(".safetensors"):
            raise NotStreamed(f"{url}: a {ckpt.container.format} checkpoint to {output.name}")
        plan = _plan(ckpt, url, chains, to=to, from_rev=from_rev, lineage=lineage, direction=direction,
                     trust_pickle=trust_pickle, optimizer=optimizer)
        outcome = engine.Outcome(url, output, plan)
        with _by_range(ckpt):
            envelope = ckpt.envelope
            if plan.steps:
                history = engine.apply(ckpt, plan, trace=outcome.ops)
                ckpt.refuse_changed_module()
                envelope = engine.new_envelope(ckpt, plan, history)
            if not dry_run:  # `-o` always leaves an object there, as a file when nothing is to be done
                _write_new(ckpt, target, envelope)
                outcome.written = True
    outcome.transfer = TRANSFER.since(before)
    return outcome


def _write_new(ckpt: Checkpoint, target: writers.ObjectTarget, envelope: Envelope | None) -> None:
    """``ckpt`` with ``envelope`` as the object ``target`` (in another bucket, or another store),
    read back before the one step that creates (or, as found, replaces) it: a metadata-only change
    S3 to S3 is the source's records copied and a new tail (as in place); anything else streamed,
    the kept records copied server-side (S3 to S3, any bucket) or read through, the new tensors
    computed in turn. :class:`NotStreamed` when the archive cannot be streamed."""
    env = envelope.to_dict() if envelope is not None else None
    expected = ckpt.schema()
    source = ckpt.container.source
    assert source is not None and isinstance(source.remote, RangeFile)
    try:
        if ckpt.can_rewrite_metadata_only("torch-zip") and writers.copies_from(target, source.remote):
            # every record kept where it is (S3 to S3): copied from the source, a new tail after them
            keep, tail = torchzip.metadata_tail(source, ckpt.container.records, ckpt.container.prefix,
                                                ckpt.payload(), env)
            if writers.copies_from(target, source.remote, keep):
                ckpt.check_reads_back(target.url, env, expected, remote=Spliced(source.remote, keep, tail))
                writers.compose(target, source.remote, keep, tail)
                return
        streamed = _streamed(ckpt, target, target.url, env, expected)
    except CkptMigrateError as exc:
        if not isinstance(exc, ObjectChanged):  # a read of the source that failed: was it replaced?
            _blame_a_change(writers.object_target(source.remote.url, source.remote.etag, source.remote.version), exc)
        raise
    if not streamed:
        raise NotStreamed(f"{ckpt.container.path}: {target.url} cannot be streamed")


def _open(url: ObjectURL, *, key: str | None, state_dicts: Sequence[str] | None, recover: bool) -> Checkpoint:
    """The checkpoint at ``url``; a sharded model whose index is the placeholder a killed header
    rewrite left (``recover``: a run that writes) gets its old headers and index back first."""
    try:
        return Checkpoint.open(url, key=key, state_dicts=state_dicts)
    except BadInput as exc:
        if not recover or hf_sharded.REWRITE_IN_PROGRESS not in str(exc):
            raise
        error = exc
    if url.name.endswith(hf_sharded.INDEX_SUFFIX):
        prefix, marker = url.parent, url.name
    else:
        fs, path = filesystem(url)
        prefix, marker = url, multi_file_marker(fs, path, url) or ""
    if not marker or not prefix_write.recover_headers(prefix, marker):
        raise error
    return Checkpoint.open(url, key=key, state_dicts=state_dicts)


def write_object(ckpt: Checkpoint, url: ObjectURL, envelope: Envelope, *, backup: bool,
                 what: str | None = None) -> ObjectURL | None:
    """Replace the object ``ckpt`` was read from by ``ckpt`` with ``envelope``, in one conditional
    step (server-side assembly when only metadata changed, else staged); returns the backup taken
    (the version read, or ``KEY.bak``), if ``backup``. Used by upgrade, downgrade and stamp;
    ``what`` (``upgrade c1 -> c2``) names the change where the store keeps a message (a Hub commit)."""
    if ckpt.container.format in formats.MULTI_FORMATS:
        return write_prefix(ckpt, url, envelope, backup=backup, what=what or _stamped(ckpt, envelope))
    refuse_multi_file(url)
    env = envelope.to_dict()
    source = ckpt.container.source
    assert source is not None and isinstance(source.remote, RangeFile)
    target = writers.target(url, source.remote.etag, source.remote.version)
    writers.describe(target, what or _stamped(ckpt, envelope))
    expected = ckpt.schema()
    c = ckpt.container
    header = safetensors_io.new_header(source, ckpt.payload(), c.storages, c.metadata, env) \
        if c.format == "safetensors" else None
    kept = writers.backup(target) if backup else None
    try:
        if ckpt.can_rewrite_metadata_only("torch-zip"):
            how = writers.appendable(target, source.remote.size)
            appended = None if how is None else torchzip.appended_tail(source, c.records, c.prefix, ckpt.payload(), env)
            if how is not None and appended is not None:  # GCS, Azure: the whole object stays, a tail is added
                ckpt.check_reads_back(url, env, expected, remote=Spliced(source.remote, source.remote.size, appended))
                writers.append(target, source.remote, appended, how)
            else:
                keep, tail = torchzip.metadata_tail(source, c.records, c.prefix, ckpt.payload(), env)
                ckpt.check_reads_back(url, env, expected, remote=Spliced(source.remote, keep, tail))
                writers.compose(target, source.remote, keep, tail)
        elif header is not None:  # a safetensors rename: a new header before the same data, copied server-side
            head, skip = header
            ckpt.check_reads_back(url, env, expected, remote=Prefixed(source.remote, head, skip))
            writers.replace_head(target, source.remote, head, skip)
        elif not _streamed(ckpt, target, url, env, expected):
            with tempfile.TemporaryDirectory(prefix="ckptmigrate-") as tmp:
                staged = Path(tmp) / url.name
                ckpt.write(staged, envelope)  # a legacy (pre-zip) file becomes a torch zip, as on disk
                writers.upload(target, staged)
    except BaseException as exc:
        if kept is not None:
            writers.remove(kept)
        if isinstance(exc, CkptMigrateError) and not isinstance(exc, ObjectChanged):
            _blame_a_change(target, exc)
        raise
    return kept


def _streamed(ckpt: Checkpoint, target: writers.Target, url: ObjectURL, env: dict[str, Any] | None,
              expected: dict[str, Any] | None) -> bool:
    """A torch zip whose tensors change, sent as it is produced (formats/zipstream): no local file,
    the kept records copied server-side (S3) or read through, each new tensor computed in turn; the
    object to be is read back before the one step that replaces it. False (nothing done) when it
    cannot be: not a torch zip, the Hub (an LFS upload needs the whole file's SHA-256 first),
    tensors from other files or of no known CRC (formats/zipstream.refusal): then it is staged."""
    c = ckpt.container
    source = c.source
    if c.format != "torch-zip" or isinstance(target, hf_commit.HubFile) or source is None:
        return False
    envelope = None if env is None else torchzip.envelope_bytes(env)
    archive = zipstream.records(torchzip.Pickled(ckpt.payload()), envelope, c.prefix, None)
    if zipstream.refusal(archive, source) is not None:
        return False
    remote = source.remote
    assert isinstance(remote, RangeFile)
    planned = Planned(remote)

    def read_back() -> None:
        ckpt.check_reads_back(url, env, expected, remote=planned)
        if remote.url != url:  # -o: the write's condition is on the new object, not on the source read
            found = remote.fetcher.etag_now()
            if found != remote.etag:
                raise changed(remote.url, remote.etag, found)

    with _by_range(ckpt):
        headers = {e.data_offset: e.data_offset - e.header_offset for e in c.records.values()}
        writers.stream(target, remote, zipstream.emit(archive, source, planned, headers),
                       zipstream.total_size(archive), read_back)
    return True


@contextlib.contextmanager
def _by_range(ckpt: Checkpoint) -> Iterator[None]:
    """While it lasts, a tensor of the object read is fetched by range when an op or the streamed
    write needs its values, instead of the whole object being staged in a local file."""
    source = ckpt.container.source
    if source is None or source.remote is None or source.by_range:
        yield
        return
    source.by_range = True
    try:
        yield
    finally:
        source.by_range = False


def _stamped(ckpt: Checkpoint, envelope: Envelope) -> str:
    """A stamp, as a Hub commit's message names it: the revision before and after."""
    before = "unstamped" if ckpt.envelope is None else ckpt.envelope.revision or "base"
    return f"stamp {before} -> {envelope.revision or 'base'}"


def _blame_a_change(target: writers.Target, exc: CkptMigrateError) -> None:
    """A write that failed on what it read (a record that does not parse, a read-back that differs)
    may have read part of another writer's object: if the ETag moved, that is the error to report."""
    try:
        found = target.head_etag()
    except CkptMigrateError:
        return  # gone, or unreachable: the original error says more
    if found != target.etag:
        raise target.changed(found) from exc
