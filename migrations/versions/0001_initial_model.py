"""Initial model: trained under nn.DataParallel, fused qkv, linear head.

Revision ID: 0001
Revises: <base>
"""

revision = "0001"
down_revision = None
lineage = "example"


def upgrade(ckpt):
    """The first revision describes checkpoints as they were; nothing to change."""
