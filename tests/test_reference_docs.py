"""A user reading docs/cli.md and docs/api.md reads what the code does: both pages are generated,
and a page that differs from the code, or a public name with no docstring, fails here."""

from __future__ import annotations

import runpy
from pathlib import Path

from ckptmigrate.cli import reference

DOCS = Path(__file__).resolve().parent.parent / "docs"
API = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "api_reference.py"))


def test_the_cli_reference_is_current() -> None:
    assert (DOCS / "cli.md").read_text() == reference.render(), (
        "docs/cli.md is stale: python -m ckptmigrate.cli.reference > docs/cli.md")


def test_every_command_and_option_is_in_the_cli_reference() -> None:
    page = reference.render()
    ctx = reference.click.Context(reference.main, info_name="ckptmigrate")
    for name in reference.main.list_commands(ctx):
        command = reference.main.get_command(ctx, name)
        assert command is not None and f"## `ckptmigrate {name}`" in page
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt not in ("--help", "--version"):
                    assert f"`{opt}`" in page, (name, opt)


def test_every_public_name_is_documented() -> None:
    undocumented = [name for name, obj in API["public_objects"]() if not API["docstring"](obj)]
    assert not undocumented, undocumented


def test_the_api_reference_is_current() -> None:
    assert (DOCS / "api.md").read_text() == API["render"](), (
        "docs/api.md is stale: python scripts/api_reference.py > docs/api.md")
