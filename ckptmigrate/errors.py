"""The errors ckptmigrate raises: each carries one line a user can act on.

The CLI maps :class:`BadInput` to exit code 2 and :class:`CheckFailed` to exit code 1.
"""

from __future__ import annotations


class CkptMigrateError(Exception):
    """Base class: the message is a complete sentence naming the file or revision involved."""


class BadInput(CkptMigrateError):
    """The input (a file, an argument, a migration script) cannot be used as given."""


class CheckFailed(CkptMigrateError):
    """A check ran and found a difference (a verify, a schema check)."""


class MigrationError(BadInput):
    """A migration script failed; the message names the revision, its file, the op and the key."""


class RevisionError(BadInput):
    """The revision graph is inconsistent, or a revision cannot be found."""


def one_line(text: object) -> str:
    """``text`` on one line: what a broken file holds (a quoted name, a line break) escaped."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
