"""Old pickles are judged by the names torch looks up, and "called" means called.

Story: training code from the Python 2 era (or any `torch.save(..., pickle_protocol=2)`) writes
`__builtin__.set` and `copy_reg._reconstructor` where Python 3 says `builtins.set` and
`copyreg._reconstructor`. torch maps the names before it checks its `weights_only` allow-list, so a
set is safe and a reconstructed object is not; ckptmigrate must say the same — and must tell a
global the pickle calls (it would run) from one it only names (a class stored as a value).
One rule of `formats/pickle_safety.py` per test, so a mutant of it fails here by name.
"""

from __future__ import annotations

import argparse
import multiprocessing.context
import pickle
from pathlib import Path

import torch

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.formats.pickle_safety import assess, python3_name


def judged(tmp_path: Path, payload: object, name: str) -> tuple[Checkpoint, set[str]]:
    path = tmp_path / f"{name}.pt"
    torch.save(payload, path, pickle_protocol=2)
    return Checkpoint.open(path), set(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def test_protocol_2_names_are_mapped_as_torch_maps_them(tmp_path: Path) -> None:
    assert b"c__builtin__\nset" in pickle.dumps({1}, protocol=2)  # what such a file says
    payloads = {
        "set": {"w": torch.ones(2), "classes": {1, 2, 3}},
        "namespace": {"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)},
        "class_only": {"w": torch.ones(2), "kind": argparse.Namespace},
    }
    for name, payload in payloads.items():
        ckpt, torch_says = judged(tmp_path, payload, name)
        with ckpt:
            safety = ckpt.pickle_safety()
        assert set(safety.unsafe) == torch_says, name
    assert set(Checkpoint.open(tmp_path / "set.pt").pickle_safety().unsafe) == set()


def test_called_is_what_the_pickle_calls_not_what_it_names(tmp_path: Path) -> None:
    with judged(tmp_path, {"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, "namespace")[0] as ckpt:
        assert ckpt.pickle_safety().called == ("argparse.Namespace",)
    with judged(tmp_path, {"w": torch.ones(2), "kind": argparse.Namespace}, "class_only")[0] as ckpt:
        safety = ckpt.pickle_safety()
    assert safety.unsafe == ("argparse.Namespace",) and safety.called == ()
    assert not safety.weights_only and safety.to_dict()["unsafe_globals"] == ["argparse.Namespace"]


def test_one_global_named_twice_is_called_if_either_call_is() -> None:
    both = assess({"__builtin__.eval": False, "builtins.eval": True, "builtins.set": True})
    assert both.unsafe == ("builtins.eval",) and both.called == ("builtins.eval",)
    either = assess({"builtins.eval": True, "__builtin__.eval": False})
    assert either.called == ("builtins.eval",)
    assert assess({}).weights_only and assess({"collections.OrderedDict": True}).weights_only


def test_the_mapping_covers_renamed_modules_and_renamed_names() -> None:
    assert python3_name("__builtin__.set") == "builtins.set"  # a renamed module
    assert python3_name("copy_reg._reconstructor") == "copyreg._reconstructor"
    assert python3_name("exceptions.StandardError") == "builtins.Exception"  # a renamed name
    assert python3_name("torch._utils._rebuild_tensor_v2") == "torch._utils._rebuild_tensor_v2"
    assert python3_name("a.b.c.D") == "a.b.c.D"


def test_a_python_2_name_torch_does_not_map_is_reported_as_torch_reports_it(tmp_path: Path) -> None:
    """``multiprocessing.context.Process`` pickles (protocol 2) as ``multiprocessing.process.Process``,
    a name the standard library's tables map and torch's do not: the name reported is torch's."""
    ckpt, torch_says = judged(tmp_path, {"w": torch.ones(2), "kind": multiprocessing.context.Process}, "process")
    with ckpt:
        assert set(ckpt.pickle_safety().unsafe) == torch_says
