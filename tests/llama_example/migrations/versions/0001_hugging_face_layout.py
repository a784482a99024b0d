"""Hugging Face's layout (transformers' LlamaForCausalLM): the baseline.

Revision ID: 0001
Revises:
"""

revision = "0001"
down_revision = None


def upgrade(ckpt):
    pass


def downgrade(ckpt):
    pass
