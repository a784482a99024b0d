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
