"""The ``PATH.bak`` a rewrite in place keeps: a new name that never overwrites a backup or follows a
planted link, made without copying the file where the filesystem allows."""

from __future__ import annotations

import os
from pathlib import Path

from ckptmigrate.storage.atomic import keep_copy
from ckptmigrate.storage.safe_open import follow_user_link


def backup_path(path: Path, start: int = 0) -> Path:
    """``x.pth.bak``, or ``x.pth.bak.1``, ``.2``, ... — the first name where nothing is, not even a
    dangling symbolic link: an existing backup is never overwritten, a planted link never followed."""
    n = start
    while True:
        candidate = path.with_name(path.name + ".bak" + (f".{n}" if n else ""))
        if not os.path.lexists(candidate):
            return candidate
        n += 1


def make_backup(path: Path) -> tuple[Path, bool]:
    """Keep the original at ``PATH.bak[.N]`` without copying it where possible (see
    :func:`~ckptmigrate.storage.atomic.keep_copy`); True when the backup is a file of its own, so that
    ``path`` may still be appended to in place. The backup is created as a new name only: a name
    taken between the look and the creation (another process, a planted link) moves on to the next."""
    source = follow_user_link(path)
    n = 0
    while True:
        dest = backup_path(path, n)
        try:
            return dest, keep_copy(source, dest)
        except FileExistsError:
            n = int(dest.name.rsplit(".", 1)[1]) + 1 if not dest.name.endswith(".bak") else 1
