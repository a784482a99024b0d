"""The CLI reference as Markdown, generated from the click commands so it cannot go stale.

``python -m ckptmigrate.cli.reference > docs/cli.md`` writes it; a test fails when the committed
page differs from what the commands say.
"""

from __future__ import annotations

import click

from ckptmigrate.cli.main import main

EXIT_CODES = """\
| exit code | meaning |
| --- | --- |
| 0 | success (for `check` and `verify`: the check passed) |
| 1 | a check failed: `check` found a difference, `verify` a bad digest or signature |
| 2 | bad input: a file that is not a checkpoint, an unknown revision, a failed migration, a wrong \
flag; one line on stderr naming the file and the problem (`--debug` shows the traceback) |
"""


def _param_line(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return f"| `{param.human_readable_name}` | argument{' (repeatable)' if param.nargs == -1 else ''} | |"
    assert isinstance(param, click.Option)
    names = ", ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
    kind = "flag" if param.is_flag else (param.metavar or param.type.name.upper())
    if param.multiple:
        kind += ", repeatable"
    default = ""
    if param.show_default and param.default is not None and not param.is_flag:
        default = f" (default: `{param.default}`)"
    return f"| {names} | {kind} | {(param.help or '').replace('|', '/')}{default} |"


def render() -> str:
    ctx = click.Context(main, info_name="ckptmigrate")
    lines = ["# ckptmigrate command reference", "",
             "Generated from the commands (`python -m ckptmigrate.cli.reference > docs/cli.md`); "
             "every command also takes `-h/--help`, `-V/--version` and `--debug`.", "",
             "## Exit codes", "", EXIT_CODES]
    for name in sorted(main.list_commands(ctx)):
        command = main.get_command(ctx, name)
        assert command is not None
        sub = click.Context(command, info_name=name, parent=ctx)
        usage = " ".join(command.collect_usage_pieces(sub))
        lines += [f"## `ckptmigrate {name}`", "", f"```\nckptmigrate {name} {usage}\n```", "",
                  (command.help or "").strip(), ""]
        params = [p for p in command.params if p.name not in ("help", "version", "debug")]
        if params:
            lines += ["| parameter | kind | meaning |", "| --- | --- | --- |", *map(_param_line, params), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    click.echo(render(), nl=False)
