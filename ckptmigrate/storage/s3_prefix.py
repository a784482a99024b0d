"""A DCP checkpoint under a prefix in S3, switched by its ``.metadata`` object: no ``.distcp`` byte moves.

A rewrite in which every tensor keeps its bytes (renames, drops, a stamp) changes two small objects:
``.metadata`` and the envelope ``.ckptmigrate-<digest of .metadata>.json``, which is named for the
``.metadata`` it describes. S3 cannot replace two objects in one step, so the order makes every
instant whole:

1. the ETag of ``.metadata`` is checked against the one read: a run that lost to another writer
   stops here, having written nothing;
2. the new envelope is put under the name the *new* ``.metadata`` gives it — a name the current
   one does not give, so no reader looks at it yet;
3. the backup: ``.metadata`` as read stays as its version (a versioned bucket) or ``.metadata.bak``
   (a server-side copy);
4. the new ``.metadata`` is put with ``If-Match`` on the ETag read — the switch, one step; a loser
   of a race after step 1 fails here, and what steps 2 and 3 created is removed;
5. the old envelope is deleted (kept with a backup: it is the envelope of ``.metadata.bak``).

A reader (``dcp.load``, ckptmigrate) therefore finds, at every instant and after a crash at any
point, the old ``.metadata`` with its envelope or the new one with its own; a crash before step 4
leaves an envelope object no ``.metadata`` names (the next run writes the same name again), one
after it the old envelope, named for a ``.metadata`` that is no longer there. No journal is needed:
no state mixes old and new. A stamp changes only the envelope: one conditional put of it.
"""

from __future__ import annotations

from ckptmigrate.storage import s3_compose
from ckptmigrate.util.urls import ObjectURL

METADATA = ".metadata"


def switch_metadata(
    prefix: ObjectURL, *, metadata: bytes | None, metadata_etag: str | None, metadata_version: str | None,
    envelope_name: str, envelope: bytes | None, old_envelope: str | None, old_envelope_etag: str | None,
    backup: bool,
) -> ObjectURL | None:
    """Put ``metadata`` (None: unchanged) and ``envelope`` (None: none) in place under ``prefix`` in
    the order above; return the backup taken, if ``backup``."""
    md = s3_compose.S3Object.of(prefix / METADATA, metadata_etag, metadata_version)
    md.check_unchanged()
    if metadata is None:
        return _envelope_only(prefix, md, envelope_name, envelope, old_envelope_etag, backup)
    env = s3_compose.S3Object.of(prefix / envelope_name, None)
    created: list[s3_compose.S3Object] = []
    kept = None
    try:
        if envelope is not None:
            s3_compose.put(env, envelope)  # unconditional: no .metadata names this object yet
            created.append(env)
        kept = s3_compose.backup(md) if backup else None
        s3_compose.put(md, metadata)
    except BaseException:
        for obj in created:
            s3_compose.delete(obj)
        if kept is not None:
            s3_compose.remove(kept)
        raise
    if old_envelope is not None and old_envelope != envelope_name and not backup:
        s3_compose.delete(s3_compose.S3Object.of(prefix / old_envelope, None))
    return kept


def _envelope_only(
    prefix: ObjectURL, md: s3_compose.S3Object, name: str, envelope: bytes | None, etag: str | None, backup: bool,
) -> ObjectURL | None:
    """A stamp: the envelope of the current ``.metadata`` replaced by one conditional put (or
    created, if there was none: ``If-None-Match``), then ``.metadata`` checked unchanged."""
    env = s3_compose.S3Object.of(prefix / name, etag)
    env.create_only = etag is None
    kept = s3_compose.backup(env) if backup and etag is not None else None
    try:
        if envelope is None:
            if etag is not None:
                s3_compose.delete(env)
        else:
            s3_compose.put(env, envelope)
        md.check_unchanged()
    except BaseException:
        if kept is not None:
            s3_compose.remove(kept)
        raise
    return kept
