"""Unwrap nn.DataParallel: drop the module. prefix.

Revision ID: 0002
Revises: 0001
"""

revision = "0002"
down_revision = "0001"


def upgrade(ckpt):
    ckpt.unwrap("module.")
