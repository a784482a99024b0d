"""Turn the linear head into a 1x1 Conv1d: the weight gains a trailing dimension.

Revision ID: 0005
Revises: 0004
"""

revision = "0005"
down_revision = "0004"


def upgrade(ckpt):
    out_features, in_features = ckpt.state_dict["head.weight"].shape
    ckpt.reshape("head.weight", [out_features, in_features, 1])
