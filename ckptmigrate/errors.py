"""The errors ckptmigrate raises: one line a user can act on, and fields a caller can act on.

Every error is a :class:`CkptMigrateError` whose message is a complete sentence naming the file or
revision involved, and whose attributes carry the same facts as data (``path``, ``revision``, ``op``,
``key``, ``candidates``, ``heads``, ...), so a program can handle ``RevisionError.heads`` the way an
Alembic user handles ``MultipleHeads.heads``. :meth:`CkptMigrateError.to_dict` is what ``--json``
commands print as ``{"error": {...}}``. The CLI maps :class:`BadInput` to exit code 2 and
:class:`CheckFailed` to exit code 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


class CkptMigrateError(Exception):
    """Base class: the message is a complete sentence naming the file or revision involved.

    ``path`` is the file the error is about, when there is one.
    """

    #: Exit code of the CLI for this error.
    exit_code = 2
    #: What a command-line user can do about it ("pass --from REV ..."): the CLI adds it to the message,
    #: which itself names no command-line option, so a library user is not told about flags.
    cli_hint: str | None = None

    def __init__(self, message: str = "", *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None

    @property
    def message(self) -> str:
        return str(self)

    def fields(self) -> dict[str, Any]:
        """The facts of this error beyond its message (what subclasses add)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """``{"type", "message", "path", "exit_code", ...fields}``: what ``--json`` prints."""
        return {"type": type(self).__name__, "message": str(self), "path": self.path,
                "exit_code": self.exit_code, **self.fields()}


class BadInput(CkptMigrateError):
    """The input (a file, an argument, a migration script) cannot be used as given."""


class CheckFailed(CkptMigrateError):
    """A check ran and found a difference (a verify, a schema check); ``difference`` holds it as data."""

    exit_code = 1

    def __init__(self, message: str = "", *, path: str | os.PathLike[str] | None = None,
                 difference: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, path=path)
        self.difference = dict(difference) if difference is not None else None

    def fields(self) -> dict[str, Any]:
        return {"difference": self.difference}


class MigrationError(BadInput):
    """A migration script failed: ``revision``, its ``script`` file, the ``action`` (upgrade or
    downgrade), the ``op`` and the ``key`` it failed on (None when the script itself raised); for a
    script whose result is not the schema its revision recorded, the ``difference`` (``missing``,
    ``unexpected`` and ``reshaped`` keys)."""

    def __init__(self, message: str = "", *, path: str | os.PathLike[str] | None = None,
                 revision: str | None = None, script: str | os.PathLike[str] | None = None,
                 action: str | None = None, op: str | None = None, key: str | None = None,
                 difference: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, path=path)
        self.revision, self.action, self.op, self.key = revision, action, op, key
        self.script = os.fspath(script) if script is not None else None
        self.difference = dict(difference) if difference is not None else None

    def fields(self) -> dict[str, Any]:
        return {"revision": self.revision, "script": self.script, "action": self.action, "op": self.op,
                "key": self.key, "difference": self.difference}


class RevisionError(BadInput):
    """The revision graph is inconsistent, or a revision cannot be found.

    ``revision`` is the id asked for, ``candidates`` the ids it could have meant (an ambiguous prefix,
    the known ids), ``heads`` the competing heads of a lineage with more than one, ``script`` the
    migration script at fault (a syntax error, a missing ``upgrade``).
    """

    def __init__(self, message: str = "", *, path: str | os.PathLike[str] | None = None,
                 revision: str | None = None, candidates: Sequence[str] = (), heads: Sequence[str] = (),
                 script: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message, path=path)
        self.revision = revision
        self.candidates = list(candidates)
        self.heads = list(heads)
        self.script = os.fspath(script) if script is not None else None

    def fields(self) -> dict[str, Any]:
        return {"revision": self.revision, "candidates": self.candidates, "heads": self.heads,
                "script": self.script}


