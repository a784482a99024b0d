"""Where ckptmigrate may import migration scripts from without being told: git's ``safe.directory``
idea applied to ``[tool.ckptmigrate]``.

Importing a script runs it, so a ``pyproject.toml`` found by walking up from the working directory
is only believed inside the user's own project:

- the walk stops before a directory on another file system or owned by someone other than the user
  (or root), and after the repository root (a directory holding ``.git``);
- in a directory other users can write it stops: a ``pyproject.toml`` there that is not the user's
  is ignored (``/tmp/pyproject.toml`` planted by another user), one that is the user's is refused
  unless the directory is sticky (others cannot replace it there);
- the ``pyproject.toml`` found, the migrations directory it names, its ``versions/`` and every script
  must belong to the user (or root) and be writable by no one else; otherwise nothing is imported
  and the error says to name the directory (``--migrations`` / ``migrations=``), which is
  imported as given.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckptmigrate.errors import BadInput
from ckptmigrate.storage.safe_open import others_can_write, trusted_owner


class UntrustedScripts(BadInput):
    """Scripts would be imported from a place other users control; nothing was imported."""


def _owner_problem(st: os.stat_result) -> str | None:
    return None if trusted_owner(st.st_uid) else f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"


def problem(path: Path, *, sticky_ok: bool = False) -> str | None:
    """Why ``path`` may not be trusted as the user's own, or None."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)
    owner = _owner_problem(st)
    if owner is not None:
        return owner
    if others_can_write(st) and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return "is writable by other users"
    return None


def project_dirs(start: Path) -> Iterator[Path]:
    """``start`` and its parents up to the project boundary (see the module docstring)."""
    here = start.resolve()
    try:
        device = os.stat(here).st_dev
    except OSError:
        return
    for directory in (here, *here.parents):
        try:
            st = os.stat(directory)
        except OSError:
            return
        if st.st_dev != device or not trusted_owner(st.st_uid):
            return
        yield directory
        if others_can_write(st) or os.path.lexists(directory / ".git"):
            return


def pyproject_problem(pyproject: Path) -> str | None:
    """Why the ``pyproject.toml`` found may not name scripts to import, or None."""
    reason = problem(pyproject)
    if reason is not None:
        return f"{pyproject} {reason}"
    reason = problem(pyproject.parent, sticky_ok=True)
    return None if reason is None else f"{pyproject.parent} {reason}"


def foreign(pyproject: Path) -> bool:
    """A file of another user in a directory others can write: not this user's project at all."""
    try:
        return not trusted_owner(os.lstat(pyproject).st_uid) and others_can_write(os.stat(pyproject.parent))
    except OSError:
        return True


def check_scripts(root: Path, versions: Path, scripts: Iterable[Path], pyproject: Path | None) -> None:
    """Refuse to import scripts found through ``pyproject`` from a place other users control."""
    where = f" (named by {pyproject})" if pyproject is not None else ""
    for path in (root, versions, *scripts):
        reason = problem(path)
        if reason is not None:
            error = UntrustedScripts(
                f"{path} {reason}; ckptmigrate imports no migration scripts from there{where} — name "
                f"the script directory (migrations={str(root)!r}) if you trust it", path=path,
            )
            error.cli_hint = f"pass --migrations {root}"
            raise error
