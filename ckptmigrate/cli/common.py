"""What the command modules share: error wording for OS errors, tags, JSON output, common options."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import click

from ckptmigrate.errors import CkptMigrateError


@contextlib.contextmanager
def naming(path: object) -> Iterator[None]:
    """Turn an OSError while handling ``path`` (no space left, no permission) into one line naming it."""
    try:
        yield
    except OSError as exc:
        other = f" ({exc.filename})" if exc.filename is not None and str(exc.filename) != str(path) else ""
        raise CkptMigrateError(f"{path}: {exc.strerror or exc}{other}") from exc


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
