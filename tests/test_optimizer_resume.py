"""User story: "after migrating a training checkpoint, training resumes exactly where it stopped."

A model was trained under ``nn.DataParallel`` with a fused ``qkv`` projection and saved with its
optimizer. The code now has separate ``q``/``k``/``v`` layers and no wrapper. After ``ckptmigrate
upgrade`` the new model and a new optimizer load the file and take one more step; the parameters
must be what the same run, done in the new layout from the start, would have reached: the Adam
moments and SGD momentum buffers were split with the weights and renumbered in the new model's
parameter order. The same holds for a Lightning-style ``optimizer_states`` list.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptmigrate.chain import engine
from ckptmigrate.chain.scripts import ScriptDirectory

DIM, STEPS = 8, 3

SCRIPTS = {
    "r1_trained_under_dataparallel.py": '''"""Trained under DataParallel with a fused qkv projection."""
revision = "r1"
down_revision = None


def upgrade(ckpt):
    pass
''',
    "r2_unwrap.py": '''"""Unwrap DataParallel."""
revision = "r2"
down_revision = "r1"


def upgrade(ckpt):
    ckpt.unwrap("module.")
''',
    "r3_split_qkv.py": r'''"""Split the fused qkv projection."""
revision = "r3"
down_revision = "r2"


def upgrade(ckpt):
    ckpt.split(r"qkv\.(weight|bias)", [r"q.\1", r"k.\1", r"v.\1"], dim=0)
''',
}


class OldNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(torch.tanh(self.embed(x))).chunk(3, dim=-1)
        return self.out(torch.tanh(q) * k + v)


class NewNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        return self.out(torch.tanh(self.q(h)) * self.k(h) + self.v(h))


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)) for _ in range(STEPS + 1)]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    opt.zero_grad()
    F.mse_loss(model(batch[0]), batch[1]).backward()
    opt.step()


def new_from_old(old: OldNet) -> NewNet:
    """The new-layout model with the same function as ``old``."""
    new = NewNet()
    with torch.no_grad():
        for name in ("embed", "out"):
            getattr(new, name).load_state_dict(getattr(old, name).state_dict())
        for part in ("weight", "bias"):
            for name, piece in zip("qkv", getattr(old.qkv, part).chunk(3), strict=True):
                getattr(getattr(new, name), part).copy_(piece)
    return new


def script_dir(tmp_path: Path, *, snapshot: bool = False) -> ScriptDirectory:
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    for name, text in SCRIPTS.items():
        (versions / name).write_text(text)
    if snapshot:  # the head's schema, in the new model's key order
        schema = {k: {"shape": list(v.shape), "dtype": "float32"} for k, v in NewNet().state_dict().items()}
        (versions / "r3_split_qkv.schema.json").write_text(json.dumps(schema))
    return ScriptDirectory(tmp_path / "migrations")


class Runs:
    """The old-layout run that is saved and migrated, and the reference run in the new layout."""

    def __init__(self, kind: str) -> None:
        torch.manual_seed(0)
        self.kind = kind
        self.batches = data()
        old = OldNet()
        self.reference = new_from_old(old)
        self.old = nn.DataParallel(old)
        self.old_opt = OPTIMIZERS[kind](self.old.parameters())
        ref_opt = OPTIMIZERS[kind](self.reference.parameters())
        for batch in self.batches[:STEPS]:
            train_step(self.old, self.old_opt, batch)
            train_step(self.reference, ref_opt, batch)
        self.at_save = copy.deepcopy(self.reference)
        train_step(self.reference, ref_opt, self.batches[STEPS])
        assert all(k.startswith("module.") for k in self.old.state_dict())

    def resume(self, model_sd: dict[str, torch.Tensor], opt_sd: dict[str, Any] | None) -> NewNet:
        """The new model and optimizer, loaded from the migrated checkpoint, after one more step."""
        model = NewNet()
        model.load_state_dict(model_sd)
        for (name, p), want in zip(model.named_parameters(), self.at_save.parameters(), strict=True):
            torch.testing.assert_close(p, want, msg=lambda m, n=name: f"{n} as saved: {m}")
        opt = OPTIMIZERS[self.kind](model.parameters())
        if opt_sd is not None:
            opt.load_state_dict(opt_sd)
        train_step(model, opt, self.batches[STEPS])
        return model


def assert_params_match(got: nn.Module, want: nn.Module) -> None:
    for (name, p), (_, q) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n} after resuming: {m}")


def migrate(tmp_path: Path, payload: dict[str, Any], *, snapshot: bool = False) -> dict[str, Any]:
    path = tmp_path / "train.ckpt"
    torch.save(payload, path)
    outcome = engine.migrate_file(path, script_dir(tmp_path, snapshot=snapshot).load(), from_rev="r1")
    assert outcome.written and [s.id for s in outcome.plan.steps] == ["r2", "r3"]
    return torch.load(path)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("snapshot", [False, True], ids=["no-snapshot", "head-snapshot"])
def test_resume_after_unwrap_and_qkv_split(tmp_path: Path, kind: str, snapshot: bool) -> None:
    runs = Runs(kind)
    saved = {"model": runs.old.state_dict(), "optimizer": runs.old_opt.state_dict(), "epoch": STEPS}
    ckpt = migrate(tmp_path, saved, snapshot=snapshot)
    assert ckpt["epoch"] == STEPS
    assert sorted(ckpt["model"]) == sorted(NewNet().state_dict())
    assert_params_match(runs.resume(ckpt["model"], ckpt["optimizer"]), runs.reference)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_resuming_without_the_migrated_optimizer_state_would_not_match(tmp_path: Path, kind: str) -> None:
    """The comparison above is sensitive: a fresh optimizer takes a visibly different step."""
    runs = Runs(kind)
    ckpt = migrate(tmp_path, {"model": runs.old.state_dict(), "optimizer": runs.old_opt.state_dict()})
    with pytest.raises(AssertionError, match="after resuming"):
        assert_params_match(runs.resume(ckpt["model"], None), runs.reference)


def test_resume_from_a_lightning_checkpoint(tmp_path: Path) -> None:
    runs = Runs("adam")
    saved = {
        "epoch": 1, "global_step": STEPS, "pytorch-lightning_version": "2.2.0",
        "state_dict": runs.old.state_dict(),
        "optimizer_states": [runs.old_opt.state_dict()],
        "lr_schedulers": [{"last_epoch": 1, "_step_count": 2}],
        "callbacks": {},
    }
    ckpt = migrate(tmp_path, saved)
    assert ckpt["global_step"] == STEPS and ckpt["lr_schedulers"] == saved["lr_schedulers"]
    assert len(ckpt["optimizer_states"]) == 1
    assert_params_match(runs.resume(ckpt["state_dict"], ckpt["optimizer_states"][0]), runs.reference)
