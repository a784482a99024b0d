"""An advisory lock per checkpoint, so two processes never rewrite the same file at once.

Two ``flock`` locks, taken in this order:

1. the *name* lock, on a hidden sibling ``.<name>.ckptmigrate-lock`` of the file (a symlink the user
   named is followed, by the rule of :func:`~ckptmigrate.storage.safe_open.follow_user_link`, so
   ``latest.pt`` and the ``epoch10.pt`` it points to share one lock). It exists before the file
   does (``-o NEW``) and outlives a rename over the file. The kernel releases it when its holder
   dies, so a crash leaves no stale lock, only the lock file; whoever locks a lock file that it did
   not create knows the holder died without releasing, and removes the temporary file that holder
   may have left (:func:`ckptmigrate.storage.atomic.remove_stale_temps`).
2. the *inode* lock, on the checkpoint file itself when it exists: two hard links to one file have
   two names and two name locks, but one inode, so in-place appends through either name serialise.
   After a rename over the file the waiter finds the name on a new inode and locks that one.

The lock file is created with ``O_EXCL | O_NOFOLLOW`` and opened with ``O_NOFOLLOW``: a symbolic
link, a FIFO or a directory at its name is refused with one line instead of being followed or
spun on. A lock file another user owns (a sticky shared directory) is locked if it can be opened
and left in place if it cannot be removed; one that cannot be opened is refused with one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ckptmigrate.storage.atomic import remove_stale_temps
from ckptmigrate.storage.safe_open import CLOEXEC, NOFOLLOW, NONBLOCK, UnsafePath, create_new, follow_user_link


def lock_path(path: Path) -> Path:
    path = follow_user_link(path)
    return path.with_name(f".{path.name}.ckptmigrate-lock")


def _open_existing(target: Path) -> int | None:
    """The existing lock file, read-write or else read-only (``flock`` needs neither); None if it
    is gone already; :class:`UnsafePath` if it is not a regular file or cannot be opened."""
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            fd = os.open(target, flags | NOFOLLOW | NONBLOCK | CLOEXEC)
        except FileNotFoundError:
            return None
        except PermissionError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise UnsafePath(
                    f"{target}: something other than a lock file sits at the lock file's name "
                    f"({exc.strerror}); remove it", path=target,
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePath(f"{target}: something other than a lock file sits at the lock file's name; remove it",
                             path=target)
        return fd
    owner = os.lstat(target).st_uid
    raise UnsafePath(
        f"{target}: the lock file belongs to uid {owner} and cannot be opened; "
        "ask its owner to remove it, or work on a copy of the checkpoint elsewhere", path=target,
    )


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lock_name(target: Path) -> tuple[int, bool]:
    while True:
        try:
            fd, created = create_new(target, 0o644), True
        except FileExistsError:
            existing = _open_existing(target)
            if existing is None:
                continue
            fd, created = existing, False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = _ident(os.lstat(target)) == _ident(os.fstat(fd))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd, created
        os.close(fd)  # removed or replaced while we waited: lock the one that is there now


def _lock_inode(path: Path) -> int | None:
    """``flock`` on the file itself, re-taken until ``path`` still names the inode locked; None
    when there is no regular file to lock (not written yet, unreadable: the caller fails later)."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | NOFOLLOW | NONBLOCK | CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                return None
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = _ident(os.lstat(path)) == _ident(st)
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive lock of ``path`` (blocking until other holders are done)."""
    target = lock_path(Path(path))
    fd, created = _lock_name(target)
    inode: int | None = None
    try:
        inode = _lock_inode(follow_user_link(path))
        if not created:  # left by a holder that was killed: so may a temporary file be
            remove_stale_temps(path)
        yield
    finally:
        # another user's lock file in a sticky directory cannot be removed: it stays, unlocked
        with contextlib.suppress(OSError):
            os.unlink(target)
        if inode is not None:
            os.close(inode)
        os.close(fd)
