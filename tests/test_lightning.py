"""A Lightning user resumes training from a checkpoint written before a refactor.

Era-1 code held a fused ``qkv`` Linear in ``net.blocks``; today's code has ``net.layers`` with
separate ``q``, ``k``, ``v``. With ``MigrationCallback`` the resume works and the optimizer state
follows the weights; ``attach`` makes ``load_from_checkpoint`` work too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from ckptmigrate import attach  # noqa: E402
from ckptmigrate.api import record_schema  # noqa: E402
from ckptmigrate.integrations.lightning import MigrationCallback, upgrade_checkpoint  # noqa: E402

CHAIN = {
    "0001_initial.py": 'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n',
    "0002_rename_and_split.py": (
        'revision = "0002"\ndown_revision = "0001"\n\n\ndef upgrade(ckpt):\n'
        '    ckpt.rename_prefix("net.blocks.", "net.layers.")\n'
        '    for part in ("weight", "bias"):\n'
        '        ckpt.split(rf"net\\.layers\\.(\\d+)\\.qkv\\.{part}",'
        ' [rf"net.layers.\\1.{n}.{part}" for n in "qkv"])\n'
    ),
}


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return q * k + v


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.k(x) + self.v(x)


class Net(nn.Module):
    def __init__(self, era: int) -> None:
        super().__init__()
        blocks = nn.ModuleList(Fused() if era == 1 else Split() for _ in range(2))
        if era == 1:
            self.blocks = blocks
        else:
            self.layers = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks if hasattr(self, "blocks") else self.layers:
            x = block(x)
        return x


class Module(pl.LightningModule):
    def __init__(self, era: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = Net(era)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path: Path, steps: int, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=callbacks or [],
    )


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    for name, text in CHAIN.items():
        (versions / name).write_text(text)
    with torch.device("meta"):
        record_schema("0001", Module(era=1), migrations=tmp_path / "migrations")
    return tmp_path / "migrations"


@pytest.fixture
def old_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, steps=3)
    trainer.fit(Module(era=1), _data())
    path = tmp_path / "era1.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_fit_resumes_from_an_old_checkpoint(tmp_path: Path, migrations: Path, old_checkpoint: Path) -> None:
    callback = MigrationCallback(migrations=migrations)
    trainer = _trainer(tmp_path, steps=4, callbacks=[callback])
    model = Module(era=2)
    trainer.fit(model, _data(), ckpt_path=old_checkpoint)
    assert callback.applied == ["0002"]
    assert trainer.global_step == 4
    adam = trainer.optimizers[0].state_dict()
    params = list(model.parameters())
    assert adam["param_groups"][0]["params"] == list(range(len(params)))
    for index, param in enumerate(params):  # every parameter kept its moments, split to its new shape
        state = adam["state"][index]
        assert state["exp_avg"].shape == param.shape
        assert int(state["step"]) == 4  # resumed at step 3, not restarted from nothing


def test_optimizer_state_follows_the_split_weights(migrations: Path, old_checkpoint: Path) -> None:
    checkpoint = torch.load(old_checkpoint, weights_only=False)
    fused = checkpoint["optimizer_states"][0]["state"][0]["exp_avg"].clone()
    model = Module(era=2)
    assert upgrade_checkpoint(checkpoint, migrations, model) == ["0002"]
    order = list(model.state_dict())
    state = checkpoint["optimizer_states"][0]["state"]
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["params"] == list(range(len(order)))
    for i, name in enumerate("qkv"):
        index = order.index(f"net.layers.0.{name}.weight")
        assert torch.equal(state[index]["exp_avg"], fused[8 * i : 8 * (i + 1)])
    model.load_state_dict(checkpoint["state_dict"])


def test_without_the_callback_the_resume_fails(tmp_path: Path, old_checkpoint: Path) -> None:
    with pytest.raises(RuntimeError, match="Missing key"):
        _trainer(tmp_path, steps=4).fit(Module(era=2), _data(), ckpt_path=old_checkpoint)


def test_load_from_checkpoint_with_attach(tmp_path: Path, migrations: Path, old_checkpoint: Path) -> None:
    class Attached(Module):
        pass

    attach(Attached, migrations=migrations)
    old = torch.load(old_checkpoint, weights_only=False)
    model = Attached.load_from_checkpoint(old_checkpoint, era=2)
    fused = old["state_dict"]["net.blocks.0.qkv.weight"]
    assert torch.equal(model.net.layers[0].k.weight, fused[8:16])
