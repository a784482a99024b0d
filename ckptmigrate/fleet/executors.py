"""Where a fleet's tasks run: in this process, in local worker processes, or on a Ray cluster.

An :class:`Executor` starts a task and reports the next one to finish, with its return value or a
:class:`Crash` (the worker died, the node went away). :func:`run` drives any executor over a list of
paths with bounded retries: a crashed task is started again, up to ``retries`` more times; a task
that *returned* (a success, or a file's own error) is never re-run. Only the driver sees results,
so only the driver writes the journal.

Local processes come from a ``forkserver`` (a clean parent that imported the tasks once, never the
driver's threads); a dead worker breaks the whole pool, so every task in flight then counts an
attempt and the pool is made anew. On Ray, each task is a ``ray.remote`` function with Ray's own
retries off (``max_retries=0``) so that the attempt is counted here and journalled; an exception
the task raised (``RayTaskError``) is a result, any other ``RayError`` a crash.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptmigrate.errors import BadInput, one_line

Task = Callable[[str, int], Any]
#: How many times a ``ray://`` address is joined before the fleet gives up.
RAY_CLIENT_JOINS = 3
#: Where the driver's object stores are and how their clients are set, sent to Ray workers (their
#: ``runtime_env``) so that a fleet of ``s3://``, ``gs://`` or ``hf://`` objects reaches the same
#: endpoint from every node. Never credentials: a node has its own (a role, its ``~/.aws``, its
#: environment), and a secret in a runtime_env is stored by the cluster.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "CKPTMIGRATE_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "CKPTMIGRATE_S3_PART_SIZE",
                 "STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "CKPTMIGRATE_GCS_CHUNK_SIZE",
                 "HF_ENDPOINT", "CKPTMIGRATE_AZ_BLOCK_SIZE")


@dataclass
class Crash:
    """A task that did not return: why (the worker died, a system error)."""

    reason: str


@dataclass
class Finished:
    """One path's end: what its last attempt returned (``value``) or, after the last retry, ``crash``;
    ``crashes`` are the reasons earlier attempts did not return."""

    path: str
    attempt: int
    value: Any = None
    crash: str | None = None
    crashes: list[str] = field(default_factory=list)


class Executor(ABC):
    """Runs tasks; ``slots`` of them at once."""

    slots: int = 1
    name: str = ""

    @abstractmethod
    def start(self, task: Task, path: str, attempt: int) -> Any:
        """Start ``task(path, attempt)``; return a handle."""

    @abstractmethod
    def next_done(self) -> tuple[Any, Any]:
        """Block until a started task ends: (its handle, its value or a :class:`Crash`)."""

    def close(self) -> None:  # noqa: B027 - most executors hold nothing
        """Release workers and connections."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Inline(Executor):
    """Each task in this process, one after another (``-j 1``, or a single file)."""

    name = "local"

    def __init__(self) -> None:
        self._done: deque[tuple[Any, Any]] = deque()

    def start(self, task: Task, path: str, attempt: int) -> Any:
        handle = object()
        self._done.append((handle, task(path, attempt)))
        return handle

    def next_done(self) -> tuple[Any, Any]:
        return self._done.popleft()


