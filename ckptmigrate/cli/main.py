"""The ``ckptmigrate`` command: thin click commands over :mod:`ckptmigrate.api`.

Every failure is one line on stderr, ``ckptmigrate: error: ...`` — ckptmigrate's own errors, a
file the system would not let it read or write (no space left on device, no permission), and
click's usage errors alike — with exit code 2 for bad input and 1 for a failed check. With
``--json`` the same failure is a JSON object on stdout, ``{"error": {"type", "message", "path",
"exit_code", ...}}`` (the fields of :mod:`ckptmigrate.errors`), with the same exit code. ``--debug``
(before or after the subcommand) shows the traceback instead. A reader that goes away (``| head``)
ends the output quietly, with exit code 0.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from ckptmigrate.cli import chain, checkpoints, convert, fixture, graph, leftovers, migrate, release, sanitize, schema
from ckptmigrate.cli.common import debug_mode, error_dict, error_line, json_mode
from ckptmigrate.errors import CkptMigrateError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
PREFIX = "ckptmigrate: error: "


def _reader_gone() -> NoReturn:
    """stdout's reader closed the pipe (``| head``): stop writing, quietly, as a filter should."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(0)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Warnings (a note from ckptmigrate, a torch deprecation) as one line in the error style."""
    click.echo(f"ckptmigrate: warning: {message}", err=True)


class _Group(click.Group):
    """Turns every error into one line (or a JSON object) and an exit code, unless --debug."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        warnings.showwarning = _show_warning
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except click.ClickException as exc:  # a usage error: same prefix and exit code as ours
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                click.echo(ctx.get_usage(), err=True)
                click.echo(f"Try '{ctx.command_path} --help' for help.", err=True)
            click.echo(PREFIX + exc.format_message(), err=True)
            code = exc.exit_code
        except click.Abort:
            click.echo(PREFIX + "aborted", err=True)
            code = 1
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _reader_gone()
        if not standalone_mode:
            return code
        sys.exit(code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CkptMigrateError as exc:
            self._fail(ctx, exc, exc.exit_code, error_line(exc), error_dict(exc))
        except OSError as exc:  # the system refused (a full disk, a permission): as bad input, one line
            if exc.errno == errno.EPIPE:
                _reader_gone()
            where = f"{exc.filename}: " if exc.filename is not None else ""
            line = f"{where}{exc.strerror or exc}"
            self._fail(ctx, exc, 2, line, {"type": type(exc).__name__, "message": line, "exit_code": 2,
                                          "path": None if exc.filename is None else str(exc.filename)})

    @staticmethod
    def _fail(ctx: click.Context, exc: Exception, code: int, line: str, data: dict[str, Any]) -> NoReturn:
        obj = ctx.obj if isinstance(ctx.obj, dict) else {}
        if obj.get("debug"):
            raise exc
        if obj.get("json"):
            click.echo(json.dumps({"error": data}, indent=2, default=str))
        click.echo(PREFIX + line, err=True)
        ctx.exit(code)


_DEBUG_HELP = "Show tracebacks instead of one-line errors."


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(None, "--version", "-V", package_name="ckptmigrate", prog_name="ckptmigrate")
@click.option("--debug", is_flag=True, help=_DEBUG_HELP)
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Alembic for PyTorch checkpoints: stamp, inspect, upgrade and downgrade them."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _everywhere(command: click.Command) -> None:
    """--version and --debug on a (sub)command, as on the group."""
    click.version_option(None, "--version", "-V", package_name="ckptmigrate", prog_name="ckptmigrate")(command)
    click.option("--debug", is_flag=True, expose_value=False, callback=debug_mode, help=_DEBUG_HELP)(command)
    for param in command.params:  # every --json reports a failure as JSON, whichever module declared it
        if param.name == "as_json" and param.callback is None:
            param.callback = json_mode
    for sub in getattr(command, "commands", {}).values():
        _everywhere(sub)


for _command in (
    checkpoints.inspect, checkpoints.current, checkpoints.stamp, checkpoints.compact, convert.convert,
    chain.init, chain.revision, chain.heads, chain.history, graph.merge, graph.chains, graph.squash,
    migrate.upgrade, migrate.downgrade, sanitize.sanitize,
    schema.check, schema.diff, schema.schema, release.keygen, release.verify,
    fixture.test, fixture.fixture, leftovers.leftovers,
):
    _everywhere(_command)
    main.add_command(_command)

if __name__ == "__main__":
    sys.exit(main())
