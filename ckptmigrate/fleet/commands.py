"""A fleet as a Python function: :func:`run_fleet` is what ``ckptmigrate upgrade|downgrade|stamp|verify
PATHS... --executor ... -j ... --retries ... --journal ...`` does, and the CLI only prints what
:func:`fleet_results` yields.

The checks a batch makes once, in the driver, before any file (the chain loads and is trusted, a
revision exists, a signing key loads, a release's tree is clean) happen here, so a broken input is
one error rather than one per file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ckptmigrate.errors import BadInput
from ckptmigrate.fleet import batch
from ckptmigrate.fleet.tasks import TaskResult
from ckptmigrate.util.urls import is_remote

COMMANDS = ("upgrade", "downgrade", "stamp", "verify")

PathLike = str | os.PathLike[str]


def run_fleet(
    command: str, paths: PathLike | Sequence[PathLike], *, executor: str = "local", jobs: int | None = None,
    retries: int = 2, journal: PathLike | None = None, migrations: str | None = None,
    progress: Callable[[TaskResult], None] | None = None, **options: Any,
) -> list[TaskResult]:
    """Run ``command`` (``upgrade``, ``downgrade``, ``stamp`` or ``verify``) on every checkpoint
    ``paths`` name (files, directories, globs, URLs), one task per file on ``executor`` (``local``
    processes, ``ray``, ``ray://HOST:PORT``), ``jobs`` at once; a task whose worker died is re-run
    up to ``retries`` times; ``journal`` (a JSONL file) records each result and lets a re-run skip
    what it proves done. ``options`` are the keywords of :func:`ckptmigrate.api.upgrade` (``to``,
    ``backup``, ``dry_run``, ``from_rev``, ...), :func:`~ckptmigrate.api.stamp` (``tags``,
    ``revision``, ``digest``, ``sign`` as a key file, ...) or :func:`~ckptmigrate.api.verify`
    (``public_key`` as a key file, ``key``).

    Returns one :class:`~ckptmigrate.fleet.tasks.TaskResult` per file, in the order the files were
    named: ``result`` (``written``, ``unchanged``, ``stamped``, ``ok``, ``failed``, or ``skipped``
    by the journal), revisions ``before``/``after``, ``error`` (as ``--json`` gives it), ``attempt``,
    ``host``, ``pid``, ``seconds``, and ``detail`` (upgrade: its ``--json`` row; stamp: the output;
    verify: the :class:`~ckptmigrate.release.integrity.VerifyResult`). A file's failure is its result,
    never raised; what is wrong before any file runs (no such chain, a bad key) raises."""
    return list(fleet_results(command, paths, executor=executor, jobs=jobs, retries=retries, journal=journal,
                              migrations=migrations, progress=progress, **options))


def fleet_results(
    command: str, paths: PathLike | Sequence[PathLike], *, executor: str = "local", jobs: int | None = None,
    retries: int = 2, journal: PathLike | None = None, migrations: str | None = None,
    progress: Callable[[TaskResult], None] | None = None, **options: Any,
) -> Iterator[TaskResult]:
    """:func:`run_fleet`, each file's result yielded as soon as it and those named before it are done
    (the CLI prints from this); ``progress`` is called as each result arrives, in any order."""
    from ckptmigrate import api

    if command not in COMMANDS:
        raise BadInput(f"{command}: a fleet runs {', '.join(COMMANDS)}")
    files = api.checkpoint_files(paths)
    if options.get("output") is not None and len(files) != 1:
        raise BadInput("-o/--output takes exactly one input file")
    prepare = {"upgrade": _migration, "downgrade": _migration, "stamp": _stamp, "verify": _verify}[command]
    task_options, target, chain = prepare(migrations, dict(options))
    yield from batch.run(command, files, task_options, executor=executor, jobs=jobs, retries=retries,
                         journal=journal, target=target, chain=chain, progress=progress)


def _migration(migrations: str | None, options: dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
    from ckptmigrate import api
    from ckptmigrate.chain import config

    source = api.chain_source(migrations)  # once, in the driver: a broken chain is one error, not one per file
    options.setdefault("to", "head")
    if not options.get("state_dicts"):
        options["state_dicts"] = config.load().state_dicts
    _portable_output(options)
    options["migrations"] = batch.portable_migrations(migrations)
    chain = None if options.get("dry_run") else batch.chain_key(source)
    return options, str(options["to"]), chain


def _stamp(migrations: str | None, options: dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
    from ckptmigrate import api
    from ckptmigrate.release import signing

    revision = options.get("revision")
    if revision is not None:  # once, before any file: an unknown revision is one error, not one per file
        options["revision"] = revision = api.revision_graph(migrations).get(revision).id
        options["migrations"] = batch.portable_migrations(migrations)
    if options.get("release") is not None and not options.get("allow_dirty"):
        from ckptmigrate.release.stamping import require_clean

        require_clean(options.get("repo"))  # once: stamping tracked files dirties the tree as it goes
    options["allow_dirty"] = True
    sign = options.get("sign")
    if sign is not None:
        signing.load_private_key(sign)  # once, before any file: a bad key is one error
        options["sign"] = os.path.abspath(sign)
    options["repo"] = os.path.abspath(options.get("repo") or os.getcwd())
    _portable_output(options)
    return options, revision or "", None


def _verify(_migrations: str | None, options: dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
    from ckptmigrate.release import signing

    public_key = options.get("public_key")
    if public_key is not None:
        signing.load_public_key(public_key)  # once, before any file: a bad key is one error
        options["public_key"] = os.fspath(public_key) if is_remote(public_key) else os.path.abspath(public_key)
    return options, "", None


def _portable_output(options: dict[str, Any]) -> None:
    """``output`` as a string a worker process can take (a URL as shown, a local path as given)."""
    if options.get("output") is not None:
        options["output"] = os.fspath(options["output"])