class LocalProcesses(Executor):
    """``jobs`` worker processes on this machine."""

    name = "local"

    def __init__(self, jobs: int) -> None:
        self.slots = jobs
        self._pool: Any = None
        self._running: dict[Any, Any] = {}  # future -> the pool it runs in

    def _ensure_pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["ckptmigrate.fleet.tasks"])
            self._pool = ProcessPoolExecutor(max_workers=self.slots, mp_context=context)
        return self._pool

    def start(self, task: Task, path: str, attempt: int) -> Any:
        from concurrent.futures.process import BrokenProcessPool

        try:
            future = self._ensure_pool().submit(task, path, attempt)
        except BrokenProcessPool:  # broken since the last result; its tasks in flight report it still
            self._drop(self._pool)
            future = self._ensure_pool().submit(task, path, attempt)
        self._running[future] = self._pool
        return future

    def _drop(self, pool: Any) -> None:
        """Let a broken pool go (once); the next start makes a new one."""
        if pool is self._pool:
            pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def next_done(self) -> tuple[Any, Any]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        done, _ = wait(self._running, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        pool = self._running.pop(future)
        try:
            return future, future.result()
        except BrokenProcessPool as exc:  # the rest in flight in that pool report the same
            self._drop(pool)
            return future, Crash(f"a worker process died ({exc})")
        except Exception as exc:  # the task raised: a result (a bug), not a crash
            return future, exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class Ray(Executor):
    """Tasks on a Ray cluster: ``address`` ``None`` is ``ray.init()`` (RAY_ADDRESS, a running local
    cluster, or a new one), ``ray://HOST:PORT`` a cluster through Ray Client."""

    def __init__(self, address: str | None, jobs: int | None) -> None:
        ray = import_ray()
        import logging

        self.name = address or "ray"
        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            self._join(address, logging.ERROR)
        self.slots = jobs or max(1, int(ray.cluster_resources().get("CPU", 1)))
        env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
        options: dict[str, Any] = {"max_retries": 0, "num_cpus": 1}
        if env:
            options["runtime_env"] = {"env_vars": env}
        self._remote = ray.remote(**options)(_call)
        self._running: list[Any] = []

    def _join(self, address: str | None, level: int) -> None:
        """``ray.init``; through Ray Client, tried up to :data:`RAY_CLIENT_JOINS` times: the head
        starts a server process per client, and one that dies on start-up (a port still held, a
        slow GCS on a busy head) fails only that connection, not the next."""
        ray = self._ray
        joins = RAY_CLIENT_JOINS if address and address.startswith("ray://") else 1
        for join in range(1, joins + 1):
            try:
                ray.init(address=address, log_to_driver=False, logging_level=level,
                         include_dashboard=False if address is None else None)
                return
            except ConnectionError as exc:
                if join < joins:
                    if ray.is_initialized():
                        ray.shutdown()
                    time.sleep(join)
                    continue
                failure: Exception = exc
            except (RuntimeError, ValueError) as exc:
                failure = exc
            where = address or os.environ.get("RAY_ADDRESS") or "ray.init()"
            tries = f" after {join} tries" if join > 1 else ""
            raise BadInput(f"{where}: cannot join the Ray cluster{tries} ({one_line(failure)})") from None

    def start(self, task: Task, path: str, attempt: int) -> Any:
        ref = self._remote.remote(task, path, attempt)
        self._running.append(ref)
        return ref

    def next_done(self) -> tuple[Any, Any]:
        ray = self._ray
        done, self._running = ray.wait(self._running, num_returns=1)
        ref = done[0]
        try:
            return ref, ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task itself raised: a result, not a crash
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            return ref, cause
        except ray.exceptions.RayError as exc:
            return ref, Crash(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))

    def close(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()


def _call(task: Task, path: str, attempt: int) -> Any:
    """The function Ray runs: the task is an argument, so one remote function serves every command."""
    return task(path, attempt)


def import_ray() -> Any:
    """``ray``, or one line naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise BadInput("--executor ray needs Ray: pip install 'ckptmigrate[ray]'") from None
    return ray


def make(spec: str, jobs: int | None, paths: int) -> Executor:
    """The executor ``--executor SPEC -j JOBS`` names for ``paths`` files: ``local`` (processes,
    in this process for one job or one file), ``ray`` or ``ray://HOST:PORT``."""
    if spec == "local":
        jobs = jobs or os.cpu_count() or 1
        return Inline() if jobs == 1 or paths <= 1 else LocalProcesses(min(jobs, paths))
    if spec == "ray":
        return Ray(None, jobs)
    if spec.startswith("ray://"):
        return Ray(spec, jobs)
    raise BadInput(f"--executor {spec}: not an executor (local, ray, or ray://HOST:PORT)")


def run(executor: Executor, task: Task, paths: Sequence[str], retries: int) -> Iterator[Finished]:
    """Every path through ``task`` on ``executor``, at most ``executor.slots`` at once, as they end
    (in no particular order); a crashed task is started again up to ``retries`` times."""
    waiting = deque(paths)
    attempts: dict[Any, tuple[str, int]] = {}
    crashes: dict[str, list[str]] = {}
    while waiting or attempts:
        while waiting and len(attempts) < executor.slots:
            path = waiting.popleft()
            attempt = len(crashes.get(path, ())) + 1
            attempts[executor.start(task, path, attempt)] = (path, attempt)
        handle, value = executor.next_done()
        path, attempt = attempts.pop(handle)
        if isinstance(value, Crash):
            crashes.setdefault(path, []).append(value.reason)
            if attempt <= retries:
                waiting.appendleft(path)
                continue
            yield Finished(path, attempt, crash=value.reason, crashes=crashes.pop(path)[:-1])
            continue
        yield Finished(path, attempt, value=value, crashes=crashes.pop(path, []))
