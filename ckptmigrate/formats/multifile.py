"""Checkpoints made of several files: which kind a path names, reading them as one container, and
writing them as one switch (:class:`~ckptmigrate.storage.shardset.ShardSet`).

A path names a multi-file checkpoint when it is a sharded model's index (JSON with a
``weight_map``), a DCP ``.metadata`` (a pickle of DCP's ``Metadata``), or a directory holding
exactly one of those. Recognition is by content; the names are only where to look in a directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptmigrate.errors import BadInput, one_line
from ckptmigrate.formats import dcp, dcp_writer, hf_sharded, locations
from ckptmigrate.storage.atomic import atomic_write
from ckptmigrate.storage.rawio import copy_range, write_all
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
    _write_dcp(parts if isinstance(parts, dcp.Dcp) else None, directory, payload, envelope, check, keep_old, compact)
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


def _write_dcp(
    parts: dcp.Dcp | None, directory: Path, payload: Any, envelope: dict[str, Any] | None, check: Any, keep_old: bool,
    compact: bool = False,
) -> None:
    same = parts is not None and directory.exists() and directory.resolve() == parts.directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    shardset = ShardSet(directory, dcp.METADATA)
    shardset.recover()
    kept, fresh = dcp_writer.split_payload(parts, payload)
    live = dcp_writer.live_ranges(parts, kept) if parts is not None else {}
    carried = sorted(live)
    tag = secrets.token_hex(4)
    # compact: a file holding chunks no value reads any more (dropped, replaced) keeps only the live
    # ones, in a new file whose name carries the old one (given back after the switch)
    packed = {rel: f"__ckm{tag}-{rel}" if same else rel
              for rel in carried if compact and _has_dead_bytes(parts, rel, live[rel])}
    # a compaction killed between its two switches left files under such names: give them back
    unnamed: dict[str, str] = {}
    for rel in carried:
        old_name = _untagged(rel) if compact and same and rel not in packed else None
        if old_name is not None and not (directory / old_name).exists():
            unnamed[rel] = old_name
    new_file = (f"__ckm{tag}_0.distcp" if parts is not None else "__0_0.distcp") if fresh else None
    old: set[str] = set()
    if same and parts is not None:
        old = parts.files()
    elif (directory / dcp.METADATA).exists():
        raise BadInput(f"{directory}: already holds a DCP checkpoint; give a new directory")
    if same and parts is not None and not fresh and not packed and not unnamed:
        _dcp_metadata_only(shardset, parts, kept, set(carried), envelope, keep_old)
        return
    in_place = {r for r in carried if r not in packed}
    new = ([] if same else sorted(in_place)) + list(packed.values()) + ([new_file] if new_file else [])
    shardset.begin(old - in_place, new, keep_old=keep_old)  # a kept .distcp file is never removed
    try:
        moved = _copy_chunks(parts, shardset, carried, packed, live, copy_whole=not same)
        written = []
        if new_file is not None:
            with shardset.create(new_file) as fh:
                pos = 0
                for fqn, path, value in fresh:
                    length = dcp_writer.write_tensor(fh, pos, value)
                    if length is None:
                        data = dcp_writer.save_bytes(value)
                        write_all(fh.fileno(), data, pos)
                        length = len(data)
                    written.append((fqn, path, value, new_file, pos, length))
                    pos += length
        if not packed and not fresh and unnamed and parts is not None:
            shardset.abort()
            back = {(rel, off): (old_name, off) for rel, old_name in unnamed.items() for off, _n in live[rel]}
            _dcp_names_back(directory, {old_name: rel for rel, old_name in unnamed.items()},
                            dcp_writer.build_metadata(parts, kept, [], back), set(parts.files()) - set(carried),
                            envelope, check)
            return
        unchanged = parts is not None and not fresh and not packed and len(kept) == len(
            parts.metadata.state["state_dict_metadata"]) and all(parts.origin[id(v)][0] == fqn for fqn, _p, v in kept)
        md = parts.raw if unchanged and parts is not None else dcp_writer.build_metadata(parts, kept, written, moved)
        env_name = dcp.envelope_name(md)
        if envelope is not None:
            shardset.add(env_name)
            _write_envelope(directory / env_name, envelope, create=shardset)
        shardset.commit(md, check)
    except BaseException:
        shardset.abort()
        raise
    if same and packed and not keep_old:
        back = {(packed[rel], pos): (rel, pos) for (rel, _off), (_new, pos) in moved.items()}
        _dcp_names_back(directory, packed, dcp_writer.build_metadata(parts, kept, written, {
            k: back[v] for k, v in moved.items()}), {env_name}, envelope, check)


def _dcp_metadata_only(
    shardset: ShardSet, parts: dcp.Dcp, kept: list[tuple[str, tuple[Any, ...], Any]], carried: set[str],
    envelope: dict[str, Any] | None, keep_old: bool,
) -> None:
    """A rewrite of a DCP directory in place that moves no ``.distcp`` byte (renames, drops, stamps):
    the new ``.metadata`` is known before anything is written, so the journal names the digest it
    switches to from the start (one journal write), and an envelope-only change replaces one file."""
    unchanged = len(kept) == len(parts.metadata.state["state_dict_metadata"]) and all(
        parts.origin[id(v)][0] == fqn for fqn, _p, v in kept)
    md = parts.raw if unchanged else dcp_writer.build_metadata(parts, kept, [])
    env_name = dcp.envelope_name(md)
    if md == parts.raw:  # only the envelope changes: one file, replaced atomically
        _write_envelope(parts.directory / env_name, envelope)
        return
    shardset.begin(parts.files() - carried, [env_name] if envelope is not None else [], keep_old=keep_old, commit=md)
    try:
        if envelope is not None:
            _write_envelope(parts.directory / env_name, envelope, create=shardset)
        shardset.commit(md, _metadata_check(parts, kept, md, envelope))
    except BaseException:
        shardset.abort()
        raise


@dataclass
class DcpRewrite:
    """A rewrite of a DCP checkpoint that moves no ``.distcp`` byte, as the files to put in place:
    the new ``.metadata`` (None when it does not change) and the envelope file named for it."""

    metadata: bytes | None
    envelope_name: str
    envelope: bytes | None


def dcp_metadata_rewrite(parts: dcp.Dcp, payload: Any, envelope: dict[str, Any] | None) -> DcpRewrite | None:
    """The files a rewrite of ``parts`` into ``payload`` writes when every tensor keeps its bytes
    (renames, drops, a stamp), checked to read back as meant before anything is written; None
    when a value changes (its bytes would go into a new ``.distcp`` file)."""
    kept, fresh = dcp_writer.split_payload(parts, payload)
    if fresh:
        return None
    unchanged = len(kept) == len(parts.metadata.state["state_dict_metadata"]) and all(
        parts.origin[id(v)][0] == fqn for fqn, _p, v in kept)
    md = parts.raw if unchanged else dcp_writer.build_metadata(parts, kept, [])
    if md != parts.raw:
        problem = None
        try:
            if dcp_writer.described(dcp_writer.reparse(md)) != dcp_writer.renamed_description(parts, kept):
                problem = "it describes other tensors than meant"
        except dcp.DcpFormatError as exc:
            problem = str(exc)
        if problem is not None:
            raise BadInput(f"{parts.directory}: the new .metadata does not read back ({problem}); nothing was written")
    data = None if envelope is None else json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()
    return DcpRewrite(None if md == parts.raw else md, dcp.envelope_name(md), data)


def _metadata_check(
    parts: dcp.Dcp, kept: list[tuple[str, tuple[Any, ...], Any]], md: bytes, envelope: dict[str, Any] | None,
) -> Callable[[Path], None]:
    """The read-back of a rewrite that moves no ``.distcp`` byte, without re-reading the checkpoint:
    the written file holds the bytes pickled, and those, unpickled again, describe every value as
    the old ``.metadata`` did under its new name (what ``dcp.load`` reads); the envelope reads back."""
    expected = dcp_writer.renamed_description(parts, kept)
    env_path = parts.directory / dcp.envelope_name(md)

    def check(written: Path) -> None:
        problem = None
        if written.read_bytes() != md:
            problem = "its bytes are not the ones written"
        else:
            try:
                if dcp_writer.described(dcp_writer.reparse(md)) != expected:
                    problem = "it describes other tensors than meant"
            except dcp.DcpFormatError as exc:
                problem = str(exc)
        if problem is None and envelope is not None and json.loads(env_path.read_bytes()) != envelope:
            problem = "the envelope does not read back"
        if problem is not None:
            raise BadInput(f"{parts.directory}: the written .metadata does not read back as written ({problem}); "
                           "nothing was replaced")

    return check


def _untagged(name: str) -> str | None:
    """The old name a compacted ``.distcp`` file carries in its own (``__ckm<tag>-<old>``), if any."""
    match = re.fullmatch(r"__ckm[0-9a-f]{8}-(.+\.distcp)", name)
    return match.group(1) if match else None


def _has_dead_bytes(parts: dcp.Dcp | None, rel: str, ranges: list[tuple[int, int]]) -> bool:
    """True when the live chunks of ``rel`` are fewer bytes than the file (and do not overlap)."""
    assert parts is not None
    ends = [off + length for off, length in ranges]
    if any(nxt < end for (nxt, _l), end in zip(ranges[1:], ends, strict=False)):
        return False
    return sum(length for _o, length in ranges) < os.stat(parts.directory / rel).st_size


def _copy_chunks(
    parts: dcp.Dcp | None, shardset: ShardSet, carried: list[str], packed: dict[str, str],
    live: dict[str, list[tuple[int, int]]], *, copy_whole: bool,
) -> dict[tuple[str, int], tuple[str, int]]:
    """Copy the carried ``.distcp`` files by the kernel: a packed one chunk by chunk into its new
    name (returning where each chunk went), the others whole when written elsewhere."""
    moved: dict[tuple[str, int], tuple[str, int]] = {}
    for rel in carried:
        if rel not in packed and not copy_whole:
            continue
        assert parts is not None
        with open(parts.directory / rel, "rb") as src, shardset.create(packed.get(rel, rel)) as fh:
            if rel not in packed:
                copy_range(src.fileno(), fh.fileno(), 0, os.fstat(src.fileno()).st_size, 0)
                continue
            pos = 0
            for offset, length in live[rel]:
                copy_range(src.fileno(), fh.fileno(), offset, length, pos)
                moved[(rel, offset)] = (packed[rel], pos)
                pos += length
    return moved


def _dcp_names_back(
    directory: Path, packed: dict[str, str], md: bytes, stale: set[str], envelope: dict[str, Any] | None,
    check: Any,
) -> None:
    """Give compacted ``.distcp`` files (old name -> current name) their old names again (the shard
    digests of the envelope name them): a switch whose new files are hard links, no byte copied;
    ``stale`` (the envelope file of the current ``.metadata``) goes with the current names."""
    shardset = ShardSet(directory, dcp.METADATA)
    shardset.begin({*packed.values(), *stale}, list(packed))
    try:
        for rel, tagged in packed.items():
            os.link(directory / tagged, directory / rel)
        if envelope is not None:
            shardset.add(dcp.envelope_name(md))
            _write_envelope(directory / dcp.envelope_name(md), envelope, create=shardset)
        shardset.commit(md, check)
    except BaseException:
        shardset.abort()
        raise


def _write_envelope(path: Path, envelope: dict[str, Any] | None, create: ShardSet | None = None) -> None:
    data = json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()
    if envelope is None:
        path.unlink(missing_ok=True)
        return
    if create is not None:
        with create.create(path.name) as fh:
            fh.write(data)
        return

    def same(tmp: Path) -> None:
        if json.loads(tmp.read_bytes()) != envelope:
            raise BadInput(f"{path}: the written envelope does not read back; nothing was replaced")

    with atomic_write(path, check=same) as fh:
        fh.write(data)
