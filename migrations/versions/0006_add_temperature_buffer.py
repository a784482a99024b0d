"""Add the temperature buffer (1.0 keeps old checkpoints' outputs unchanged).

Revision ID: 0006
Revises: 0005
"""

import torch

revision = "0006"
down_revision = "0005"


def upgrade(ckpt):
    ckpt.add("temperature", torch.ones(1))
