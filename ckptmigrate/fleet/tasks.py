"""The per-file work of ``upgrade``, ``downgrade``, ``stamp`` and ``verify`` as functions a worker
process (local or on a Ray node) runs: plain arguments in (the path as a string, the options as
data), a :class:`TaskResult` of plain data out.

Each task calls the same :mod:`ckptmigrate.api` function the single-file command does, so a task
takes that file's lock and writes atomically. A :class:`~ckptmigrate.errors.CkptMigrateError` is the
file's result (deterministic: retrying cannot help); anything that kills the worker is the
executor's business, which re-runs the task (a re-run of a migration finds the file at its target,
or where it was, because every write is atomic).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ckptmigrate.errors import CkptMigrateError, one_line
from ckptmigrate.util.urls import as_location

#: The results that mean a file is done (the others: ``failed``; a journal's ``skipped``).
DONE = ("written", "unchanged", "stamped", "ok")


def hostname() -> str:
    """``socket.gethostname()``: the kernel's host name, which ``os.uname`` gives without importing
    ``socket`` (3 ms of every command's start-up)."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket

    return socket.gethostname()


@dataclass
class TaskResult:
    """What happened to one file: flat facts for the journal, ``detail`` for the command's printing."""

    path: str
    command: str
    result: str
    before: str | None = None
    after: str | None = None
    error: dict[str, Any] | None = None
    attempt: int = 1
    host: str = field(default_factory=hostname)
    pid: int = field(default_factory=os.getpid)
    seconds: float = 0.0
    detail: Any = None
    #: The error itself, kept only in the process that ran the task (it is not pickled).
    exception: CkptMigrateError | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "exception": None}


def error_data(exc: CkptMigrateError) -> dict[str, Any]:
    """The error as data (as ``--json`` reports it), with the command-line hint in the message."""
    message = str(exc) + (f"; {exc.cli_hint}" if exc.cli_hint else "")
    return {**exc.to_dict(), "message": one_line(message)}


def _as_error(path: str, exc: OSError) -> CkptMigrateError:
    """A system refusal (no space, no permission) as one line naming the file, like the CLI's."""
    other = f" ({exc.filename})" if exc.filename is not None and str(exc.filename) != path else ""
    return CkptMigrateError(f"{path}: {exc.strerror or exc}{other}", path=path)


@functools.lru_cache(maxsize=8)
def _chain(migrations: str | None) -> Any:
    """The chain, loaded once per worker process (its scripts are imported once)."""
    from ckptmigrate import api

    return api.chain_source(migrations)


@functools.lru_cache(maxsize=8)
def _graph(migrations: str | None) -> Any:
    from ckptmigrate import api

    return api.revision_graph(migrations)


@functools.lru_cache(maxsize=8)
def _key(kind: str, path: str | None) -> Any:
    from ckptmigrate.release import signing

    if path is None:
        return None
    return signing.load_private_key(path) if kind == "private" else signing.load_public_key(path)


def run(command: str, options: dict[str, Any], path: str, attempt: int = 1) -> TaskResult:
    """Run ``command`` on the file at ``path`` with ``options`` (the api function's keywords, keys
    and chains named by path); never raises a :class:`CkptMigrateError`."""
    start = time.monotonic()
    try:
        try:
            result = _COMMANDS[command](path, dict(options))
        except OSError as exc:
            raise _as_error(path, exc) from exc
    except CkptMigrateError as exc:
        exc.path = exc.path or path
        result = TaskResult(path, command, "failed", error=error_data(exc), exception=exc)
        if command == "verify":
            from ckptmigrate.release.integrity import VerifyResult

            result.detail = VerifyResult(as_location(path), problems=[str(exc)])
    result.attempt = attempt
    result.seconds = time.monotonic() - start
    return result


def _migrate(direction: str, path: str, options: dict[str, Any]) -> TaskResult:
    from ckptmigrate import api

    run = api.upgrade if direction == "upgrade" else api.downgrade
    options["migrations"] = _chain(options.get("migrations"))
    outcome = run(path, **options)
    plan = outcome.plan
    row = outcome.to_dict()
    detail = {"row": row, "describe": plan.describe() if plan else "", "start_source": plan.start_source if plan
              else None, "steps": bool(plan and plan.steps)}
    return TaskResult(path, direction, "written" if outcome.written else "unchanged",
                      before=row["from"], after=row["to"] if outcome.written or not options.get("dry_run")
                      else row["from"], detail=detail)


def _upgrade(path: str, options: dict[str, Any]) -> TaskResult:
    return _migrate("upgrade", path, options)


def _downgrade(path: str, options: dict[str, Any]) -> TaskResult:
    return _migrate("downgrade", path, options)


def _stamp(path: str, options: dict[str, Any]) -> TaskResult:
    from ckptmigrate import api, formats

    before = (formats.read_envelope(path)[1] or {}).get("revision")
    options["sign"] = _key("private", options.get("sign"))
    if options.get("revision") is not None:
        options["migrations"] = _graph(options.get("migrations"))
    dest = api.stamp(path, **options)
    after = (formats.read_envelope(dest)[1] or {}).get("revision")
    return TaskResult(path, "stamp", "stamped", before=before, after=after, detail={"output": str(dest)})


def _verify(path: str, options: dict[str, Any]) -> TaskResult:
    from ckptmigrate import api

    result = api.verify(path, _key("public", options.get("public_key")), key=options.get("key"))
    revision = (result.envelope or {}).get("revision")
    error = None if result.ok else {"type": "CheckFailed", "message": "; ".join(result.problems), "exit_code": 1,
                                    "path": path}
    return TaskResult(path, "verify", "ok" if result.ok else "failed", before=revision, after=revision,
                      error=error, detail=result)


_COMMANDS = {"upgrade": _upgrade, "downgrade": _downgrade, "stamp": _stamp, "verify": _verify}