class SchemaMismatch(BadInput):
    """A checkpoint's schema is not the one expected: ``nearest`` the closest revision (or the one
    asked for), and the keys ``missing``, ``unexpected`` and ``reshaped`` relative to it."""

    def __init__(self, message: str = "", *, path: str | os.PathLike[str] | None = None,
                 nearest: str | None = None, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 reshaped: Sequence[str] = ()) -> None:
        super().__init__(message, path=path)
        self.nearest = nearest
        self.missing, self.unexpected, self.reshaped = list(missing), list(unexpected), list(reshaped)

    def fields(self) -> dict[str, Any]:
        return {"nearest": self.nearest, "missing": self.missing, "unexpected": self.unexpected,
                "reshaped": self.reshaped}


class OutputExists(BadInput):
    """``output`` exists and overwriting it was not asked for (``overwrite=True``, ``--overwrite``)."""


class RemoteError(BadInput):
    """An object in storage (``s3://``, ``https://``, ...) cannot be read or written as asked: ``url``
    (never with credentials), and the ``extra`` to install when its backend is missing."""

    def __init__(self, message: str = "", *, url: str, extra: str | None = None) -> None:
        super().__init__(message, path=url)
        self.url, self.extra = url, extra

    def fields(self) -> dict[str, Any]:
        return {"url": self.url, "extra": self.extra}


class MultiFileObject(RemoteError):
    """A URL names a prefix that holds a multi-file checkpoint (``marker``: its ``.metadata`` or
    ``*.index.json``), which the command cannot read or write in object storage."""

    def __init__(self, message: str = "", *, url: str, marker: str) -> None:
        super().__init__(message, url=url)
        self.marker = marker

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "marker": self.marker}


class ObjectChanged(RemoteError):
    """The object changed between the read that planned a write and the write (another runner won):
    ``expected`` and ``found`` are its ETags; nothing was written."""

    def __init__(self, message: str = "", *, url: str, expected: str | None, found: str | None) -> None:
        super().__init__(message, url=url)
        self.expected, self.found = expected, found

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "expected": self.expected, "found": self.found}


class CkptMigrateWarning(UserWarning):
    """Something worth knowing that does not stop the work (an option that had nothing to do)."""


class UnsafePickleWarning(UserWarning):
    """A file's pickle names globals outside torch's ``weights_only`` allow-list: kept inert by
    ckptmigrate, but ``torch.load(weights_only=False)`` of the file would import and run them."""


def one_line(text: object) -> str:
    """``text`` on one line: what a broken file holds (a quoted name, a line break) escaped."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class MultipleHeads(RevisionError):
    """A lineage has several heads where one was needed: ``heads`` names them (merge them), ``lineage``
    the lineage."""

    def __init__(self, message: str, heads: list[str], lineage: str | None, *,
                 path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message, path=path, heads=heads)
        self.lineage = lineage
        self.cli_hint = f"merge them: ckptmigrate merge -m MESSAGE {' '.join(heads)} (or name one with --to REV)"

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "lineage": self.lineage}


class MergeConflict(MigrationError):
    """Two revisions on different branches change the same key: ``revisions`` names both, ``key`` the key."""

    def __init__(self, message: str, revisions: tuple[str, str], key: str, *,
                 path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message, path=path, revision=revisions[1], key=key)
        self.revisions = revisions

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "revisions": list(self.revisions)}


class NewerThanChain(RevisionError):
    """A checkpoint is at a revision the installed chain does not know (written by a newer release).

    ``revision`` is the file's, ``known`` the newest revision of its history this chain knows (None:
    none), ``ahead`` the recorded revisions past it, ``written_by`` the versions that applied them.
    """

    def __init__(self, message: str, revision: str, known: str | None, ahead: list[str],
                 written_by: list[str], *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message, path=path, revision=revision)
        self.known = known
        self.ahead = ahead
        self.written_by = written_by

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "known": self.known, "ahead": self.ahead, "written_by": self.written_by}
