"""The ``ckptmigrate`` command: thin click commands over :mod:`ckptmigrate.api`.

Bad input exits 2 with one line naming the file and the problem, and so does a file the system
would not let it read or write (no space left on device, no permission); a failed check exits 1;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ckptmigrate.cli import chain, checkpoints, fixture, migrate, release, schema
from ckptmigrate.errors import CheckFailed, CkptMigrateError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns ckptmigrate's errors into one line and an exit code, unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CkptMigrateError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"ckptmigrate: error: {exc}", err=True)
            ctx.exit(1 if isinstance(exc, CheckFailed) else 2)
        except OSError as exc:  # the system refused (a full disk, a permission): as bad input, one line
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f"{exc.filename}: " if exc.filename is not None else ""
            click.echo(f"ckptmigrate: error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(None, "--version", "-V", package_name="ckptmigrate", prog_name="ckptmigrate")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Alembic for PyTorch checkpoints: stamp, inspect, upgrade and downgrade them."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


for _command in (
    checkpoints.inspect, checkpoints.current, checkpoints.stamp, checkpoints.compact,
    chain.init, chain.revision, chain.heads, chain.history,
    migrate.upgrade, migrate.downgrade,
    schema.check, schema.diff, release.keygen, release.verify,
    fixture.test, fixture.fixture,
):
    click.version_option(None, "--version", "-V", package_name="ckptmigrate", prog_name="ckptmigrate")(_command)
    main.add_command(_command)

if __name__ == "__main__":
    sys.exit(main())
