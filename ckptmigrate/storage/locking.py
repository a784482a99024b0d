"""An advisory lock per checkpoint, so two processes never rewrite the same file at once.

The lock is ``flock`` on a hidden sibling ``.<name>.ckptmigrate-lock`` of the file itself (a symlink
is followed, so ``latest.pt`` and the ``epoch10.pt`` it points to share one lock): the kernel
releases it when its holder dies, so a crash leaves no stale lock, only the lock file. The file is
removed on release; a waiter that then finds it gone (or replaced) simply locks again. Whoever
locks a lock file that it did not create knows the holder before it died without releasing: it
removes the temporary file that holder may have left (:func:`ckptmigrate.storage.atomic.remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ckptmigrate.storage.atomic import remove_stale_temps


def lock_path(path: Path) -> Path:
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    return path.with_name(f".{path.name}.ckptmigrate-lock")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (blocking until other holders are done)."""
    target = lock_path(Path(path))
    while True:
        try:
            fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(target, os.O_RDWR)
            except FileNotFoundError:
                continue
            created = False
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
        if not created:  # left by a holder that was killed: so may a temporary file be
            remove_stale_temps(path)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        os.close(fd)
