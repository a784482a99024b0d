"""Conversion of a checkpoint to another container by byte-range copies, its envelope carried with
a ``convert`` history entry. :func:`ckptmigrate.api.convert` checks the arguments and stages objects."""

from __future__ import annotations

from pathlib import Path

from ckptmigrate.checkpoint.envelope import Envelope, now_utc
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.storage.locking import file_lock


def convert_file(src: Path, dst: Path, fmt: str, *, to: str, max_shard_size: int | None,
                 state_dict_only: bool) -> Path:
    """:func:`ckptmigrate.api.convert` of a local ``src`` into ``dst`` in the container ``fmt``
    (``to`` names it as asked)."""
    with file_lock(dst), Checkpoint.open(src) as ckpt:
        target = ckpt
        if state_dict_only:  # tensors only, nested dicts flattened to dotted keys as DCP names them
            from ckptmigrate.formats.dcp import flatten
            from ckptmigrate.tensors.refs import is_entry

            flat = {fqn: v for fqn, _path, v in flatten(dict(ckpt.state_dict.entries)) if is_entry(v)}
            target = Checkpoint.from_payload(flat, name=str(src))
        elif fmt in ("safetensors", "hf-sharded") and ckpt.layout.kind != "bare":
            raise BadInput(
                f"{src}: {to} holds only a flat dict of tensors, and this checkpoint's state dict sits under "
                f"{ckpt.layout.name} with {sorted(map(str, ckpt.extras))[:5]} beside it; pass --state-dict-only"
            )
        env = Envelope.build(target.state_dict.entries, layout=target.output_layout().name, previous=ckpt.envelope)
        env.history.append({"action": "convert", "at": now_utc(), "revision": env.revision,
                            "from_container": ckpt.format, "to_container": fmt})
        return target.write(dst, env, fmt=fmt, max_shard_bytes=max_shard_size)
