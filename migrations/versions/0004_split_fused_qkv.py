"""Split the fused qkv projection into q, k and v.

Revision ID: 0004
Revises: 0003
"""

revision = "0004"
down_revision = "0003"


def upgrade(ckpt):
    for part in ("weight", "bias"):
        ckpt.split(
            rf"layers\.(\d+)\.attn\.qkv\.{part}",
            [rf"layers.\1.attn.{name}.{part}" for name in ("q", "k", "v")],
            dim=0,
        )
