"""What the command modules share: error wording (one line, or a JSON object with ``--json``), tags,
JSON output, common options, the batch options and how a batch runs."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from ckptmigrate.errors import CkptMigrateError, one_line
from ckptmigrate.util.urls import as_location


def error_line(exc: CkptMigrateError) -> str:
    """The error as the CLI words it: the library's message, and what a command-line user can do."""
    return str(exc) + (f"; {exc.cli_hint}" if exc.cli_hint else "")


def error_dict(exc: CkptMigrateError) -> dict[str, Any]:
    """The error as ``--json`` reports it: its fields, with the CLI's wording as the message."""
    return {**exc.to_dict(), "message": one_line(error_line(exc))}


def json_mode(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    """``--json`` callback: remember it, so a failure is reported as ``{"error": {...}}`` on stdout."""
    if value and isinstance(ctx.obj, dict):
        ctx.obj["json"] = True
    return value


def debug_mode(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--debug`` callback, after the subcommand as well as before it: tracebacks instead of one line."""
    if value and isinstance(ctx.obj, dict):
        ctx.obj["debug"] = True


JSON = click.option("--json", "as_json", is_flag=True, callback=json_mode, help="Print JSON.")


@contextlib.contextmanager
def naming(path: object) -> Iterator[None]:
    """Turn an OSError while handling ``path`` (no space left, no permission) into one line naming it."""
    try:
        yield
    except CkptMigrateError as exc:
        exc.path = exc.path or str(path)
        raise
    except OSError as exc:
        other = f" ({exc.filename})" if exc.filename is not None and str(exc.filename) != str(path) else ""
        raise CkptMigrateError(f"{path}: {exc.strerror or exc}{other}", path=str(path)) from exc


def parse_tags(values: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--tag")
        tags[key] = value
    return tags


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


class Location(click.ParamType):
    """A PATH argument that may be a URL: a local ``Path``, or an ``ObjectURL`` (``pathlib`` would fold
    ``s3://b/k`` into ``s3:/b/k``)."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return as_location(value) if isinstance(value, str) else value


LOCATION = Location()


MIGRATIONS = click.option(
    "--migrations", "migrations", default=None, metavar="DIR_OR_MODULE",
    help="Script directory or importable package (default: [tool.ckptmigrate] in pyproject.toml).",
)


class files_bar:
    """A bar of files over ``items`` on stderr when ``show`` (a batch on a terminal)."""

    def __init__(self, items: Iterable[Any], show: bool, desc: str, total: int | None = None) -> None:
        self.items, self.show, self.desc, self.total = items, show, desc, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.show:
            return self.items
        from tqdm import tqdm

        self.bar = tqdm(self.items, desc=self.desc, unit="file", total=self.total, file=sys.stderr)
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


_FLEET = [
    click.option("--executor", default="local", show_default=True, metavar="EXECUTOR",
                 help="Where each file's task runs: `local` processes, `ray` (RAY_ADDRESS, a running local "
                      "cluster or a new one), or `ray://HOST:PORT` (a Ray cluster through Ray Client)."),
    click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
                 help="Files at once (default: the number of CPUs; on Ray, the cluster's CPUs)."),
    click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
                 help="Re-runs of a file whose worker died; a file's own error is never retried."),
    click.option("--journal", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
                 help="JSONL journal of results, one fsynced line per file; a re-run skips the files it records "
                      "done once the file's envelope agrees."),
]


def fleet_options(fn: Any) -> Any:
    """``--executor``, ``-j``, ``--retries`` and ``--journal``, the same on every batch command."""
    for decorator in reversed(_FLEET):
        fn = decorator(fn)
    return fn


def fleet_run(command: str, files: Sequence[Path], options: dict[str, Any], *, fleet: dict[str, Any], show: bool,
              migrations: str | None = None) -> Iterator[Any]:
    """The files' results in order (:func:`ckptmigrate.fleet.commands.fleet_results`), a bar of files on
    stderr when ``show`` and there are several; one file's error is raised as the single-file command's."""
    from ckptmigrate.fleet.commands import fleet_results

    bar = None
    if show and len(files) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc=command, unit="file", file=sys.stderr)
    try:
        for result in fleet_results(command, files, migrations=migrations,
                                    progress=(lambda _r: bar.update(1)) if bar is not None else None,
                                    **fleet, **options):
            if result.error is not None and len(files) == 1 and command != "verify":
                raise result.exception or _RemoteError.of(result.error)
            yield result
    finally:
        if bar is not None:
            bar.close()


class _RemoteError(CkptMigrateError):
    """A file's error that happened in another process or machine, rebuilt from its data."""

    @classmethod
    def of(cls, data: dict[str, Any]) -> _RemoteError:
        exc = cls(str(data.get("message")), path=data.get("path"))
        exc.exit_code = int(data.get("exit_code") or 2)
        exc.data = dict(data)
        return exc

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)
