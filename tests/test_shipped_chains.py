"""User story: "`pip install mylib` is all I need for my old mylib checkpoints to upgrade."

A library ships its chain and registers it under the entry-point group ``ckptmigrate.chains``
(name = lineage, value = the package holding the scripts). With nothing configured, every command
and ``load`` / ``load_state_dict`` / ``attach`` find the chain for a checkpoint by the lineage in
its envelope, or, for an unstamped file, by its schema across the installed chains. The test builds
a real distribution and installs it with pip into a temporary target directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate import formats

Cli = Callable[..., subprocess.CompletedProcess[str]]

SCRIPTS = {
    "m1_initial.py": '"""The layout of mylib 1.0."""\nrevision = "m1"\ndown_revision = None\n\n\n'
                     "def upgrade(ckpt):\n    pass\n",
    "m2_rename_blocks.py": '"""mylib 2.0 renamed blocks to layers."""\nrevision = "m2"\ndown_revision = "m1"\n\n\n'
                           "def upgrade(ckpt):\n    ckpt.rename_regex(r'blocks\\.(\\d+)\\.(.*)', r'layers.\\1.\\2')\n",
}
OLD = {"blocks.0.weight": [4, 4], "blocks.1.weight": [4, 4]}
NEW = {"layers.0.weight": [4, 4], "layers.1.weight": [4, 4]}


def _schema(shapes: dict[str, list[int]]) -> str:
    return json.dumps({k: {"shape": v, "dtype": "float32"} for k, v in shapes.items()})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mylib 2.0` built from source and pip-installed into a directory of its own (not the venv)."""
    src = tmp_path_factory.mktemp("mylib-src")
    versions = src / "mylib" / "ckpt_migrations" / "versions"
    versions.mkdir(parents=True)
    for pkg in (src / "mylib", versions.parent, versions):
        (pkg / "__init__.py").write_text("")
    (src / "mylib" / "model.py").write_text(textwrap.dedent("""
        import torch


        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(2))
    """))
    for name, text in SCRIPTS.items():
        (versions / name).write_text(text)
    (versions / "m1_initial.schema.json").write_text(_schema(OLD))
    (versions / "m2_rename_blocks.schema.json").write_text(_schema(NEW))
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "mylib"
        version = "2.0"

        [project.entry-points."ckptmigrate.chains"]
        mylib = "mylib.ckpt_migrations"

        [tool.setuptools]
        packages = ["mylib", "mylib.ckpt_migrations", "mylib.ckpt_migrations.versions"]

        [tool.setuptools.package-data]
        "mylib.ckpt_migrations.versions" = ["*.json"]
    """))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True, text=True)
    assert (target / "mylib" / "ckpt_migrations" / "versions" / "m2_rename_blocks.schema.json").exists()
    return target


@pytest.fixture
def env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def old_checkpoint(path: Path) -> Path:
    torch.save({k: torch.randn(v) for k, v in OLD.items()}, path)
    return path


def test_chains_lists_what_is_installed(tmp_path: Path, cli: Cli, env: dict[str, str]) -> None:
    rows = json.loads(cli("chains", "--json", env=env, check=True).stdout)
    mine = [r for r in rows if r["lineage"] == "mylib"]
    assert mine == [{"lineage": "mylib", "package": "mylib.ckpt_migrations", "distribution": "mylib",
                     "version": "2.0", "revisions": 2, "heads": ["m2"], "error": None}]
    assert "mylib  mylib.ckpt_migrations  (mylib 2.0; 2 revisions, head m2)" in cli("chains", env=env).stdout


def test_a_stamped_file_finds_its_chain_by_lineage(tmp_path: Path, cli: Cli, env: dict[str, str]) -> None:
    path = old_checkpoint(tmp_path / "old.pt")
    cli("stamp", path, "--revision", "m1", env=env, check=True)
    assert formats.read_envelope(path)[1]["lineage"] == "mylib"  # type: ignore[index]
    cli("upgrade", path, "--no-backup", env=env, check=True)
    env_after: Any = formats.read_envelope(path)[1]
    assert env_after["revision"] == "m2" and sorted(torch.load(path)) == sorted(NEW)
    entry = env_after["history"][-1]
    assert entry["chain"] == "mylib 2.0" and entry["revision"] == "m2"
    # without the package there is nothing to find, and the error says how to get a chain
    line = cli("upgrade", path, "--to", "m1").stderr
    assert "no migrations configured" in line and "Traceback" not in line


def test_an_unstamped_file_is_matched_by_schema_across_installed_chains(tmp_path: Path, cli: Cli,
                                                                         env: dict[str, str]) -> None:
    path = old_checkpoint(tmp_path / "old.pt")
    out = cli("upgrade", path, "--dry-run", env=env, check=True).stdout
    assert "would upgrade m1 -> m2 (start from schema)" in out


def test_load_load_state_dict_and_attach_find_the_installed_chain(tmp_path: Path, env: dict[str, str]) -> None:
    stamped = old_checkpoint(tmp_path / "stamped.pt")
    unstamped = old_checkpoint(tmp_path / "unstamped.pt")
    program = textwrap.dedent(f"""
        import torch, ckptmigrate
        from ckptmigrate.api import stamp
        from mylib.model import Net

        stamp({str(stamped)!r}, revision="m1", lineage="mylib")
        ckpt = ckptmigrate.load({str(stamped)!r})
        assert sorted(ckpt.state_dict) == ["layers.0.weight", "layers.1.weight"], list(ckpt.state_dict)
        assert ckpt.applied == ["m2"], ckpt.applied
        report = ckptmigrate.load_state_dict(Net(), {str(unstamped)!r})
        assert report.ok and report.applied == ["m2"], str(report)
        ckptmigrate.attach(Net)
        net = Net()
        old = torch.load({str(unstamped)!r})
        net.load_state_dict(old)
        assert torch.equal(net.layers[1].weight, torch.load({str(unstamped)!r})["blocks.1.weight"])
        ckptmigrate.save(net, {str(tmp_path / "new.pt")!r}, lineage="mylib")
        # another model's files are not mylib's business: loaded as they are
        torch.save({{"other.w": torch.zeros(2)}}, {str(tmp_path / "other.pt")!r})
        assert list(ckptmigrate.load({str(tmp_path / "other.pt")!r}).state_dict) == ["other.w"]
        from ckptmigrate.release.stamping import stamp as stamp_unchecked  # another chain's revision
        stamp_unchecked({str(tmp_path / "other.pt")!r}, revision="x9", lineage="other")
        assert ckptmigrate.load({str(tmp_path / "other.pt")!r}).applied == []
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    saved: Any = formats.read_envelope(tmp_path / "new.pt")[1]
    assert (saved["lineage"], saved["revision"]) == ("mylib", "m2")
