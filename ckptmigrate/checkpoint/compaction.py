"""Compaction: a torch zip file rewritten with only its live records (in-place appends leave
orphaned bytes), a DCP directory's ``.distcp`` files with only the chunks its ``.metadata`` still
names; the sizes before and after. :func:`ckptmigrate.api.compact` checks the arguments."""

from __future__ import annotations

import os
from pathlib import Path

from ckptmigrate import formats
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.storage.locking import file_lock


def compact_file(path: Path, output: Path | None) -> tuple[int, int]:
    """:func:`ckptmigrate.api.compact` of a local checkpoint into ``output`` (None: in place)."""
    dest = output or path
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
    if ckpt.format not in formats.MULTI_FORMATS:
        return os.stat(ckpt.path).st_size
    commit = formats.commit_file(ckpt.path)
    return sum(os.stat(commit.parent / name).st_size for name in {commit.name, *ckpt.container.parts.files()})
