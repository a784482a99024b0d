"""User story: "we moved our classes to another package, and every checkpoint that pickled them —
a config object in the extras, a whole ``torch.save(model)`` — stopped loading".

A migration script says ``ckpt.rename_global("oldpkg.", "newpkg.")`` (a module prefix) or
``ckpt.rename_global("oldpkg.models:Config", "newpkg.settings:Settings")`` (one class); ckptmigrate
renames the pickle's references without importing either package. Real modules are written to a
temporary directory: the checkpoints are saved by a process that has only the old package, and
loaded by ``torch.load(weights_only=False)`` in one that has only the new one; ``downgrade`` gives
back what ``torch.load`` returned for the original.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckptmigrate import api
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import MigrationError, UnsafePickleWarning

Cli = Callable[..., subprocess.CompletedProcess[str]]
TESTS = Path(__file__).resolve().parent
MODELS = """\
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.scale = nn.Parameter(torch.ones(2))


class Config:
    def __init__(self, width):
        self.width = width
"""


def package(root: Path, name: str, module: str = "models", source: str = MODELS) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "__init__.py").write_text("")
    (root / name / f"{module}.py").write_text(source.replace("oldpkg", name))
    return root


def python(code: str, path: Path) -> str:
    """Run ``code`` beside the checkpoints in a fresh process whose only extra import path is ``path``."""
    env = {**os.environ, "PYTHONPATH": f"{path}:{TESTS}"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=path.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def chain(root: Path, body: str) -> Path:
    versions = root / "mig" / "versions"
    versions.mkdir(parents=True)
    (versions / "0001_base.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n')
    (versions / "0002_moved.py").write_text(
        f'revision = "0002"\ndown_revision = "0001"\n\n\ndef upgrade(ckpt):\n    {body}\n')
    return root / "mig"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """module.pt (torch.save(model)) and extras.pt (a state dict and its EMA copy beside a Config
    instance and the class itself), saved where only ``oldpkg`` exists (``old/``); ``new/`` holds only
    ``newpkg``. Written once; each test gets its own copy."""
    root = tmp_path_factory.mktemp("saved")
    package(root / "old", "oldpkg")
    package(root / "new", "newpkg")
    python(
        "import torch\nfrom oldpkg.models import Net, Config\ntorch.manual_seed(0)\n"
        f"torch.save(Net(), {str(root / 'module.pt')!r})\n"
        "net = Net()\n"
        f"torch.save({{'model': net.state_dict(), 'config': Config(4), 'kind': Config, 'epoch': 3, "
        f"'model_ema': {{k: v.clone() for k, v in net.state_dict().items()}}}}, "
        f"{str(root / 'extras.pt')!r})\n", root / "old")
    return root


@pytest.fixture
def saved(written: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(old/, new/, the directory of the checkpoints): a fresh copy of :func:`written`."""
    shutil.copytree(written, tmp_path, dirs_exist_ok=True)
    return tmp_path / "old", tmp_path / "new", tmp_path


def test_a_moved_package_upgrades_loads_from_the_new_one_and_comes_back(saved: tuple[Path, Path, Path],
                                                                       cli: Cli) -> None:
    old, new, root = saved
    mig = chain(root, 'ckpt.rename_global("oldpkg.", "newpkg.")')
    for name in ("module.pt", "extras.pt"):
        (root / f"original-{name}").write_bytes((root / name).read_bytes())
        run = cli("upgrade", name, "--from", "0001", "--migrations", mig)
        assert run.returncode == 0, run.stderr
        globals_now = json.loads(cli("inspect", name, "--json", check=True).stdout)["pickle"]["unsafe_globals"]
        assert not any(g.startswith("oldpkg.") for g in globals_now)
        assert any(g.startswith("newpkg.") for g in globals_now)
    history = api.inspect(root / "extras.pt")["envelope"]["history"]
    assert history[-1]["inverse"] == [["rename_global", {"old": "newpkg.", "new": "oldpkg."}]]
    assert history[-1]["copies"] == {"model_ema": []}  # the EMA copy is part of the file: nothing of its own

    out = python(
        "import torch\n"
        "m = torch.load('module.pt', weights_only=False)\n"
        "e = torch.load('extras.pt', weights_only=False)\n"
        "print(type(m).__module__, type(m.block).__name__, type(e['config']).__module__, e['config'].width, "
        "e['kind'].__module__, sorted(m.state_dict()) == sorted(e['model']))\n", new)
    assert out.split() == ["newpkg.models", "Block", "newpkg.models", "4", "newpkg.models", "True"]

    for name in ("module.pt", "extras.pt"):
        cli("downgrade", name, "--to", "0001", "--migrations", mig, check=True)
    python(
        "import torch\nfrom payload_equality import assert_same_payload\n"
        "assert_same_payload(torch.load('extras.pt', weights_only=False), "
        "torch.load('original-extras.pt', weights_only=False))\n"
        "a, b = torch.load('module.pt', weights_only=False), torch.load('original-module.pt', weights_only=False)\n"
        "assert type(a) is type(b) and type(a.block) is type(b.block)\n"
        "assert_same_payload(a.state_dict(), b.state_dict())\n"
        "assert_same_payload({k: v for k, v in vars(a).items() if k != '_modules'}, "
        "{k: v for k, v in vars(b).items() if k != '_modules'})\n", old)


