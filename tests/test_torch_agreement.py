"""User story: "ckptmigrate's verdict on a file is torch's verdict."

What ckptmigrate verifies must be exactly what torch will load, so where ckptmigrate reads a file by
torch's rules it must apply torch's rules, not a neighbouring standard's, checked against the
installed torch as the oracle over many files:

- the Python 2 names of a protocol-2 pickle (``__builtin__.set``, ``multiprocessing.process.Process``)
  are looked up by torch through its own, smaller mapping tables, not the standard library's
  ``_compat_pickle``: the unsafe globals ckptmigrate reports, and whether ``weights_only=True``
  loads the file, must be torch's;
- a zip comment near the 65,535-byte maximum on a small file puts the end record where torch's
  miniz does not find it: ckptmigrate must refuse exactly the files torch fails on.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import inspect
import io
import itertools
import pickle
import pickletools
import struct
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch._utils

from ckptmigrate import formats
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.formats.pickle_safety import IMPORT_MAPPING, NAME_MAPPING

Cli = Callable[..., subprocess.CompletedProcess[str]]

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


# -- a comment at the end of the zip -----------------------------------------------------------------


def with_comment(data: bytes, length: int) -> bytes:
    return data[:-2] + struct.pack("<H", length) + b"c" * length


def saved(n: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(float(n))}, buf)
    return buf.getvalue()


class Verdicts:
    """torch's and ckptmigrate's verdict on one base archive given comments of chosen lengths."""

    def __init__(self, base: bytes, tmp_path: Path) -> None:
        self.base, self.path = base, tmp_path / "commented.pt"
        self.seen: dict[int, tuple[bool, bool]] = {}

    def __call__(self, length: int) -> bool:
        """torch's verdict (and ckptmigrate's, recorded)."""
        if length not in self.seen:
            self.path.write_bytes(with_comment(self.base, length))
            try:
                torch.load(self.path, weights_only=True)
                theirs = True
            except (RuntimeError, OSError):  # miniz's error, or the read at a negative offset
                theirs = False
            try:
                formats.read(self.path)
                ours = True
            except BadInput:
                ours = False
            self.seen[length] = (ours, theirs)
        return self.seen[length][1]

    def flip(self, low: int, high: int) -> None:
        """Find, by torch's verdicts alone, the exact length between ``low`` and ``high`` where it changes."""
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self(mid) == self(low) else (low, mid)


def test_a_comment_is_read_exactly_when_torch_reads_it(tmp_path: Path) -> None:
    """A grid of archive sizes (1.5 to 50 KiB) and comment lengths (0 to 65,535), and every length
    where torch's verdict changes between grid points, found by bisection: ckptmigrate reads the
    file exactly when ``torch.load`` does."""
    disagree, refused = [], 0
    for n in (0, 250, 700, 1500, 3000, 6000, 12000):
        verdicts = Verdicts(saved(n), tmp_path)
        grid = [*range(0, 65_536, 389), 65_535]
        for low, high in itertools.pairwise(grid):
            if verdicts(low) != verdicts(high):
                verdicts.flip(low, high)
        disagree += [(len(verdicts.base), c, v) for c, v in sorted(verdicts.seen.items()) if v[0] != v[1]]
        refused += sum(not theirs for _, theirs in verdicts.seen.values())
    assert refused > 100  # torch does refuse some: the grid can tell
    assert disagree == []


def test_the_refusal_is_one_line_naming_the_file_and_the_comment(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "small.pt"
    path.write_bytes(with_comment(saved(0), 65_535))
    with pytest.raises((RuntimeError, OSError)):
        torch.load(path, weights_only=True)
    proc = cli("inspect", path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert str(path) in proc.stderr and "65535-byte comment" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_an_in_place_write_to_a_commented_file_gives_a_file_torch_reads(tmp_path: Path) -> None:
    """A file torch reads with a long comment, renamed in place: torch and ckptmigrate read the result."""
    path = tmp_path / "commented.pt"
    base = saved(40_000)
    path.write_bytes(with_comment(base, 60_000))
    torch.load(path, weights_only=True)
    with Checkpoint.open(path) as ckpt:
        ckpt.rename("w", "v")
        ckpt.write(path, None)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(40_000.0))
    with Checkpoint.open(path) as ckpt:
        assert torch.equal(ckpt.materialize()["v"], torch.arange(40_000.0))
