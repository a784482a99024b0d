"""A file of a multi-file checkpoint, on disk or an object under a prefix in a bucket.

The sharded-model and DCP readers name each file by its directory and its name; a prefix in object
storage is an :class:`~ckptmigrate.util.urls.ObjectURL` carried where the directory is, so the
readers open a shard, read a small file whole or ask whether one is there through these functions,
and read a prefix by range requests as they read a directory: the index, ``.metadata`` and the
envelope whole, a shard's header or a chunk's zip records by range, never its tensor bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptmigrate.errors import RemoteError
from ckptmigrate.tensors.refs import Source
from ckptmigrate.util.urls import ObjectURL


class TooLarge(ValueError):
    """A small file (an index, a ``.metadata``) is larger than its reader's limit; ``size`` says how large."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _missing(exc: RemoteError) -> bool:
    return "no such object" in str(exc)


def open_source(path: Path) -> Source:
    """The file opened for reading: a local file, or an object read by range. FileNotFoundError
    when there is none (as :func:`open` raises it)."""
    if not isinstance(path, ObjectURL):
        return Source(path)
    from ckptmigrate.storage.ranges import RangeFile

    try:
        return Source(path, remote=RangeFile(path))
    except RemoteError as exc:
        if _missing(exc):
            raise FileNotFoundError(2, "no such object", str(path)) from None
        raise


def read_small(path: Path, limit: int) -> bytes:
    """The whole of a small file, refused (:class:`TooLarge`) past ``limit`` bytes before it is read."""
    return read_tagged(path, limit)[0]


def read_tagged(path: Path, limit: int) -> tuple[bytes, str | None, str | None]:
    """:func:`read_small`, with the object's ETag and version as read (None for a local file): what
    a conditional write of the object in its place is checked against."""
    if not isinstance(path, ObjectURL):
        size = os.stat(path).st_size
        if size > limit:
            raise TooLarge(size)
        return path.read_bytes(), None, None
    source = open_source(path)
    try:
        if source.size > limit:
            raise TooLarge(source.size)
        return source.pread(source.size, 0), source.remote.etag, source.remote.version
    finally:
        source.close()
