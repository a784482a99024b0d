"""A multi-file checkpoint under a prefix in a bucket (``s3://``, ``gs://``, ``az://``), rewritten in
place by small conditional writes in an order that keeps every instant whole. The writes are each
backend's (storage/writers): a put conditional on the ETag read (S3 and Azure ``If-Match``, GCS
``ifGenerationMatch`` on the generation) or create-only (``If-None-Match: *``, ``ifGenerationMatch=0``),
a server-side copy, a delete (conditional too on GCS and Azure). On GCS and Azure a conditional put
or delete is also checked by a read of the generation or ETag right before it, as the single-object
writers check before their commit: the GCS emulator the tests run ignores ``ifGenerationMatch`` on
every call (Azurite enforces ``If-Match`` and ``If-None-Match``), so there that check stops a loser.

A DCP checkpoint is switched by its ``.metadata`` object: no ``.distcp`` byte moves.

A rewrite in which every tensor keeps its bytes (renames, drops, a stamp) changes two small objects:
``.metadata`` and the envelope ``.ckptmigrate-<digest of .metadata>.json``, which is named for the
``.metadata`` it describes. No object store replaces two objects in one step, so the order makes every
instant whole:

1. the ETag (GCS: the generation) of ``.metadata`` is checked against the one read: a run that
   lost to another writer stops here, having written nothing;
2. the new envelope is put under the name the *new* ``.metadata`` gives it — a name the current
   one does not give, so no reader looks at it yet (conditionally: created, or replacing the
   object of that name as found, so a second run making the same ``.metadata`` stops here);
3. the backup: ``.metadata`` as read stays as its version (a versioned bucket) or ``.metadata.bak``
   (a server-side copy);
4. the new ``.metadata`` is put conditionally on the ETag (generation) read — the switch, one
   step; a loser of a race after step 1 fails here, and what steps 2 and 3 created is removed;
5. the old envelope is deleted (kept with a backup: it is the envelope of ``.metadata.bak``).

A reader (``dcp.load``, ckptmigrate) therefore finds, at every instant and after a crash at any
point, the old ``.metadata`` with its envelope or the new one with its own; a crash before step 4
leaves an envelope object no ``.metadata`` names (the next run writes the same name again), one
after it the old envelope, named for a ``.metadata`` that is no longer there. No journal is needed:
no state mixes old and new. A stamp changes only the envelope: one conditional put of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from ckptmigrate.errors import RemoteError
from ckptmigrate.storage import writers
from ckptmigrate.storage.ranges import RangeFile
from ckptmigrate.util.urls import ObjectURL

METADATA = ".metadata"


def switch_metadata(
    prefix: ObjectURL, *, metadata: bytes | None, metadata_etag: str | None, metadata_version: str | None,
    envelope_name: str, envelope: bytes | None, old_envelope: str | None, old_envelope_etag: str | None,
    backup: bool, old_envelope_version: str | None = None,
) -> ObjectURL | None:
    """Put ``metadata`` (None: unchanged) and ``envelope`` (None: none) in place under ``prefix`` in
    the order above; return the backup taken, if ``backup``. The ETags and versions are those read
    (a GCS object's precondition is its generation, its ``version``)."""
    md = writers.object_target(prefix / METADATA, metadata_etag, metadata_version)
    md.check_unchanged()
    if metadata is None:
        return _envelope_only(prefix, md, envelope_name, envelope, old_envelope_etag, old_envelope_version, backup)
    env = writers.as_found(prefix / envelope_name)  # created, or replacing the object of that name as found
    created: list[writers.ObjectTarget] = []
    kept = None
    try:
        if envelope is not None:
            # no .metadata names this object yet; conditional all the same, so that of two runs making
            # the same .metadata the second stops here, before it writes anything
            writers.put(env, envelope)
            if env.create_only:
                created.append(env)  # no precondition token: deleted whatever it now is
        kept = writers.backup(md) if backup else None
        writers.put(md, metadata)
    except BaseException:
        for obj in created:
            writers.delete(obj)
        if kept is not None:
            writers.remove(kept)
        raise
    if old_envelope is not None and old_envelope != envelope_name and not backup:
        writers.delete(writers.object_target(prefix / old_envelope, None))
    return kept


def _envelope_only(
    prefix: ObjectURL, md: writers.ObjectTarget, name: str, envelope: bytes | None, etag: str | None,
    version: str | None, backup: bool,
) -> ObjectURL | None:
    """A stamp: the envelope of the current ``.metadata`` replaced by one conditional put (or
    created, if there was none: create-only), then ``.metadata`` checked unchanged."""
    there = etag is not None or version is not None
    env = writers.object_target(prefix / name, etag, version, create_only=not there)
    kept = writers.backup(env) if backup and there else None
    try:
        if envelope is None:
            if there:
                writers.delete(env)
        else:
            writers.put(env, envelope)
        md.check_unchanged()
    except BaseException:
        if kept is not None:
            writers.remove(kept)
        raise
    return kept


# --- a sharded model's headers ----------------------------------------------------------------------

#: Where the placeholder index names the journal of the run that put it.
JOURNAL_FIELD = "ckptmigrate_header_rewrite"


@dataclass
class ShardHead:
    """One shard's header rewrite: the ETag (and version) read, the old header (length prefix
    included) and the new."""

    etag: str | None
    old: bytes
    new: bytes
    version: str | None = None


def rewrite_headers(
    prefix: ObjectURL, index_name: str, *, index_etag: str | None, old_index: bytes, new_index: bytes,
    placeholder: dict[str, Any], shards: dict[str, ShardHead], backup: bool, index_version: str | None = None,
) -> ObjectURL | None:
    """Rewrite shard headers of a sharded model under ``prefix`` (each shard a new object: the new
    header before the same data, :func:`writers.replace_head`: copied server-side on S3, streamed
    through on GCS and Azure), switching the index as the local engine does
    (storage/shardset.HeaderRewrite): a journal object of the run (the old index and
    every old header) first, then the index replaced by ``placeholder`` — naming only a shard that
    does not exist, and the journal — then the shards, then the new index, then the journal removed.

    Every write is conditional: the placeholder on the index's ETag as read (the loser of two runs
    removes its journal and writes nothing else), each shard on its own, the new index on the
    placeholder's. A failure puts the old headers and the old index back; a crash leaves the
    placeholder, which every reader refuses, until the next run (:func:`recover_headers`) does."""
    index = writers.object_target(prefix / index_name, index_etag, index_version)
    index.check_unchanged()
    if not shards:  # only the index changes (a stamp): one conditional put
        backup_url = writers.backup(index) if backup else None
        try:
            writers.put(index, new_index)
        except BaseException:
            if backup_url is not None:
                writers.remove(backup_url)
            raise
        return backup_url
    token = secrets.token_hex(6)
    journal = writers.object_target(prefix / f".{index_name}.ckptmigrate-headers.{token}", None, create_only=True)
    body = {"commit": index_name, "digest": hashlib.sha256(new_index).hexdigest(),
            "old_commit": base64.b64encode(old_index).decode(),
            "old": {name: base64.b64encode(head.old).decode() for name, head in shards.items()}}
    writers.put(journal, json.dumps(body).encode())
    marked = dict(placeholder)
    marked["metadata"] = {**(marked.get("metadata") or {}), JOURNAL_FIELD: journal.key.rsplit("/", 1)[-1]}
    placeholder_bytes = (json.dumps(marked, indent=2) + "\n").encode()
    kept: list[ObjectURL] = []
    try:
        if backup:
            kept.append(writers.backup_copy(index))
        placed = writers.put(index, placeholder_bytes)
    except BaseException:
        writers.delete(journal)
        for url in kept:
            writers.remove(url)
        raise
    index.etag = placed  # the new index replaces the placeholder, and nothing else
    done: list[str] = []
    try:
        for name, head in shards.items():
            shard = writers.object_target(prefix / name, head.etag, head.version)
            if backup:
                kept.append(writers.backup_copy(shard))
            done.append(name)  # from here its header may be the new one
            _replace_header(shard, head.new)
        writers.put(index, new_index)
    except BaseException:
        _restore(prefix, index, {n: shards[n].old for n in done}, old_index)
        writers.delete(journal)
        for url in kept:
            writers.remove(url)
        raise
    writers.delete(journal)
    return kept[0] if kept else None


def recover_headers(prefix: ObjectURL, index_name: str) -> bool:
    """Put back what a killed :func:`rewrite_headers` changed, if the index is its placeholder:
    every shard's old header (a shard whose header is already the old one is left), then the old
    index (conditional on the placeholder), then the journal removed. True if there was one."""
    index_url = prefix / index_name
    current = RangeFile(index_url)
    raw = current.pread(current.size, 0)
    try:
        name = json.loads(raw).get("metadata", {}).get(JOURNAL_FIELD)
    except (ValueError, AttributeError):
        return False
    if not isinstance(name, str) or "/" in name or not name.startswith(f".{index_name}.ckptmigrate-headers."):
        return False
    journal_url = prefix / name
    try:
        journal = json.loads(RangeFile(journal_url).pread(1 << 30, 0))
        old = {str(k): base64.b64decode(v) for k, v in journal["old"].items()}
        old_index = base64.b64decode(journal["old_commit"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RemoteError(f"{journal_url}: the journal of an interrupted header rewrite does not read "
                          f"({type(exc).__name__}); the shards' old headers cannot be put back",
                          url=str(prefix)) from None
    _restore(prefix, writers.object_target(index_url, current.etag, current.version), old, old_index)
    writers.delete(writers.object_target(journal_url, None))
    return True


def _restore(prefix: ObjectURL, index: writers.ObjectTarget, old: dict[str, bytes], old_index: bytes) -> None:
    """Each shard's old header back where it is not, then the old index (if the placeholder is still there)."""
    for name, head in old.items():
        remote = RangeFile(prefix / name)
        if remote.pread(len(head), 0) == head:
            continue  # never rewritten (or put back already)
        shard = writers.object_target(prefix / name, remote.etag, remote.version)
        (length,) = struct.unpack("<Q", remote.pread(8, 0))
        writers.replace_head(shard, remote, head, 8 + length)
    writers.put(index, old_index)


def _replace_header(shard: writers.ObjectTarget, head: bytes) -> None:
    """The shard's new header before its data, if the shard is still the object read."""
    remote = RangeFile(shard.url)
    now = writers.object_target(shard.url, remote.etag, remote.version)
    if now.etag != shard.etag:
        raise shard.changed(now.etag)
    (length,) = struct.unpack("<Q", remote.pread(8, 0))
    writers.replace_head(shard, remote, head, 8 + length)
