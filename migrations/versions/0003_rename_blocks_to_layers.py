"""Rename the blocks container to layers.

Revision ID: 0003
Revises: 0002
"""

revision = "0003"
down_revision = "0002"


def upgrade(ckpt):
    ckpt.rename_prefix("blocks.", "layers.")
