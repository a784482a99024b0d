"""User story: "our DCP checkpoints keep the run's hyper-parameters as an ``argparse.Namespace`` beside
the model; a migration that scales the learning rate needs the real object, and we trust our files."

Without ``--trust-pickle`` the migration sees an inert stand-in and fails cleanly, nothing written;
with it, the value's pickle runs (as ``dcp.load`` would run it) and the changed object is written
back, read by ``dcp.load``. The checkpoint is written by ``torch.distributed.checkpoint.save``.
"""

from __future__ import annotations

import argparse
import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp


def chain(tmp_path: Path) -> Path:
    root = tmp_path / "mig"
    (root / "versions").mkdir(parents=True)
    (root / "versions" / "0001_lr.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
        '    ckpt.extras["args"].lr *= 10\n    ckpt.rename("enc.weight", "encoder.weight")\n')
    return root


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def test_trust_pickle_gives_a_dcp_migration_the_real_objects(tmp_path: Path, cli: Any) -> None:
    directory = tmp_path / "step-7"
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"enc.weight": weight}, "args": argparse.Namespace(lr=0.5, width=8)},
                 checkpoint_id=directory)
    mig = chain(tmp_path)
    before = snapshot(directory)

    refused = cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "upgrade raised AttributeError" in refused.stderr
    assert snapshot(directory) == before

    cli("upgrade", directory, "--migrations", mig, "--from", "base", "--no-backup", "--trust-pickle", check=True)

    state: dict[str, Any] = {"model": {"encoder.weight": torch.zeros(4, 3)}, "args": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=directory)
    assert state["args"] == argparse.Namespace(lr=5.0, width=8)
    assert torch.equal(state["model"]["encoder.weight"], weight)
    assert cli("current", directory, check=True).stdout.strip() == "0001"
