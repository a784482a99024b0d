"""Writing a DCP directory in one switch (:class:`~ckptmigrate.storage.shardset.ShardSet`): new
values into one new ``.distcp`` file, kept chunks left where they are or, compacted, copied by the
kernel into a file of their own (its old name given back after the switch), and a rewrite that
moves no ``.distcp`` byte (renames, drops, a stamp) as its ``.metadata`` and envelope alone.

:func:`ckptmigrate.formats.multifile.write` chooses this for a DCP checkpoint; the bytes of each
file come from :mod:`ckptmigrate.formats.dcp_writer`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptmigrate.errors import BadInput
from ckptmigrate.formats import dcp, dcp_writer
from ckptmigrate.storage.atomic import atomic_write
from ckptmigrate.storage.rawio import copy_range, write_all
from ckptmigrate.storage.shardset import ShardSet


def write_dcp(
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