def test_one_class_renamed_through_the_api(saved: tuple[Path, Path, Path]) -> None:
    old, _new, root = saved
    elsewhere = package(root / "elsewhere", "newpkg", "settings", MODELS.replace("class Config", "class Settings"))
    mig = chain(root, 'ckpt.rename_global("oldpkg.models:Config", "newpkg.settings:Settings")')
    outcome = api.upgrade(root / "extras.pt", from_rev="0001", migrations=mig)
    assert outcome.written and outcome.ops[0]["ops"][0]["touched"] == [
        "oldpkg.models.Config -> newpkg.settings.Settings"]
    out = python("import torch\ne = torch.load('extras.pt', weights_only=False)\n"
                 "print(type(e['config']).__qualname__, e['kind'].__module__, e['config'].width)\n", elsewhere)
    assert out.split() == ["Settings", "newpkg.settings", "4"]
    # in memory too: ckptmigrate.load upgrades a copy, the file is not touched
    api.downgrade(root / "extras.pt", to="0001", migrations=mig, backup=False)
    with pytest.warns(UnsafePickleWarning, match="oldpkg.models.Config"), \
            api.load(root / "extras.pt", migrations=mig) as ckpt:
        assert ckpt.pickle_safety().unsafe == ("newpkg.settings.Settings",)
    assert Checkpoint.open(root / "extras.pt").pickle_safety().unsafe == ("oldpkg.models.Config",)


def test_a_name_the_file_does_not_have_is_an_error_naming_what_it_has(saved: tuple[Path, Path, Path],
                                                                      cli: Cli) -> None:
    _old, _new, root = saved
    mig = chain(root, 'ckpt.rename_global("oldpkg.model.Confg", "newpkg.models.Config")')
    before = (root / "extras.pt").read_bytes()
    run = cli("upgrade", "extras.pt", "--from", "0001", "--migrations", mig)
    assert run.returncode == 2 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "failed in rename_global" in run.stderr
    assert "matches no global in the file; it names oldpkg.models.Config" in run.stderr  # the closest first
    assert (root / "extras.pt").read_bytes() == before and not (root / "extras.pt.bak").exists()
    with Checkpoint.open(root / "extras.pt") as ckpt:
        with pytest.raises(ValueError, match="end both names with '.'"):
            ckpt.rename_global("oldpkg.models", "newpkg.models")  # a module, not a class
        with pytest.raises(ValueError, match="not a global's name"):
            ckpt.rename_global("oldpkg.models.Config", "newpkg\nos.system")
        with pytest.raises(ValueError, match="one of torch's own globals"):
            ckpt.rename_global("oldpkg.models.Config", "torch.float32")


def test_a_rename_onto_an_existing_global_records_no_inverse(saved: tuple[Path, Path, Path]) -> None:
    _old, _new, root = saved
    mig = chain(root, 'ckpt.rename_global("oldpkg.models.Block", "oldpkg.models.Net")')
    api.upgrade(root / "module.pt", from_rev="0001", migrations=mig)  # Block and Net are one name now
    assert api.inspect(root / "module.pt")["envelope"]["history"][-1]["inverse"] is None
    with pytest.raises(MigrationError, match="write a downgrade"):
        api.downgrade(root / "module.pt", to="0001", migrations=mig)


def test_objects_python_already_built_are_left_alone_or_refused(saved: tuple[Path, Path, Path], cli: Cli) -> None:
    """A payload already in memory (Lightning's on_load_checkpoint, load_state_dict) holds real objects:
    the chain runs and these ops leave them as they are. --trust-pickle rebuilds a file's objects
    before the migration, so renaming the pickle's names is refused there, in one line."""
    old, _new, root = saved
    payload = {"model": {"w": torch.ones(2)}, "settings": argparse.Namespace(lr=0.1)}
    ckpt = Checkpoint.from_payload(payload, key="model")
    ckpt.rename_global("oldpkg.", "newpkg.")
    assert not ckpt.sanitize().converted and isinstance(ckpt.extras["settings"], argparse.Namespace)

    mig = chain(root, 'ckpt.rename_global("oldpkg.", "newpkg.")')
    before = (root / "extras.pt").read_bytes()
    run = cli("upgrade", "extras.pt", "--from", "0001", "--migrations", mig, "--trust-pickle",
              env={"PYTHONPATH": str(old)})
    assert run.returncode == 2 and "run it without --trust-pickle" in run.stderr and "Traceback" not in run.stderr
    assert (root / "extras.pt").read_bytes() == before
