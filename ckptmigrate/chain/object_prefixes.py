"""A multi-file checkpoint under a prefix in object storage, rewritten in place: a rewrite that keeps
every tensor's bytes puts a DCP directory's ``.metadata`` and envelope, or a sharded model's shard
headers and index, in place — by the protocols of storage/prefix_write in ``s3://``, ``gs://`` and
``az://``, by one commit on the Hub; anything else is refused in one line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput, MultiFileObject
from ckptmigrate.formats import dcp, hf_sharded, safetensors_io
from ckptmigrate.formats.dcp_rewrite import DcpRewrite, dcp_metadata_rewrite
from ckptmigrate.storage import hf_commit, prefix_write, writers
from ckptmigrate.storage.ranges import Prefixed, RangeFile
from ckptmigrate.tensors.refs import Source
from ckptmigrate.util.urls import ObjectURL, sync_tool


def write_prefix(ckpt: Checkpoint, url: ObjectURL, envelope: Envelope, *, backup: bool,
                 what: str) -> ObjectURL | None:
    """A multi-file checkpoint under a prefix: a DCP rewrite that moves no ``.distcp`` byte puts its
    ``.metadata`` and envelope objects in place, a sharded model's rewrite that keeps every tensor's
    bytes its shard headers and index (storage/prefix_write; on the Hub, one commit of them all);
    anything else is refused in one line. ``what`` (``upgrade c1 -> c2``) is a Hub commit's message."""
    parts = ckpt.container.parts
    prefix = ckpt.container.path
    assert isinstance(prefix, ObjectURL)
    if prefix.scheme in hf_commit.WRITABLE:
        if isinstance(parts, dcp.Dcp):
            rewrite = dcp_metadata_rewrite(parts, ckpt.payload(), envelope.to_dict())
            if rewrite is not None:
                return _commit_metadata(parts, prefix, rewrite, backup, what)
            what_is = "a DCP migration that changes tensor bytes (they would go into a new .distcp file)"
        else:
            found = hf_sharded.object_headers(parts, ckpt.payload(), ckpt.container.storages)
            if found is not None:
                return _commit_headers(ckpt, parts, prefix, found, envelope, backup, what)
            what_is = "a migration of this sharded model that changes tensor bytes or drops a tensor"
        raise MultiFileObject(f"{prefix}/: {what_is} is not done on the Hub yet (only one whose tensors keep their "
                              "bytes: renames, a stamp); download it (hf download), run there and upload the result",
                              url=str(prefix),
                              marker=parts.metadata_path.name if isinstance(parts, dcp.Dcp) else parts.index_path.name)
    if not writers.writable(prefix.scheme):
        raise MultiFileObject(f"{prefix}/: a multi-file checkpoint is rewritten in place in s3://, gs://, az:// and "
                              f"hf:// only ({prefix.scheme}:// is read-only); copy the prefix to a local directory "
                              f"({sync_tool(prefix.scheme)}) and run there",
                              url=str(prefix), marker=parts.metadata_path.name if isinstance(parts, dcp.Dcp)
                              else parts.index_path.name)
    if isinstance(parts, dcp.Dcp):
        rewrite = dcp_metadata_rewrite(parts, ckpt.payload(), envelope.to_dict())
        if rewrite is not None:
            return prefix_write.switch_metadata(
                prefix, metadata=rewrite.metadata, metadata_etag=parts.metadata_etag,
                metadata_version=parts.metadata_version, envelope_name=rewrite.envelope_name,
                envelope=rewrite.envelope, old_envelope=parts.envelope_file, old_envelope_etag=parts.envelope_etag,
                old_envelope_version=parts.envelope_version, backup=backup)
        what = "changes tensor bytes (they would go into a new .distcp object)"
    else:
        found = hf_sharded.object_headers(parts, ckpt.payload(), ckpt.container.storages)
        if found is not None:
            return _rewrite_headers(ckpt, parts, prefix, found, envelope, backup)
        what = "changes tensor bytes or drops a tensor (its shards would be rewritten)" \
            if parts.shard_format == "safetensors" else "changes torch .bin shards (each would be rewritten)"
    raise MultiFileObject(f"{prefix}/: a migration of this multi-file checkpoint that {what} is not done in object "
                          f"storage yet; copy the prefix to a local directory ({sync_tool(prefix.scheme)}) and run "
                          "there",
                          url=str(prefix), marker=parts.metadata_path.name if isinstance(parts, dcp.Dcp)
                          else parts.index_path.name)


def _checked_headers(
    ckpt: Checkpoint, parts: hf_sharded.Sharded, prefix: ObjectURL,
    found: tuple[dict[str, tuple[bytes, int]], dict[str, str]], envelope: Envelope,
) -> tuple[bytes, int, dict[str, tuple[RangeFile, bytes, int]]]:
    """A sharded model whose tensors keep their bytes: the new index, the total size, and each
    changed shard's (object, new header, old header length), read back as meant before anything is sent."""
    headers, weight_map = found
    env = envelope.to_dict()
    total = sum(hf_sharded.shard_sizes(ckpt.payload(), [[k] for k in weight_map]))
    new_index = hf_sharded.index_bytes(parts, weight_map, total, env)
    again = hf_sharded.parse_index(new_index)
    if again["weight_map"] != weight_map or again["metadata"].get(hf_sharded.ENVELOPE_KEY) != env:
        raise BadInput(f"{prefix}/{parts.index_path.name}: the new index does not read back as written; "
                       "nothing was written")
    sources = {s.path.rsplit("/", 1)[-1]: s for s in ckpt.container.sources}
    shards = {}
    payload = ckpt.payload()
    for name, (head, skip) in headers.items():
        remote = sources[name].remote
        assert isinstance(remote, RangeFile)
        _check_header(prefix / name, remote, head, skip, {k: payload[k] for k, s in weight_map.items() if s == name})
        shards[name] = (remote, head, skip)
    return new_index, total, shards


