"""User story: "I keep my checkpoint migrations in a script directory, like Alembic's."

``ckptmigrate init`` creates the directory and records it in pyproject.toml, ``ckptmigrate revision``
writes each new script on top of the head (per lineage when one directory serves several model
families), ``heads`` and ``history`` show the graph, and the directory can also be named as an
importable package. A broken graph (unknown parent or dependency, cycle, duplicate id or branch
label, a merge across lineages, a script that does not import or has no ``upgrade``) is refused
with one line naming the files, exit code 2 and no traceback. Upgrades and downgrades take
relative targets: ``+1``, ``-1``, ``base``, ``head``.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate import formats

Cli = Callable[..., subprocess.CompletedProcess[str]]


def script(rev: str, down: str | tuple[str, ...] | None, *, body: str = "    pass\n", lineage: str | None = None,
           doc: str | None = None, head: str = "") -> str:
    """The text of a migration script."""
    lines = [f'"""{doc if doc is not None else f"Revision {rev}."}"""', head,
             f"revision = {rev!r}", f"down_revision = {down!r}"]
    if lineage is not None:
        lines.append(f"lineage = {lineage!r}")
    return "\n".join(lines) + "\n\n\ndef upgrade(ckpt):\n" + body


def write_scripts(versions: Path, scripts: dict[str, str]) -> Path:
    versions.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (versions / name).write_text(text)
    return versions.parent


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """A refused command: exit code 2, one line on stderr, nothing on stdout, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ckptmigrate: error: ")
    return lines[0]


