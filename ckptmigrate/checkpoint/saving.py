"""Saving: a payload (a state dict or a checkpoint dict) written as a torch zip file or safetensors
with its envelope, stamped at the given revision. :func:`ckptmigrate.api.save` finds the revision."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ckptmigrate.checkpoint.envelope import Envelope, now_utc
from ckptmigrate.checkpoint.layout import locate
from ckptmigrate.errors import BadInput
from ckptmigrate.formats import safetensors_io, torchzip
from ckptmigrate.storage.atomic import atomic_write


def save_payload(payload: Any, path: Path, fmt: str, *, lineage: str | None, revision: str | None,
                 tags: Mapping[str, str] | None, include: str | Sequence[str] | None) -> Path:
    """:func:`ckptmigrate.api.save` of ``payload`` once its revision is known."""
    import torch

    layout = locate(payload)
    state_dict = layout.state_dict(payload)
    if include is not None:
        patterns = [include] if isinstance(include, str) else list(include)
        kept = type(state_dict)((k, v) for k, v in state_dict.items()
                                if any(re.fullmatch(p, k) or k.startswith(p + ".") for p in patterns))
        if hasattr(state_dict, "_metadata"):
            kept._metadata = state_dict._metadata
        state_dict = kept
        payload = layout.rebuild(payload, state_dict, layout.extras(payload))
    env = Envelope.build(state_dict, layout=layout.name, tags=tags)
    env.lineage, env.revision = lineage, revision
    env.history.append({"action": "save", "at": now_utc(), "revision": revision})
    if fmt == "safetensors":
        if layout.kind != "bare":
            raise BadInput(f"{path}: safetensors holds only a flat dict of tensors; save a state dict")
        with atomic_write(path) as fh:
            safetensors_io.write(fh, dict(state_dict), env.to_dict(), {})
        return path
    with atomic_write(path) as fh:
        torch.save(payload, fh)
        fh.flush()
        torchzip.append_records(fh, {torchzip.ENVELOPE_RECORD: torchzip.envelope_bytes(env.to_dict())})
    return path
