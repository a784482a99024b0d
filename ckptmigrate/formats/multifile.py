"""Checkpoints made of several files: which kind a path names, reading them as one container, and
writing them as one switch (:class:`~ckptmigrate.storage.shardset.ShardSet`): a sharded model's
index and shards here, a DCP directory by :mod:`ckptmigrate.formats.dcp_rewrite`.

A path names a multi-file checkpoint when it is a sharded model's index (JSON with a
``weight_map``), a DCP ``.metadata`` (a pickle of DCP's ``Metadata``), or a directory holding
exactly one of those. Recognition is by content; the names are only where to look in a directory.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from pathlib import Path
from typing import Any

from ckptmigrate.errors import BadInput, one_line
from ckptmigrate.formats import dcp, dcp_rewrite, hf_sharded, locations
from ckptmigrate.storage.shardset import HeaderRewrite, ShardSet
from ckptmigrate.util.urls import ObjectURL

#: The one weights file of a model directory saved unsharded (transformers, huggingface_hub).
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(512)
    except OSError:
        return b""


def _file_kind(path: Path) -> str | None:
    head = _head(path)
    if dcp.looks_like_metadata(head):
        return "dcp"
    if hf_sharded.looks_like_index(head):
        try:
            hf_sharded.read_index(path)
        except (hf_sharded.ShardedFormatError, OSError):
            return "hf-index?"
        return "hf-sharded"
    return None


def _in_directory(directory: Path) -> tuple[str, Path] | None:
    """The multi-file checkpoint a directory holds: its kind and its commit file."""
    found: list[tuple[str, Path]] = []
    if (directory / dcp.METADATA).is_file():
        found.append(("dcp", directory / dcp.METADATA))
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise BadInput(f"{directory}: cannot list the directory ({exc.strerror})") from None
    for name in names:
        if name.endswith(hf_sharded.INDEX_SUFFIX) and not name.startswith("."):
            found.append(("hf-sharded", directory / name))
    if len(found) > 1:
        raise BadInput(
            f"{directory}: mixes checkpoints ({', '.join(p.name for _k, p in found)}); "
            "name the index or .metadata file you mean"
        )
    return found[0] if found else None


def kind(path: Path) -> str | None:
    """``hf-sharded``, ``dcp`` or None (a single-file checkpoint, or not one at all)."""
    if path.is_dir():
        hit = _in_directory(path)
        return hit[0] if hit else None
    if not path.is_file():
        return None
    k = _file_kind(path)
    if k == "hf-index?":
        return "hf-sharded"  # reading it gives the precise error
    return k


def commit_file(path: Path) -> Path:
    """The one file a reader of this checkpoint opens first (index or ``.metadata``)."""
    if path.is_dir():
        hit = _in_directory(path)
        if hit is None:
            raise BadInput(f"{path}: is a directory, not a checkpoint file")
        return hit[1]
    return path


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """The name a checkpoint is locked and reported by: a sharded model's index, a DCP directory;
    a single file is its own name."""
    path = Path(path)
    k = kind(path)
    if k == "hf-sharded":
        return commit_file(path)
    if k == "dcp":
        return path if path.is_dir() else path.parent
    if path.is_dir():  # a model directory saved unsharded, as transformers names its one file
        single = [path / n for n in SINGLE_FILES if (path / n).is_file()]
        if len(single) == 1:
            return single[0]
    return path


def recover(path: str | os.PathLike[str]) -> list[str]:
    """Finish or undo a switch a killed writer left in this checkpoint's directory (call holding its
    lock); the files removed. A single-file checkpoint has nothing to recover here."""
    path = Path(path)
    if kind(path) is None:
        return []
    commit = commit_file(path)
    HeaderRewrite(commit.parent, commit.name).recover()
    return ShardSet(commit.parent, commit.name).recover()


def recovered(path: Path) -> Path:
    """``path``, once :func:`recover` has run on it (for ``with file_lock(p), open(recovered(p))``)."""
    recover(path)
    return path


def read(path: Path) -> dict[str, Any]:
    """The fields of a :class:`~ckptmigrate.formats.Container` for the checkpoint ``path`` names."""
    k = kind(path)
    commit = commit_file(path)
    parts: Any
    try:
        if k == "hf-sharded":
            payload, envelope, storages, sources, parts = hf_sharded.read(commit, _sniff_shard)
            name = commit
        else:
            payload, envelope, storages, sources, parts = dcp.read(commit)
            name = commit.parent if path.is_dir() or commit.name == dcp.METADATA else commit
    except hf_sharded.ShardedFormatError as exc:
        raise BadInput(f"{commit}: sharded checkpoint index {one_line(exc)}") from None
    except dcp.DcpFormatError as exc:
        raise BadInput(f"{commit}: torch.distributed.checkpoint {one_line(exc)}") from None
    return {"format": k, "path": name, "source": None, "payload": payload, "envelope": envelope,
            "storages": storages, "sources": sources, "parts": parts}


def read_remote(prefix: ObjectURL, marker: str) -> dict[str, Any]:
    """:func:`read` of a multi-file checkpoint under a prefix in object storage (``marker``: its
    ``.metadata`` or ``*.index.json``), by range requests: the small files whole, each shard's
    header or each chunk's zip records, never tensor bytes. It is named by its prefix."""
    commit = prefix / marker
    k = "dcp" if marker == dcp.METADATA else "hf-sharded"
    parts: Any
    try:
        if k == "hf-sharded":
            payload, envelope, storages, sources, parts = hf_sharded.read(commit, _sniff_shard)
        else:
            payload, envelope, storages, sources, parts = dcp.read(commit)
    except hf_sharded.ShardedFormatError as exc:
        raise BadInput(f"{commit}: sharded checkpoint index {one_line(exc)}", path=str(prefix)) from None
    except dcp.DcpFormatError as exc:
        raise BadInput(f"{commit}: torch.distributed.checkpoint {one_line(exc)}", path=str(prefix)) from None
    return {"format": k, "path": prefix, "source": None, "payload": payload, "envelope": envelope,
            "storages": storages, "sources": sources, "parts": parts}


