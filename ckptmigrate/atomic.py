"""Atomic replacement of a file: a temporary sibling, fsync, rename, fsync of the directory.

A reader of the destination sees either the old file or the complete new one, never a mix,
whatever moment the process is killed at.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".ckptmigrate-tmp-"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    dest: str | os.PathLike[str], *, mode: int | None = None, check: Callable[[Path], None] | None = None
) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``dest`` only if the block completes without error.

    ``check(temp_path)`` runs on the complete, synced file before the rename; if it raises, the
    destination is left as it was.
    """
    dest = Path(dest)
    if dest.is_symlink():  # replace the file the link points to (``latest.pt -> epoch10.pt``)
        dest = Path(os.path.realpath(dest))
    directory = dest.parent if str(dest.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if mode is None and dest.exists():
            mode = dest.stat().st_mode & 0o7777
        os.chmod(tmp, mode if mode is not None else 0o644)
        if check is not None:
            check(tmp)
        os.replace(tmp, dest)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
