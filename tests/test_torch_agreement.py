"""User story: "ckptmigrate's verdict on a file is torch's verdict."

What ckptmigrate verifies must be exactly what torch will load, so where ckptmigrate reads a file by
torch's rules it must apply torch's rules, not a neighbouring standard's, checked against the
installed torch as the oracle over many files. The Python 2 names of a
protocol-2 pickle (``__builtin__.set``, ``multiprocessing.process.Process``) are looked up by torch
through its own, smaller mapping tables, not the standard library's ``_compat_pickle``: the unsafe
globals ckptmigrate reports, and whether ``weights_only=True`` loads the file, must be torch's.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import inspect
import pickle
import pickletools
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch._utils

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.formats.pickle_safety import IMPORT_MAPPING, NAME_MAPPING

# -- Python 2 names ---------------------------------------------------------------------------------


def mapped(name: tuple[str, str], imports: dict[str, str], names: dict[tuple[str, str], tuple[str, str]]) -> str:
    module, qualname = names.get(name, (imports.get(name[0], name[0]), name[1]))
    return f"{module}.{qualname}"


def importable(module: str) -> object | None:
    if module.split(".")[0] in ("test", "tkinter", "winreg"):  # a test package; a GUI; Windows only
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(module)
        except ImportError:
            return None


def python2_era_objects() -> Iterator[object]:
    """Every object the standard library's tables name that pickles (protocol 2) by a Python 2 name:
    the target of each renamed name, and the classes and functions of each renamed module."""
    for module, qualname in _compat_pickle.NAME_MAPPING.values():
        found = importable(module)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is not None:
            yield found
    for module in set(_compat_pickle.IMPORT_MAPPING.values()):
        found = importable(module)
        for name, value in sorted(vars(found).items()) if found is not None else ():
            if (inspect.isclass(value) or inspect.isroutine(value)) and not name.startswith("__"):
                yield value


def written_python2_name(obj: object) -> tuple[str, str] | None:
    """The global a protocol-2 pickle of ``obj`` names, if it is written by a Python 2 name."""
    try:
        data = pickle.dumps(obj, protocol=2)
        if pickle.loads(data) is not obj:
            return None
    except Exception:  # noqa: BLE001 - not picklable by reference: not a global
        return None
    written = [arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]
    if len(written) != 1:
        return None
    module, qualname = str(written[0]).split(" ")
    module3, qualname3 = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return None if (module, qualname) == (module3, qualname3) else (module, qualname)


@pytest.fixture(scope="module")
def python2_names() -> dict[tuple[str, str], object]:
    out: dict[tuple[str, str], object] = {}
    for obj in python2_era_objects():
        name = written_python2_name(obj)
        if name is not None:
            out.setdefault(name, obj)
    return out


def test_the_name_tables_are_the_installed_torchs() -> None:
    assert IMPORT_MAPPING == torch._utils.IMPORT_MAPPING
    assert NAME_MAPPING == torch._utils.NAME_MAPPING


def test_the_unsafe_globals_of_a_python_2_era_pickle_are_torchs(
        python2_names: dict[tuple[str, str], object], tmp_path: Path) -> None:
    """One file naming every object the standard library writes by a Python 2 name: ckptmigrate
    reports exactly the globals torch's ``get_unsafe_globals_in_checkpoint`` reports."""
    torch_tables = (torch._utils.IMPORT_MAPPING, torch._utils.NAME_MAPPING)
    stdlib_tables = (_compat_pickle.IMPORT_MAPPING, _compat_pickle.NAME_MAPPING)
    differ = [n for n in python2_names if mapped(n, *torch_tables) != mapped(n, *stdlib_tables)]
    assert len(python2_names) > 200 and len(differ) > 50  # the file tells the two tables apart
    path = tmp_path / "py2.pt"
    torch.save({"w": torch.ones(2), "kinds": list(python2_names.values())}, path, pickle_protocol=2)
    with Checkpoint.open(path) as ckpt:
        ours = set(ckpt.pickle_safety().unsafe)
    assert ours == set(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def torch_loads_weights_only(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        return False
    return True


def test_whether_weights_only_loads_a_python_2_name_is_torchs(
        python2_names: dict[tuple[str, str], object], tmp_path: Path) -> None:
    """Each Python 2 name alone in a file: ckptmigrate says ``weights_only`` exactly when
    ``torch.load(weights_only=True)`` loads it (``__builtin__.set`` is allowed, most names are not)."""
    verdicts: dict[tuple[str, str], tuple[bool, bool]] = {}
    for name, obj in python2_names.items():
        path = tmp_path / "one.pt"
        torch.save({"w": torch.ones(2), "kind": obj}, path, pickle_protocol=2)
        with Checkpoint.open(path) as ckpt:
            verdicts[name] = (ckpt.pickle_safety().weights_only, torch_loads_weights_only(path))
    assert {theirs for _, theirs in verdicts.values()} == {True, False}  # both verdicts are tried
    assert {n: v for n, v in verdicts.items() if v[0] != v[1]} == {}