def _sniff_shard(head: bytes, size: int) -> str | None:
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] >= 2:
        return "safetensors"
    return None


def read_envelope(path: Path) -> tuple[Any, dict[str, Any] | None]:
    k = kind(path)
    commit = commit_file(path)
    try:
        if k == "hf-sharded":
            return k, hf_sharded.read_envelope(commit)
        raw = commit.read_bytes()
        env_path = commit.parent / dcp.envelope_name(raw)
        return k, json.loads(env_path.read_text()) if env_path.exists() else None
    except (hf_sharded.ShardedFormatError, ValueError) as exc:
        raise BadInput(f"{commit}: {one_line(exc)}") from None


def read_envelope_remote(prefix: ObjectURL, marker: str) -> tuple[Any, dict[str, Any] | None]:
    """:func:`read_envelope` of a multi-file checkpoint under a prefix: its index, or its
    ``.metadata`` and envelope objects, read whole; no shard is opened."""
    commit = prefix / marker
    try:
        if marker != dcp.METADATA:
            return "hf-sharded", hf_sharded.read_envelope(commit)
        raw = locations.read_small(commit, dcp.MAX_METADATA)
        try:
            env = locations.read_small(prefix / dcp.envelope_name(raw), dcp.MAX_METADATA)
        except FileNotFoundError:
            return "dcp", None
        return "dcp", json.loads(env)
    except FileNotFoundError:
        raise BadInput(f"{commit}: no such object", path=str(prefix)) from None
    except (hf_sharded.ShardedFormatError, locations.TooLarge, ValueError) as exc:
        raise BadInput(f"{commit}: {one_line(exc)}", path=str(prefix)) from None


# --- writing ----------------------------------------------------------------------------------------


def write(
    parts: Any, fmt: str, dest: Path, payload: Any, envelope: dict[str, Any] | None,
    check: Any, *, keep_old: bool = False, max_shard_bytes: int | None = None, compact: bool = False,
) -> Path:
    """Write ``payload`` as the multi-file checkpoint ``dest`` in one switch; return its name.

    From another container (``parts`` not of ``fmt``'s kind: ``convert``), a sharded model gets
    shards of at most ``max_shard_bytes`` (default 5 GB), a DCP directory one ``.distcp`` file.
    ``compact`` rewrites the ``.distcp`` files that hold chunks no value reads any more (a sharded
    model's shards never do: each is rewritten whole when its tensors change)."""
    if fmt == "hf-sharded":
        named = not dest.is_dir() and dest.name.endswith(hf_sharded.INDEX_SUFFIX)
        if not isinstance(parts, hf_sharded.Sharded):
            index = dest if named else dest / "model.safetensors.index.json"
            parts = hf_sharded.Sharded(index, {}, {}, [], "safetensors")
            max_shard_bytes = max_shard_bytes or 5_000_000_000
        index = dest if named else dest / parts.index_path.name
        _write_sharded(parts, index, payload, envelope, check, keep_old, max_shard_bytes)
        return index
    directory = dest.parent if dest.name == dcp.METADATA else dest
    dcp_rewrite.write_dcp(parts if isinstance(parts, dcp.Dcp) else None, directory, payload, envelope, check, keep_old,
                          compact)
    return directory


