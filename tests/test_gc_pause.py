"""User story: "ckptmigrate pauses Python's garbage collector while it reads my checkpoint, and
leaves it as it found it — in my process, with my own threads."

Parsing the metadata of many tensors is a fifth faster without the cyclic collector traversing the
new objects again and again (``ckptmigrate.util.gcpause``). These tests read real files through the
public API and check that the collector is enabled again afterwards (also after an error), stays
disabled when the caller had disabled it, and that what a read allocated is collected when the next
read begins, so a loop over files does not keep the stand-ins of the payloads it dropped.
"""

from __future__ import annotations

import gc
import pickle
import weakref
from pathlib import Path

import pytest
import torch

import ckptmigrate
from ckptmigrate import formats
from ckptmigrate.errors import BadInput


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(3000)}, path)
    return path


def test_the_collector_runs_again_after_a_read_and_after_a_failed_one(model: Path, tmp_path: Path) -> None:
    assert gc.isenabled()
    assert ckptmigrate.inspect(model)["tensors"] == 3000
    assert gc.isenabled()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(BadInput):
        ckptmigrate.inspect(bad)
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled(model: Path) -> None:
    gc.disable()
    try:
        assert ckptmigrate.inspect(model)["tensors"] == 3000
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_stand_ins_of_a_dropped_payload_are_collected_by_the_next_read(model: Path, tmp_path: Path) -> None:
    # a payload naming a global of its own: its stand-in class is cyclic garbage once dropped
    extra = tmp_path / "extra.pt"
    torch.save({"weights": torch.load(model, weights_only=True), "cfg": pickle.loads(pickle.dumps(Path("x")))},
               extra)
    container = formats.read(extra)
    standin = weakref.ref(type(container.payload["cfg"]))
    container.close()
    del container
    assert standin() is not None  # a cycle: reference counting alone does not free it
    formats.read(model).close()  # a read of 3,000 tensors owes, and its successor pays, a full collection
    formats.read(model).close()
    assert standin() is None
