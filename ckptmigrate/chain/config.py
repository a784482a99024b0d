"""``[tool.ckptmigrate]`` in the nearest ``pyproject.toml`` of the user's own project: where the
migrations and the model are (what "own" means: :mod:`ckptmigrate.chain.trust`)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptmigrate.chain import trust
from ckptmigrate.errors import BadInput


@dataclass(frozen=True)
class Config:
    root: Path | None
    migrations: str | None
    model: str | None
    #: A small instance of the same architecture for recorded fixtures (default: ``model``).
    fixture_model: str | None = None
    #: ``pkg.module:fn`` returning the inputs a fixture runs through the model.
    example_inputs: str | None = None
    #: Every state dict a migration follows (locations, the main one included); None: searched.
    state_dicts: tuple[str, ...] | None = None
    #: Modules that register the project's own ops (``@ckptmigrate.op``), imported with the chain.
    ops: tuple[str, ...] = ()
    #: why the scripts and model it names may not be imported without being named explicitly
    problem: str | None = None

    def require_trusted(self, what: str = "migration scripts") -> None:
        """Raise :class:`~ckptmigrate.chain.trust.UntrustedScripts` when the pyproject.toml is not the user's."""
        if self.problem is not None:
            scripts = what == "migration scripts"
            error = trust.UntrustedScripts(
                f"{self.problem}; ckptmigrate imports no {what} through it — name "
                + ("the script directory (migrations=)" if scripts else "the model") + " if you trust it",
                path=self.pyproject,
            )
            error.cli_hint = "pass --migrations DIR" if scripts else "pass --model PKG.MODULE:FACTORY"
            raise error

    @property
    def pyproject(self) -> Path | None:
        return None if self.root is None else self.root / "pyproject.toml"


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` within the project boundary (:func:`trust.project_dirs`);
    another user's in a shared directory is not looked at."""
    for directory in trust.project_dirs(start or Path.cwd()):
        candidate = directory / "pyproject.toml"
        if candidate.is_file() and not trust.foreign(candidate):
            return candidate
    return None


def load(start: Path | None = None) -> Config:
    pyproject = find_pyproject(start)
    if pyproject is None:
        return Config(None, None, None)
    try:
        data: dict[str, Any] = tomllib.loads(pyproject.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{pyproject}: not valid TOML ({exc})") from exc
    tool = data.get("tool", {})
    section = tool.get("ckptmigrate", {}) if isinstance(tool, dict) else {}
    if not isinstance(section, dict):
        raise BadInput(f"{pyproject}: [tool.ckptmigrate] is not a table")
    for name in ("migrations", "model", "fixture_model", "example_inputs"):
        value = section.get(name)
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise BadInput(f"{pyproject}: [tool.ckptmigrate] {name} must be a non-empty string, not {value!r}"[:300])
    state_dicts = section.get("state_dicts")
    if state_dicts is not None and (
        not isinstance(state_dicts, list) or not all(isinstance(x, str) for x in state_dicts)
    ):
        raise BadInput(f"{pyproject}: [tool.ckptmigrate] state_dicts must be a list of locations (strings)")
    ops = section.get("ops", [])
    ops = [ops] if isinstance(ops, str) else ops
    if not isinstance(ops, list) or not all(isinstance(m, str) and re.fullmatch(r"[A-Za-z_][\w.]*", m) for m in ops):
        raise BadInput(f"{pyproject}: [tool.ckptmigrate] ops must be a module name or a list of them "
                       "(\"mypkg.ckpt_ops\")")
    return Config(pyproject.parent, section.get("migrations"), section.get("model"),
                  section.get("fixture_model"), section.get("example_inputs"),
                  state_dicts=tuple(state_dicts) if state_dicts is not None else None,
                  ops=tuple(ops), problem=trust.pyproject_problem(pyproject))


def record_migrations(pyproject: Path, location: str) -> None:
    """Add or update ``migrations = ...`` under ``[tool.ckptmigrate]``, keeping the rest of the file."""
    text = pyproject.read_text() if pyproject.exists() else ""
    line = f'migrations = "{location}"'
    lines = text.splitlines()
    if "[tool.ckptmigrate]" in lines:
        start = lines.index("[tool.ckptmigrate]") + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
        for i in range(start, end):
            if lines[i].split("=")[0].strip() == "migrations":
                lines[i] = line
                break
        else:
            lines.insert(start, line)
        text = "\n".join(lines) + "\n"
    else:
        text = text + ("\n" if text and not text.endswith("\n\n") else "") + f"[tool.ckptmigrate]\n{line}\n"
    pyproject.write_text(text)