def _write_sharded(
    parts: hf_sharded.Sharded, index: Path, payload: Any, envelope: dict[str, Any] | None, check: Any, keep_old: bool,
    max_shard_bytes: int | None = None,
) -> None:
    directory = index.parent
    directory.mkdir(parents=True, exist_ok=True)
    shardset = ShardSet(directory, index.name)
    shardset.recover()
    try:
        old = set(hf_sharded.read_index(index)["weight_map"].values()) if index.exists() else set()
    except (hf_sharded.ShardedFormatError, OSError):
        old = set()
    plan = hf_sharded.plan_shards(payload, parts, max_shard_bytes)
    same_place = parts.shards != [] and index.parent.resolve() == parts.directory.resolve()
    if same_place and _shards_unchanged(parts, payload, plan):
        # every shard holds exactly what it held: only the index changes (stamp, envelope edits)
        same_map = {k: parts.shard_of[k] for k in payload}
        size = sum(hf_sharded.shard_sizes(payload, plan))
        shardset.begin(set(), [])
        shardset.commit(hf_sharded.index_bytes(parts, same_map, size, envelope), check)
        return
    if same_place and not keep_old:  # renames: each shard's header rewritten in place, if it fits
        found = hf_sharded.header_edits(parts, payload, plan)
        if found is not None:
            edits, renamed_map = found
            size = sum(hf_sharded.shard_sizes(payload, plan))
            placeholder = {k: hf_sharded.REWRITE_IN_PROGRESS for k in parts.shard_of}
            HeaderRewrite(directory, index.name).run(
                {name: (8, header) for name, header in edits.items()},
                hf_sharded.index_bytes(parts, renamed_map, size, envelope), check,
                hf_sharded.index_bytes(parts, placeholder, size, None))
            return
    names = hf_sharded.shard_names(index.name, parts.shard_format, len(plan), None)
    tagged = any((directory / n).exists() for n in names)
    if tagged:
        names = hf_sharded.shard_names(index.name, parts.shard_format, len(plan), secrets.token_hex(3))
    shardset.begin(old, names, keep_old=keep_old)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for name, keys, size in zip(names, plan, hf_sharded.shard_sizes(payload, plan), strict=True):
            origin = parts.shard_of.get(keys[0])
            meta = parts.shard_metadata.get(origin or "", {}) or {"format": "pt"}
            with shardset.create(name) as fh:
                hf_sharded.write_shard(fh, parts.shard_format, {k: payload[k] for k in keys}, meta)
            weight_map.update((k, name) for k in keys)
            total += size
        ordered = {k: weight_map[k] for k in payload}
        shardset.commit(hf_sharded.index_bytes(parts, ordered, total, envelope), check)
    except BaseException:
        shardset.abort()
        raise
    if tagged and not keep_old:
        _canonical_names(index, parts, ordered, total, envelope, check)


def _shards_unchanged(parts: hf_sharded.Sharded, payload: Any, plan: list[list[str]]) -> bool:
    """Each planned shard is an old shard with the same keys, each tensor still the one read there."""
    if len(plan) != len(parts.shards):
        return False
    for keys in plan:
        shard = parts.shard_of.get(keys[0])
        if shard is None or {k for k, s in parts.shard_of.items() if s == shard} != set(keys):
            return False
        if any(payload[k] is not parts.original.get(k) for k in keys):  # a swap of names is a change
            return False
    return True


def _canonical_names(
    index: Path, parts: hf_sharded.Sharded, weight_map: dict[str, str], total: int,
    envelope: dict[str, Any] | None, check: Any,
) -> None:
    """Give the new shards transformers' names again once the old ones are gone: a second switch
    whose new files are hard links (no byte copied)."""
    directory = index.parent
    tagged = list(dict.fromkeys(weight_map.values()))
    names = hf_sharded.shard_names(index.name, parts.shard_format, len(tagged), None)
    if any((directory / n).exists() for n in names):
        return
    shardset = ShardSet(directory, index.name)
    shardset.begin(set(tagged), names)
    try:
        for old_name, name in zip(tagged, names, strict=True):
            os.link(directory / old_name, directory / name)
        rename = dict(zip(tagged, names, strict=True))
        data = hf_sharded.index_bytes(parts, {k: rename[v] for k, v in weight_map.items()}, total, envelope)
        shardset.commit(data, check)
    except BaseException:
        shardset.abort()
        raise
