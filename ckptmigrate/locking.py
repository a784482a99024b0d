"""An advisory lock per checkpoint, so two processes never rewrite the same file at once.

The lock is ``flock`` on a hidden sibling ``.<name>.ckptmigrate-lock``: the kernel releases it when
its holder dies, so a crash leaves no stale lock to clean up. The file is removed on release; a
waiter that then finds it gone (or replaced) simply locks again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.ckptmigrate-lock")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (blocking until other holders are done)."""
    target = lock_path(Path(path))
    while True:
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(target).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        os.close(fd)