@pytest.fixture
def project(tmp_path: Path, cli: Cli) -> Path:
    """A project with a pyproject.toml and an initialised script directory."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "mymodel"\nversion = "1.0"\n')
    cli("init", check=True)
    return tmp_path


# -- init and revision --------------------------------------------------------------------------


def test_init_creates_the_directory_and_records_it_in_pyproject(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "mymodel"\nversion = "1.0"\n\n[tool.ruff]\n'
                                             "line-length = 100\n")
    proc = cli("init", check=True)
    assert "created migrations/versions" in proc.stdout
    assert (tmp_path / "migrations" / "versions").is_dir()
    assert "def upgrade(ckpt):" in (tmp_path / "migrations" / "script.py.tmpl").read_text()
    config = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert config["tool"]["ckptmigrate"] == {"migrations": "migrations"}
    assert config["project"]["name"] == "mymodel" and config["tool"]["ruff"] == {"line-length": 100}
    assert "already a script directory" in one_line_error(cli("init"))


def test_init_in_a_subdirectory_records_the_path_from_the_pyproject(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.ckptmigrate]\nmodel = \"m:f\"\n")
    (tmp_path / "src").mkdir()
    cli("init", "ckpt_migrations", cwd=tmp_path / "src", check=True)
    config = tomllib.loads((tmp_path / "pyproject.toml").read_text())
    assert config["tool"]["ckptmigrate"] == {"migrations": "src/ckpt_migrations", "model": "m:f"}
    cli("revision", "-m", "first", "--rev-id", "a1", check=True)  # found from the project root
    assert (tmp_path / "src" / "ckpt_migrations" / "versions" / "a1_first.py").is_file()


def test_revision_chains_each_new_script_on_the_head(project: Path, cli: Cli) -> None:
    proc = cli("revision", "-m", "Initial layout", "--rev-id", "a1", check=True)
    first = project / "migrations" / "versions" / "a1_initial_layout.py"
    assert proc.stdout.strip() == f"created {first}"
    cli("revision", "-m", "Split fused qkv!", "--rev-id", "a2", check=True)
    second = project / "migrations" / "versions" / "a2_split_fused_qkv.py"
    text = second.read_text()
    assert "revision = 'a2'" in text and "down_revision = 'a1'" in text and "Revises: a1" in text
    assert "down_revision = None" in first.read_text() and "Revises: <base>" in first.read_text()
    assert cli("heads", check=True).stdout.strip() == "a2 (head) Split fused qkv!"

    history = cli("history", "--verbose", check=True).stdout.splitlines()
    assert history[0] == "a1 -> a2  Split fused qkv!"
    assert history[1].strip() == f"file: {second}"
    assert history[2].strip() == "downgrade: from recorded inverses; schema snapshot: no"
    assert history[3] == "<base> -> a1  Initial layout"
    rows = json.loads(cli("history", "--json", check=True).stdout)
    assert [(r["revision"], r["down_revision"], r["file"]) for r in rows] == [
        ("a2", "a1", str(second)), ("a1", None, str(first))]


def test_revision_uses_the_directorys_own_template(project: Path, cli: Cli) -> None:
    template = project / "migrations" / "script.py.tmpl"
    template.write_text('"""${message}"""\n# house style\nrevision = ${revision_repr}\n'
                        "down_revision = ${down_revision_repr}\n\n\ndef upgrade(ckpt):\n    ckpt.unwrap()\n")
    cli("revision", "-m", "Unwrap", "--rev-id", "b1", check=True)
    text = (project / "migrations" / "versions" / "b1_unwrap.py").read_text()
    assert "# house style" in text and "ckpt.unwrap()" in text
    rows = json.loads(cli("history", "--json", check=True).stdout)
    assert [(r["revision"], r["message"]) for r in rows] == [("b1", "Unwrap")]


def test_revision_ids_are_random_unless_given_and_never_taken_twice(project: Path, cli: Cli) -> None:
    cli("revision", "-m", "first", "--rev-id", "a1", check=True)
    cli("revision", "-m", "second", check=True)
    assert "revision 'a1' already exists" in one_line_error(cli("revision", "-m", "again", "--rev-id", "a1"))
    line = one_line_error(cli("revision", "-m", "again", "--rev-id", "a-1"))
    assert "revision id 'a-1' may hold only letters, digits and _" in line
    rows = json.loads(cli("history", "--json", check=True).stdout)
    assert len(rows) == 2 and rows[1]["revision"] == "a1" and rows[0]["down_revision"] == "a1"
    assert re.fullmatch(r"[0-9a-f]{12}", rows[0]["revision"])


def test_without_a_configured_directory_every_command_says_how_to_get_one(tmp_path: Path, cli: Cli) -> None:
    assert "run `ckptmigrate init`" in one_line_error(cli("heads"))


# -- a broken graph is refused --------------------------------------------------------------------


BROKEN: dict[str, tuple[dict[str, str], list[str]]] = {
    "unknown parent": (
        {"a.py": script("a", None), "b.py": script("b", "zz")},
        ["b.py: down_revision 'zz' is not a known revision"],
    ),
    "cycle": (
        {"base.py": script("base", None), "x.py": script("x", "y"), "y.py": script("y", "x")},
        ["revisions form a cycle", "x.py", "y.py"],
    ),
    "duplicate id": (
        {"one.py": script("same", None), "two.py": script("same", None)},
        ["revision 'same' is defined twice", "one.py", "two.py"],
    ),
    "merge across lineages": (
        {"a.py": script("a", None, lineage="vision"), "b.py": script("b", None, lineage="audio"),
         "m.py": script("m", ("a", "b"))},
        ["m.py: a merge joins revisions of one lineage", "a ('vision')", "b ('audio')", "use depends_on"],
    ),
    "branch label used twice": (
        {"a.py": script("a", None, head="branch_labels = ('enc',)"),
         "b.py": script("b", "a", head="branch_labels = 'enc'")},
        ["b.py: branch label 'enc' is already used by a (a.py)"],
    ),
    "unknown dependency": (
        {"a.py": script("a", None), "b.py": script("b", "a", head="depends_on = 'nowhere'")},
        ["b.py: depends_on 'nowhere' is neither a revision nor a branch label"],
    ),
    "dependency cycle": (
        {"a.py": script("a", None), "x.py": script("x", "a", head="depends_on = 'y'"),
         "y.py": script("y", "a", head="depends_on = 'x'")},
        ["revisions form a cycle", "x.py", "y.py"],
    ),
    "lineage differs from parent": (
        {"a.py": script("a", None, lineage="vision"), "b.py": script("b", "a", lineage="audio")},
        ["b.py: lineage 'audio' differs from its parent's 'vision'"],
    ),
    "syntax error": (
        {"a.py": script("a", None), "b.py": script("b", "a", body="    ckpt.rename('x', 'y'\n")},
        ["b.py:", "syntax error in migration script"],
    ),
    "missing upgrade": (
        {"a.py": script("a", None), "b.py": script("b", "a").replace("def upgrade(ckpt)", "def upgrad(ckpt)")},
        ["b.py: a migration script needs an `upgrade(ckpt)` function"],
    ),
    "missing revision": (
        {"a.py": script("a", None).replace("revision = 'a'", "rev = 'a'")},
        ["a.py: a migration script needs `revision = \"<id>\"`"],
    ),
    "missing down_revision": (
        {"a.py": script("a", None).replace("down_revision = None", "")},
        ["a.py: a migration script needs `down_revision` (None for the first)"],
    ),
    "raises on import": (
        {"a.py": script("a", None, head="import not_a_module_anywhere")},
        ["a.py: importing the migration script raised ModuleNotFoundError", "not_a_module_anywhere"],
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_graph_is_refused_in_one_line_naming_the_files(tmp_path: Path, cli: Cli, case: str) -> None:
    scripts, fragments = BROKEN[case]
    write_scripts(tmp_path / "migrations" / "versions", scripts)
    proc = cli("history", "--migrations", "migrations")
    line = one_line_error(proc)
    assert proc.stdout == ""
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_a_broken_graph_also_stops_an_upgrade_before_it_touches_the_file(tmp_path: Path, cli: Cli) -> None:
    write_scripts(tmp_path / "migrations" / "versions", BROKEN["cycle"][0])
    path = tmp_path / "model.pt"
    torch.save({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    assert "revisions form a cycle" in one_line_error(cli("upgrade", path, "--migrations", "migrations"))
    assert path.read_bytes() == before and not path.with_name("model.pt.bak").exists()


def test_a_script_with_a_blank_docstring_loads_with_an_empty_message(tmp_path: Path, cli: Cli) -> None:
    write_scripts(tmp_path / "migrations" / "versions", {"a.py": script("a", None, doc="\n   \n")})
    rows = json.loads(cli("history", "--json", "--migrations", "migrations", check=True).stdout)
    assert [(r["revision"], r["message"]) for r in rows] == [("a", "")]


def test_private_modules_in_the_versions_directory_are_not_scripts(tmp_path: Path, cli: Cli) -> None:
    versions = write_scripts(tmp_path / "migrations" / "versions", {"a.py": script("a", None)}) / "versions"
    (versions / "__init__.py").write_text("")
    (versions / "_helpers.py").write_text("def helper():\n    return 1\n")
    assert cli("heads", "--migrations", "migrations", check=True).stdout.strip() == "a (head) Revision a."


# -- lineages ------------------------------------------------------------------------------------


def test_two_lineages_in_one_directory(project: Path, cli: Cli) -> None:
    cli("revision", "-m", "vision base", "--rev-id", "v1", "--lineage", "vision", check=True)
    cli("revision", "-m", "audio base", "--rev-id", "au1", "--lineage", "audio", check=True)
    cli("revision", "-m", "vision two", "--rev-id", "v2", "--lineage", "vision", check=True)
    text = (project / "migrations" / "versions" / "v2_vision_two.py").read_text()
    assert "down_revision = 'v1'" in text and "lineage = 'vision'" in text
    assert "down_revision = None" in (project / "migrations" / "versions" / "au1_audio_base.py").read_text()

    heads = json.loads(cli("heads", "--json", check=True).stdout)
    assert sorted((h["lineage"], h["head"]) for h in heads) == [("audio", "au1"), ("vision", "v2")]
    assert sorted(cli("heads", check=True).stdout.splitlines()) == [
        "au1 (head, lineage audio) audio base", "v2 (head, lineage vision) vision two"]
    history = cli("history", check=True).stdout.splitlines()
    assert sorted(history) == sorted(["v1 -> v2 (vision)  vision two", "<base> -> v1 (vision)  vision base",
                                      "<base> -> au1 (audio)  audio base"])

    line = one_line_error(cli("revision", "-m", "which one?", "--rev-id", "x1"))
    assert "there is no default lineage (lineages: 'audio', 'vision'); pass --lineage" in line


def test_files_are_upgraded_within_their_own_lineage(tmp_path: Path, cli: Cli) -> None:
    write_scripts(tmp_path / "m" / "versions", {
        "v1.py": script("v1", None, lineage="vision"),
        "v2.py": script("v2", "v1", body="    ckpt.rename('w', 'vision_w')\n"),
        "a1.py": script("a1", None, lineage="audio"),
        "a2.py": script("a2", "a1", body="    ckpt.rename('w', 'audio_w')\n"),
    })
    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(3)}, path)
    cli("upgrade", path, "--from", "a1", "--migrations", "m", check=True)
    assert list(torch.load(path)) == ["audio_w"]
    assert cli("current", path).stdout.strip() == "a2"
    line = one_line_error(cli("upgrade", path, "--to", "v2", "--migrations", "m"))
    assert "revision v2 is in lineage 'vision', not 'audio'" in line


# -- the directory named as a package -----------------------------------------------------------


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """``mylib.ckpt_migrations``: a package, importable once ``src`` is on PYTHONPATH."""
    pkg = tmp_path / "src" / "mylib" / "ckpt_migrations"
    write_scripts(pkg / "versions", {"p1_first.py": script("p1", None, doc="First packaged revision.")})
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    return pkg


def test_migrations_named_as_an_importable_package(tmp_path: Path, cli: Cli, package: Path) -> None:
    env = {"PYTHONPATH": str(tmp_path / "src")}
    proc = cli("heads", "--migrations", "mylib.ckpt_migrations", env=env, check=True)
    assert proc.stdout.strip() == "p1 (head) First packaged revision."
    cli("revision", "-m", "second", "--rev-id", "p2", "--migrations", "mylib.ckpt_migrations", env=env, check=True)
    assert "down_revision = 'p1'" in (package / "versions" / "p2_second.py").read_text()
    # the same, configured in pyproject.toml
    (tmp_path / "pyproject.toml").write_text('[tool.ckptmigrate]\nmigrations = "mylib.ckpt_migrations"\n')
    rows = json.loads(cli("history", "--json", env=env, check=True).stdout)
    assert [r["revision"] for r in rows] == ["p2", "p1"]
    # not importable without it
    line = one_line_error(cli("heads", "--migrations", "mylib.ckpt_migrations", env={"PYTHONPATH": ""}))
    assert "migrations 'mylib.ckpt_migrations': neither a directory nor an importable package" in line


# -- relative targets ----------------------------------------------------------------------------


def test_relative_targets_walk_the_chain(tmp_path: Path, cli: Cli) -> None:
    write_scripts(tmp_path / "m" / "versions", {
        "r1.py": script("r1", None),
        "r2.py": script("r2", "r1", body="    ckpt.rename('a', 'b')\n"),
        "r3.py": script("r3", "r2", body="    ckpt.rename('b', 'c')\n"),
    })
    path = tmp_path / "model.pt"
    torch.save({"a": torch.arange(4)}, path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, path, "--no-backup", "--migrations", "m")

    def at() -> tuple[str | None, list[str]]:
        envelope = formats.read_envelope(path)[1] or {}
        return envelope.get("revision"), list(torch.load(path))

    assert run("upgrade", "--from", "base", "--to", "+1").returncode == 0
    assert at() == ("r1", ["a"])
    assert run("upgrade", "--to", "+2").returncode == 0
    assert at() == ("r3", ["c"])
    assert "+1 from r3 goes past the end of the chain (3 revisions)" in one_line_error(run("upgrade", "--to", "+1"))
    assert run("downgrade", "--to", "-1").returncode == 0
    assert at() == ("r2", ["b"])
    assert "use `ckptmigrate downgrade`" in one_line_error(run("upgrade", "--to", "-1"))
    assert run("upgrade", "--to", "head").returncode == 0
    assert at() == ("r3", ["c"])
    assert run("downgrade", "--to", "base").returncode == 0
    assert at() == (None, ["a"])
    assert torch.equal(torch.load(path)["a"], torch.arange(4))
    # at base the file is still stamped: it needs no --from to go up again
    assert "-1 from base goes past the end" in one_line_error(run("downgrade", "--to", "-1"))
    assert run("upgrade", "--to", "+2").returncode == 0
    assert at() == ("r2", ["b"])


def test_revision_prefixes_resolve_when_unique(tmp_path: Path, cli: Cli) -> None:
    write_scripts(tmp_path / "m" / "versions", {
        "a.py": script("abc1", None), "b.py": script("abc2", "abc1"), "c.py": script("xyz3", "abc2"),
    })
    path = tmp_path / "model.pt"
    torch.save({"a": torch.arange(4)}, path)
    args: Any = (path, "--no-backup", "--migrations", "m")
    assert "revision prefix 'abc' is ambiguous: abc1, abc2" in one_line_error(cli("upgrade", *args, "--from", "abc"))
    cli("upgrade", *args, "--from", "abc1", "--to", "xy", check=True)
    assert cli("current", path).stdout.strip() == "xyz3"
    assert "unknown revision 'nope'" in one_line_error(cli("downgrade", *args, "--to", "nope"))
