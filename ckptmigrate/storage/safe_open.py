"""Opening paths in directories other users can write: no link followed that the user did not name,
no file created over one that is already there, nothing read that is not a regular file.

A symbolic link the user named (``upgrade latest.pt`` where ``latest.pt -> epoch10.pt``) is followed
under the rule of the kernel's ``fs.protected_symlinks``, which does not apply here because
ckptmigrate resolves the link itself: only if the link is the user's (or root's), or sits in a
directory no one else can write, or belongs to that directory's owner. Every file ckptmigrate
creates (temporary files, backups, lock files) is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``,
so a link planted at its name is never written through.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ckptmigrate.errors import BadInput

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_MAX_HOPS = 40  # the kernel's MAXSYMLINKS


class UnsafePath(BadInput):
    """A path ckptmigrate will not follow or use: a link planted by another user, not a regular file."""


def others_can_write(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def trusted_owner(uid: int) -> bool:
    """The current user, or root (who can do anything to the current user anyway)."""
    return uid in (os.geteuid(), 0)


def _link_is_safe(link: Path) -> str | None:
    """Why following ``link`` would be unsafe (the ``fs.protected_symlinks`` rule), or None."""
    st = os.lstat(link)
    parent = os.stat(link.parent if str(link.parent) else ".")
    if st.st_uid == os.geteuid() or not others_can_write(parent) or st.st_uid == parent.st_uid:
        return None
    return (f"is a symbolic link owned by uid {st.st_uid} in a directory other users can write; "
            "ckptmigrate does not follow it — name its target if you mean it")


def follow_user_link(path: str | os.PathLike[str]) -> Path:
    """``path`` with the symbolic links the user named at its last component followed, each one
    checked by the ``fs.protected_symlinks`` rule; :class:`UnsafePath` when one fails it."""
    current = Path(path)
    for _ in range(_MAX_HOPS):
        try:
            if not stat.S_ISLNK(os.lstat(current).st_mode):
                return current
        except FileNotFoundError:
            return current
        reason = _link_is_safe(current)
        if reason is not None:
            raise UnsafePath(f"{path}: {reason}", path=path)
        target = Path(os.readlink(current))
        current = target if target.is_absolute() else current.parent / target
    raise UnsafePath(f"{path}: too many levels of symbolic links", path=path)


def create_new(path: str | os.PathLike[str], mode: int = 0o600, flags: int = os.O_RDWR) -> int:
    """A new file at ``path``, never one that exists and never through a link: FileExistsError
    when anything (a file, a dangling link) is there."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC, mode)


def publish(tmp: Path, dest: Path) -> None:
    """Give the complete file ``tmp`` the new name ``dest`` without replacing anything at ``dest``
    (FileExistsError, even for a dangling link), then drop the name ``tmp``."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # a filesystem without hard links (FAT, some FUSE mounts): check, then rename
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dest)) from None
        os.rename(tmp, dest)
        return
    os.unlink(tmp)


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, *, what: str = "file") -> int:
    """Open an existing regular file without following a final link and without blocking on a FIFO
    or a device; :class:`UnsafePath` for anything else (a FIFO, ``/dev/zero``, a directory)."""
    try:
        fd = os.open(path, flags | NONBLOCK | CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO without a writer, opened for writing
            raise UnsafePath(f"{path}: the {what} is not a regular file", path=path) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePath(f"{path}: the {what} is not a regular file", path=path)
    if NONBLOCK:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~NONBLOCK)
    return fd


def read_small(path: str | os.PathLike[str], limit: int, *, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (a key, a signature, a manifest)."""
    fd = open_regular(path, what=what)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{path}: the {what} is larger than {limit} bytes; this is not a {what}", path=path)
    return data
