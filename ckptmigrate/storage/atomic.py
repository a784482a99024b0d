"""Atomic replacement of a file: a temporary sibling, fsync, rename, fsync of the directory.

A reader of the destination sees either the old file or the complete new one, never a mix,
whatever moment the process is killed at. The temporary file is named after the destination
(``.ckptmigrate-tmp-<name>.<random>.part``), so one that a killed writer left behind can be found
and removed by the next writer of the same file (:func:`remove_stale_temps`, called by
:func:`ckptmigrate.storage.locking.file_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ckptmigrate.errors import CkptMigrateError
from ckptmigrate.storage.safe_open import create_new, follow_user_link, publish

TEMP_PREFIX = ".ckptmigrate-tmp-"
_SUFFIX = ".part"
_LONG_NAME = 160  # bytes of the destination's name kept in the temporary name (NAME_MAX is 255)
_FICLONE = 0x40049409  # linux/fs.h, _IOW(0x94, 9, int): clone a whole file, sharing its blocks copy-on-write


class WriteFailed(CkptMigrateError):
    """The new file could not be written (no space left, no permission); the destination is as it was."""


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resolved(dest: str | os.PathLike[str]) -> Path:
    """Replace the file a link the user named points to (``latest.pt -> epoch10.pt``), never one
    planted by another user (:func:`~ckptmigrate.storage.safe_open.follow_user_link`)."""
    return follow_user_link(dest)


def _temp_stem(dest: Path) -> str:
    """The start of every temporary name of ``dest``: ``.ckptmigrate-tmp-<name>.``"""
    raw = os.fsencode(dest.name)
    if len(raw) > _LONG_NAME:
        raw = raw[: _LONG_NAME - 13] + b"~" + hashlib.sha256(raw).hexdigest()[:12].encode()
    return f"{TEMP_PREFIX}{os.fsdecode(raw)}."


def remove_stale_temps(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of ``dest`` that killed writers left behind; return them.

    Only call this holding ``dest``'s lock (:func:`ckptmigrate.storage.locking.file_lock`): every writer of
    ``dest`` holds it, so none of its temporary files can still be in use. Other files' temporary
    files are never touched.
    """
    dest = _resolved(dest)
    directory = dest.parent if str(dest.parent) else Path(".")
    pattern = re.compile(re.escape(_temp_stem(dest)) + r"[0-9a-f]{8}" + re.escape(_SUFFIX))
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        if pattern.fullmatch(name):
            with contextlib.suppress(OSError):  # gone already, or another user's in a sticky directory
                os.unlink(directory / name)
                removed.append(directory / name)
    return removed


def _create_temp(directory: Path, stem: str) -> tuple[int, Path]:
    while True:
        tmp = directory / f"{stem}{secrets.token_hex(4)}{_SUFFIX}"
        try:
            return create_new(tmp), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_write(
    dest: str | os.PathLike[str], *, mode: int | None = None, check: Callable[[Path], None] | None = None
) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``dest`` only if the block completes without error.

    ``check(temp_path)`` runs on the complete, synced file before the rename; if it raises, the
    destination is left as it was. An OSError on the way (a full disk, a read-only directory)
    becomes :class:`WriteFailed`, one line naming ``dest``.
    """
    dest = _resolved(dest)
    directory = dest.parent if str(dest.parent) else Path(".")
    tmp: Path | None = None
    replaced = False
    try:
        fd, tmp = _create_temp(directory, _temp_stem(dest))
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
        replaced = True
        fsync_dir(directory)
    except OSError as exc:
        if replaced:
            state = "it was replaced, but its directory could not be synced"
        else:
            state = f"{dest.name} is left as it was" if dest.exists() else "nothing was written"
        raise WriteFailed(f"{dest}: could not write the new file: {exc.strerror or exc}; {state}") from exc
    finally:
        if tmp is not None and not replaced:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def keep_copy(src: Path, dest: Path) -> bool:
    """Make the new file ``dest`` hold ``src``'s bytes, without copying them where the filesystem can.

    First a copy-on-write clone (XFS, btrfs: no bytes move, and ``dest`` is a file of its own), else
    a hard link (no bytes move, but ``dest`` *is* ``src``'s inode: ``src`` may then only be replaced,
    never changed in place), else a copy. Returns True when ``dest`` is independent of ``src``.
    ``dest`` appears complete or not at all, and only as a new name: FileExistsError when anything
    is already there, a dangling symbolic link included (it is never written through). A clone's or
    copy's temporary file is one of ``src``'s, so :func:`remove_stale_temps` finds it after a crash.
    """
    directory = dest.parent if str(dest.parent) else Path(".")
    if sys.platform == "linux":
        import fcntl

        fd, tmp = _create_temp(directory, _temp_stem(src))
        try:
            with open(src, "rb") as original:
                fcntl.ioctl(fd, _FICLONE, original.fileno())
            os.fsync(fd)
        except OSError:  # no clones here (ext4, tmpfs, another filesystem)
            os.close(fd)
            tmp.unlink(missing_ok=True)
        else:
            os.close(fd)
            _finish(src, tmp, dest)
            return True
    try:
        os.link(src, dest)  # link(2) never follows ``dest``: EEXIST for a planted link
        return False
    except FileExistsError:
        raise
    except OSError:
        from ckptmigrate.storage.rawio import copy_range

        fd, tmp = _create_temp(directory, _temp_stem(src))
        try:
            with os.fdopen(fd, "r+b") as fh, open(src, "rb") as original:
                copy_range(original.fileno(), fh.fileno(), 0, os.fstat(original.fileno()).st_size, 0)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _finish(src, tmp, dest)
        return True


def _finish(src: Path, tmp: Path, dest: Path) -> None:
    try:
        shutil.copystat(src, tmp)
        publish(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent if str(dest.parent) else Path("."))
