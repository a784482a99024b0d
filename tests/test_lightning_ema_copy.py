"""User story: "my Lightning run keeps an EMA of the weights in a callback; after `ckptmigrate upgrade`
the run resumes on the new model code and the EMA carries on — it was upgraded with the weights."
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckptmigrate import formats
from ckptmigrate.checkpoint.layout import format_location

pl = pytest.importorskip("pytorch_lightning")
Cli = Callable[..., subprocess.CompletedProcess[str]]


class Lit(pl.LightningModule):
    """Era 0 calls the first layer ``encoder``; era 1 renamed it ``backbone`` and added a ``scale`` buffer."""

    def __init__(self, era: int) -> None:
        super().__init__()
        self.era = era
        first = nn.Linear(4, 8)
        if era == 0:
            self.encoder = first
        else:
            self.backbone = first
            self.register_buffer("scale", torch.ones(1))
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x) if self.era == 0 else self.backbone(x) * self.scale
        return self.head(torch.relu(self.norm(h)))

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class EMA(pl.Callback):
    """An exponential moving average of the module's state dict, kept in the callback's state."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.ema: dict[str, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay)  # "EMA{'decay': 0.9}": a key with a dot in it

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        current = pl_module.state_dict()
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in current.items()}
            return
        for k, v in current.items():  # a key the EMA lacks means it was left at the old revision
            if v.is_floating_point():
                self.ema[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.ema[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"ema_state_dict": self.ema, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema = state_dict["ema_state_dict"]


def loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)),
                      batch_size=8)


def trainer(root: Path, steps: int, ema: EMA) -> Any:
    return pl.Trainer(max_steps=steps, callbacks=[ema], default_root_dir=root, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1)


def chain(tmp_path: Path) -> Path:
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "r0.py").write_text(
        '"""Base."""\nrevision = "r0"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n'
    )
    (versions / "r1.py").write_text(
        '"""encoder -> backbone, a scale buffer."""\nimport torch\n\nrevision = "r1"\ndown_revision = "r0"\n\n\n'
        "def upgrade(ckpt):\n    ckpt.rename_prefix('encoder.', 'backbone.')\n"
        "    ckpt.add('scale', torch.ones(1))\n"
    )
    return versions.parent


def test_a_lightning_ema_callback_is_upgraded_and_the_run_resumes(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    path = tmp_path / "last.ckpt"
    old_ema = EMA()
    run = trainer(tmp_path, 3, old_ema)
    run.fit(Lit(0), loader())
    run.save_checkpoint(path)
    location = "callbacks/EMA{'decay': 0.9}/ema_state_dict"
    info = json.loads(cli("inspect", path.name, "--json", check=True).stdout)
    assert info["state_dicts"] == ["state_dict", location]

    cli("upgrade", path.name, "--from", "r0", "--migrations", str(chain(tmp_path)), check=True)
    assert formats.read_envelope(path)[1]["state_dicts"] == ["state_dict", location]
    upgraded = torch.load(path, weights_only=False)
    ema_state = upgraded["callbacks"]["EMA{'decay': 0.9}"]["ema_state_dict"]
    assert list(ema_state) == list(upgraded["state_dict"])
    assert sorted(ema_state) == sorted(Lit(1).state_dict())
    assert torch.equal(ema_state["backbone.weight"], old_ema.ema["encoder.weight"])  # type: ignore[index]

    new_ema = EMA()
    trainer(tmp_path, 6, new_ema).fit(Lit(1), loader(), ckpt_path=path)  # model, Adam state and EMA resume
    assert new_ema.ema is not None and sorted(new_ema.ema) == sorted(Lit(1).state_dict())
    assert not torch.equal(new_ema.ema["backbone.weight"], ema_state["backbone.weight"])  # it kept averaging


def test_the_migration_callback_upgrades_the_ema_copy_in_memory(tmp_path: Path) -> None:
    from ckptmigrate.integrations.lightning import upgrade_checkpoint

    versions = tmp_path / "t" / "versions"
    versions.mkdir(parents=True)
    (versions / "r0.py").write_text(
        '"""Base."""\nrevision = "r0"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n'
    )
    (versions / "r1.py").write_text('"""Transpose."""\nrevision = "r1"\ndown_revision = "r0"\n\n\n'
                                    "def upgrade(ckpt):\n    ckpt.transpose('head.weight', 0, 1)\n")
    model = Lit(0)
    ema = {k: v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    expected = ema["head.weight"].t().clone()
    checkpoint = {"state_dict": model.state_dict(), "callbacks": {"EMA{'decay': 0.9}": {"ema_state_dict": ema}}}
    from ckptmigrate import api

    api.record_schema("r0", model, migrations=str(versions.parent))  # how the dict is placed at r0
    assert upgrade_checkpoint(checkpoint, str(versions.parent)) == ["r1"]
    got = checkpoint["callbacks"]["EMA{'decay': 0.9}"]["ema_state_dict"]
    assert isinstance(got["head.weight"], torch.Tensor)
    assert torch.equal(got["head.weight"], expected)


def test_lightnings_own_swa_callback_average_is_upgraded(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)
    run = pl.Trainer(max_epochs=2, callbacks=[swa], default_root_dir=tmp_path, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     accelerator="cpu", devices=1)
    run.fit(Lit(0), loader())
    path = tmp_path / "swa.ckpt"
    run.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("StochasticWeightAveraging")]
    location = format_location(("callbacks", key, "average_model_state"))
    assert json.loads(cli("inspect", path.name, "--json", check=True).stdout)["state_dicts"] == ["state_dict", location]

    cli("upgrade", path.name, "--from", "r0", "--migrations", str(chain(tmp_path)), check=True)
    average = torch.load(path, weights_only=False)["callbacks"][key]["average_model_state"]
    Lit(1).load_state_dict(average)  # strict: the averaged weights are today's model's
    assert torch.equal(average["backbone.weight"], state["callbacks"][key]["average_model_state"]["encoder.weight"])
