"""The example model of the demo and tests, in each era of its history.

Era 1 was trained under ``nn.DataParallel`` with ``blocks`` holding a fused ``qkv`` projection and a
linear head; later code unwrapped it, renamed ``blocks`` to ``layers``, split ``qkv`` into ``q``,
``k`` and ``v``, turned the head into a 1x1 convolution and added a ``temperature`` buffer. The
chain in ``migrations/`` takes a checkpoint from any era to the current one; every era computes the
same function, so outputs can be compared after an upgrade.
"""

from __future__ import annotations

import torch
from torch import nn

DIM, DEPTH, CLASSES, IN_FEATURES = 32, 2, 10, 16
ERAS = {1: "0001", 2: "0002", 3: "0003", 4: "0004", 5: "0005", 6: "0006"}
CURRENT_ERA = 6


class Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(DIM, 3 * DIM)
        else:
            self.q, self.k, self.v = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        weights = torch.softmax(q.unsqueeze(-1) * k.unsqueeze(-2) / DIM**0.5, dim=-1)
        return self.proj((weights @ v.unsqueeze(-1)).squeeze(-1))


class Block(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = Attention(fused)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class ExampleNet(nn.Module):
    """The model as it was in ``era`` (1 = oldest, :data:`CURRENT_ERA` = today)."""

    def __init__(self, era: int = CURRENT_ERA) -> None:
        super().__init__()
        self.era = era
        self.embed = nn.Linear(IN_FEATURES, DIM)
        blocks = nn.ModuleList(Block(fused=era < 4) for _ in range(DEPTH))
        if era < 3:
            self.blocks = blocks
        else:
            self.layers = blocks
        self.head: nn.Module = nn.Conv1d(DIM, CLASSES, 1) if era >= 5 else nn.Linear(DIM, CLASSES)
        if era >= 6:
            self.register_buffer("temperature", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks if self.era < 3 else self.layers:
            h = block(h)
        out = self.head(h.unsqueeze(-1)).squeeze(-1) if self.era >= 5 else self.head(h)
        return out / self.temperature if self.era >= 6 else out


def model_at(era: int) -> nn.Module:
    """The model as era ``era`` saved it: era 1 was wrapped in ``nn.DataParallel``."""
    model = ExampleNet(era)
    return nn.DataParallel(model) if era == 1 else model


def current_model() -> nn.Module:
    return ExampleNet(CURRENT_ERA)


def example_inputs() -> torch.Tensor:
    """A batch for recorded fixtures (``[tool.ckptmigrate] example_inputs``): seeded by the caller."""
    return torch.randn(4, IN_FEATURES)
