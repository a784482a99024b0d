"""User story: "my new model has a parameter the old one did not (and lost one it had); I say how the
optimizer state should follow — refuse, or start the new parameter fresh — and training resumes."
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptmigrate
from ckptmigrate import api
from ckptmigrate.chain import engine
from ckptmigrate.chain.scripts import ScriptDirectory

Cli = Callable[..., subprocess.CompletedProcess[str]]


class Old(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x)))


class GainLinear(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 8)
        self.gain = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


class New(nn.Module):
    """``fc1`` gained a ``gain`` parameter; the head lost its bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = GainLinear()
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x)))


def chain(tmp_path: Path) -> Path:
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "r0.py").write_text(
        '"""Base."""\nrevision = "r0"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n'
    )
    (versions / "r1.py").write_text(
        '"""Gain in fc1, no head bias."""\nimport torch\n\nrevision = "r1"\ndown_revision = "r0"\n\n\n'
        "def upgrade(ckpt):\n    ckpt.drop('head.bias')\n    ckpt.add('fc1.gain', torch.ones(8), parameter=True)\n"
    )
    return versions.parent


def groups(model: nn.Module, kind: str) -> list[dict[str, Any]]:
    """Adam: one group; SGD: the first layer and the head at different learning rates."""
    if kind == "adam":
        return [{"params": list(model.parameters())}]
    return [{"params": list(model.fc1.parameters()), "lr": 0.1}, {"params": list(model.head.parameters()), "lr": 0.01}]


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(groups(model, kind), lr=1e-3)
    return torch.optim.SGD(groups(model, kind), lr=0.1, momentum=0.9)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    optimizer.step()


def trained_checkpoint(path: Path, kind: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Old()
    optimizer = make_optimizer(model, kind)
    train_step(model, optimizer)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}
    torch.save(payload, path)
    return payload


def moment(kind: str) -> str:
    return "exp_avg" if kind == "adam" else "momentum_buffer"


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_strict_refuses_a_new_parameter_and_reset_new_resumes_training(tmp_path: Path, cli: Cli, kind: str) -> None:
    path = tmp_path / "run.pt"
    old = trained_checkpoint(path, kind)
    migrations = str(chain(tmp_path))
    before = path.read_bytes()

    proc = cli("upgrade", "run.pt", "--from", "r0", "--migrations", migrations)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'fc1.gain'" in proc.stderr and "--optimizer reset_new" in proc.stderr
    assert path.read_bytes() == before

    cli("upgrade", "run.pt", "--from", "r0", "--optimizer", "reset_new", "--migrations", migrations, check=True)
    up = torch.load(path)
    model = New()
    model.load_state_dict(up["model"])
    optimizer = make_optimizer(model, kind)
    optimizer.load_state_dict(up["optimizer"])  # group sizes fit the new model's
    by_name = dict(zip([n for n, _ in model.named_parameters()], optimizer.param_groups[0]["params"]
                       + (optimizer.param_groups[1]["params"] if len(optimizer.param_groups) > 1 else []),
                       strict=True))
    state = optimizer.state
    old_index = {"fc1.weight": 0, "fc1.bias": 1, "head.weight": 2}
    for name, i in old_index.items():  # carried over, each to its own parameter
        torch.testing.assert_close(state[by_name[name]][moment(kind)], old["optimizer"]["state"][i][moment(kind)])
    assert by_name["fc1.gain"] not in state  # fresh: torch initialises it on the next step
    assert [g.get("lr") for g in up["optimizer"]["param_groups"]] == [g["lr"] for g in old["optimizer"]["param_groups"]]

    train_step(model, optimizer)  # the resumed run trains
    assert moment(kind) in optimizer.state[by_name["fc1.gain"]]
    if kind == "adam":
        assert int(optimizer.state[by_name["fc1.gain"]]["step"]) == 1
        assert int(optimizer.state[by_name["head.weight"]]["step"]) == 2


def test_the_policy_through_the_api(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    trained_checkpoint(path, "sgd")
    graph = ScriptDirectory(chain(tmp_path)).load()
    with pytest.raises(ckptmigrate.errors.MigrationError, match="fc1.gain"):
        engine.migrate_file(path, graph, from_rev="r0", output=tmp_path / "strict.pt")
    assert not (tmp_path / "strict.pt").exists()

    api.stamp(path, revision="r0", migrations=graph)  # in memory too: ckptmigrate.load follows the policy
    with pytest.raises(ckptmigrate.errors.MigrationError, match="reset_new"):
        ckptmigrate.load(path, migrations=graph)
    with ckptmigrate.load(path, migrations=graph, optimizer="reset_new") as ckpt:
        assert ckpt.applied == ["r1"]
        assert [g["params"] for g in ckpt.extras["optimizer"]["param_groups"]] == [[0, 1, 2], [3]]
    engine.migrate_file(path, graph, from_rev="r0", output=tmp_path / "up.pt", optimizer="reset_new")
    up = torch.load(tmp_path / "up.pt")
    assert [g["params"] for g in up["optimizer"]["param_groups"]] == [[0, 1, 2], [3]]
    with pytest.raises(ckptmigrate.errors.BadInput, match="not one of"):
        engine.migrate_file(path, graph, from_rev="r0", output=tmp_path / "x.pt", optimizer="lenient")
