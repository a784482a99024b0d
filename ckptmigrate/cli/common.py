"""What the command modules share: error wording (one line, or a JSON object with ``--json``), tags,
JSON output, common options."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import click

from ckptmigrate.errors import CkptMigrateError, one_line


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