def _commit_headers(
    ckpt: Checkpoint, parts: hf_sharded.Sharded, prefix: ObjectURL,
    found: tuple[dict[str, tuple[bytes, int]], dict[str, str]], envelope: Envelope, backup: bool, what: str,
) -> ObjectURL | None:
    """A sharded model on the Hub whose tensors keep their bytes: the new index and each changed
    shard (its new header before its data, staged) in one commit on top of the commit the index was
    read at; the backup is the index at that commit (the shards' old headers are there too)."""
    new_index, _total, shards = _checked_headers(ckpt, parts, prefix, found, envelope)
    index_url = prefix / parts.index_path.name
    target = hf_commit.HubFile.of(index_url, parts.index_version)
    moved = sorted({r.version or "" for r, _h, _s in shards.values()} - {parts.index_version or ""})
    if moved:  # the branch moved between reading the index and a shard: what was read is not one commit
        raise target.changed(moved[0])
    folder = target.key.rpartition("/")[0]
    names = {name: f"{folder}/{name}" if folder else name for name in [parts.index_path.name, *sorted(shards)]}
    hf_commit.describe(target, what, list(names.values()))
    with tempfile.TemporaryDirectory(prefix="ckptmigrate-") as tmp:
        files = {path: Path(tmp) / name for name, path in names.items()}
        files[names[parts.index_path.name]].write_bytes(new_index)
        for name, (remote, head, skip) in shards.items():
            with open(files[names[name]], "wb") as fh:
                fh.write(head)
                hf_commit.copy_range(remote, fh, skip, remote.size)
        hf_commit.commit(target, files)
    return hf_commit.backup(target) if backup else None


def _commit_metadata(parts: dcp.Dcp, prefix: ObjectURL, rewrite: DcpRewrite, backup: bool,
                     what: str) -> ObjectURL | None:
    """A DCP checkpoint on the Hub whose tensors keep their bytes: its new ``.metadata`` and the
    envelope named for it in one commit, the old envelope deleted (the commit read keeps it); no
    ``.distcp`` file moves."""
    target = hf_commit.HubFile.of(prefix / parts.metadata_path.name, parts.metadata_version)
    folder = target.key.rpartition("/")[0]

    def in_repo(name: str) -> str:
        return f"{folder}/{name}" if folder else name

    with tempfile.TemporaryDirectory(prefix="ckptmigrate-") as tmp:
        files: dict[str, Path | None] = {}
        old = parts.envelope_file
        if old is not None and (rewrite.envelope is None or old != rewrite.envelope_name):
            files[in_repo(old)] = None
        for name, data in ((parts.metadata_path.name, rewrite.metadata), (rewrite.envelope_name, rewrite.envelope)):
            if data is not None:
                files[in_repo(name)] = Path(tmp) / name
                (Path(tmp) / name).write_bytes(data)
        hf_commit.describe(target, what, sorted(files))
        hf_commit.commit(target, files)
    return hf_commit.backup(target) if backup else None


def _rewrite_headers(
    ckpt: Checkpoint, parts: hf_sharded.Sharded, prefix: ObjectURL,
    found: tuple[dict[str, tuple[bytes, int]], dict[str, str]], envelope: Envelope, backup: bool,
) -> ObjectURL | None:
    """A sharded model whose tensors keep their bytes (renames, a stamp): the new index, and each
    changed shard's new header before its data, put in place by the journalled protocol of
    storage/prefix_write, after the new headers and index read back as meant."""
    new_index, total, checked = _checked_headers(ckpt, parts, prefix, found, envelope)
    shards = {name: prefix_write.ShardHead(remote.etag, remote.pread(skip, 0), head, remote.version)
              for name, (remote, head, skip) in checked.items()}
    placeholder = json.loads(hf_sharded.index_bytes(
        parts, {k: hf_sharded.REWRITE_IN_PROGRESS for k in parts.shard_of}, total, None))
    return prefix_write.rewrite_headers(
        prefix, parts.index_path.name, index_etag=parts.index_etag, index_version=parts.index_version,
        old_index=parts.index_raw, new_index=new_index, placeholder=placeholder, shards=shards, backup=backup)


def _check_header(url: ObjectURL, remote: RangeFile, head: bytes, skip: int, expected: dict[str, Any]) -> None:
    """The shard as it will be (``head`` before its data) read back before anything is sent: the
    tensors ``expected`` under their new names, each at its bytes, and nothing else."""
    try:
        tensors, _env, _meta, _storages = safetensors_io.read(Source(url, remote=Prefixed(remote, head, skip)))
    except safetensors_io.SafetensorsFormatError as exc:
        raise BadInput(f"{url}: the new header does not read back ({exc}); nothing was written") from None
    same = set(tensors) == set(expected) and all(
        (t.dtype, t.shape, t.storage.offset - len(head)) == (r.dtype, r.shape, r.storage.offset - skip)
        for k, r in expected.items() for t in [tensors[k]])
    if not same:
        raise BadInput(f"{url}: the new header does not describe the tensors meant; nothing was written")
