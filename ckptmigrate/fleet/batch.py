"""A command over many files: skip what the journal proves done, run the rest on an executor with
retries, journal each result as it arrives, and hand results back in the order the files were named
(so a batch prints the same whatever ran where)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ckptmigrate.errors import CkptMigrateError, one_line
from ckptmigrate.fleet import executors, tasks
from ckptmigrate.fleet.journal import Journal, path_key

#: Options that name a file, made absolute for a worker whose working directory is not ours.
PATH_OPTIONS = ("output", "repo", "sign", "public_key")


def portable_migrations(migrations: str | None) -> str | None:
    """The chain as a worker elsewhere can load it: an absolute directory or a module name, the
    configured one (checked as trusted here, in the driver) when none is given."""
    from ckptmigrate.chain import config

    if migrations is not None:
        return os.path.abspath(migrations) if os.path.exists(migrations) else migrations
    cfg = config.load()
    if cfg.migrations is None or cfg.root is None:
        return None
    cfg.require_trusted()
    local = cfg.root / cfg.migrations
    return str(local.resolve()) if local.exists() else cfg.migrations


def chain_key(source: Any) -> str | None:
    """What a journal line's target meant: the configured chain's heads (None: the installed chains)."""
    graph = getattr(source, "graph", None)
    if graph is None:
        return None
    return ",".join(sorted(rev.id for revs in graph.heads().values() for rev in revs))


def _crashed(path: str, command: str, finished: executors.Finished) -> tasks.TaskResult:
    message = f"{path}: the task did not finish in {finished.attempt} attempts (last: {finished.crash})"
    return tasks.TaskResult(path, command, "failed", attempt=finished.attempt, host="", pid=0,
                            error={"type": "WorkerCrashed", "message": one_line(message), "path": path,
                                   "exit_code": 2})


def _raised(path: str, command: str, finished: executors.Finished, exc: BaseException) -> tasks.TaskResult:
    if isinstance(exc, CkptMigrateError):
        return tasks.TaskResult(path, command, "failed", attempt=finished.attempt, error=tasks.error_data(exc))
    message = f"{path}: the task raised {type(exc).__name__}: {one_line(exc)}"
    return tasks.TaskResult(path, command, "failed", attempt=finished.attempt, host="", pid=0,
                            error={"type": type(exc).__name__, "message": message, "path": path, "exit_code": 2})


def run(command: str, paths: Sequence[str | os.PathLike[str]], options: dict[str, Any], *, executor: str = "local",
        jobs: int | None = None, retries: int = 2, journal: str | os.PathLike[str] | None = None,
        target: str = "", chain: str | None = None,
        progress: Callable[[tasks.TaskResult], None] | None = None) -> Iterator[tasks.TaskResult]:
    """``command`` over ``paths`` (options as :func:`ckptmigrate.fleet.tasks.run` takes them); yields
    each file's result in the order of ``paths``. A skipped file's result is its journal record
    (``result`` ``skipped``). ``progress`` is called as each result arrives, in any order. Off
    this machine's processes, paths are sent (and reported) absolute."""
    names = [os.fspath(p) for p in paths]
    if executor != "local":  # a Ray worker runs in a directory of its own, on a machine of its own
        names = [path_key(name) for name in names]
        options = {k: path_key(v) if k in PATH_OPTIONS and isinstance(v, str) else v for k, v in options.items()}
    log = Journal(journal) if journal is not None else None
    try:
        ready: dict[int, tasks.TaskResult] = {}
        todo: list[str] = []
        index: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            record = log.skips(name, command, target, chain) if log is not None else None
            if record is not None:
                ready[i] = tasks.TaskResult(name, command, "skipped", before=record.get("after"),
                                            after=record.get("after"), attempt=0, host="", pid=0)
                if progress is not None:
                    progress(ready[i])
            else:
                index.setdefault(name, []).append(i)
                todo.append(name)
        nxt = 0
        while nxt in ready:
            yield ready.pop(nxt)
            nxt += 1
        if not todo:
            return
        task = functools.partial(tasks.run, command, options)
        with executors.make(executor, jobs, len(todo)) as ex:
            for finished in executors.run(ex, task, todo, retries):
                result = _result(command, finished)
                if log is not None:
                    log.record(path=path_key(result.path), command=command, target=target, chain=chain,
                               result=result.result, before=result.before, after=result.after,
                               error=result.error, attempt=result.attempt, retried=finished.crashes,
                               host=result.host, pid=result.pid, executor=ex.name,
                               seconds=round(result.seconds, 3))
                if progress is not None:
                    progress(result)
                ready[index[finished.path].pop(0)] = result
                while nxt in ready:
                    yield ready.pop(nxt)
                    nxt += 1
    finally:
        if log is not None:
            log.close()


def _result(command: str, finished: executors.Finished) -> tasks.TaskResult:
    if finished.crash is not None:
        return _crashed(finished.path, command, finished)
    value = finished.value
    if isinstance(value, BaseException):
        return _raised(finished.path, command, finished, value)
    assert isinstance(value, tasks.TaskResult)
    return value

