"""Sanitizing a torch file on disk: the payload's training-time objects turned into plain data
(:meth:`Checkpoint.sanitize <ckptmigrate.checkpoint.lazy.Checkpoint.sanitize>`), written in place
with a backup or into another file, with a ``sanitize`` history entry, and the verdict on the file
as written. :func:`ckptmigrate.api.sanitize` checks the arguments and stages an object first."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ckptmigrate import formats
from ckptmigrate.checkpoint.backups import make_backup
from ckptmigrate.checkpoint.envelope import Envelope, now_utc, superseded
from ckptmigrate.checkpoint.layout import module_class
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.storage.locking import file_lock


def sanitize_file(path: str | os.PathLike[str], out: Path | None, *, dry_run: bool, backup: bool,
                  key: str | None) -> dict[str, Any]:
    """:func:`ckptmigrate.api.sanitize` of a local ``path`` into ``out`` (None: in place), its
    arguments checked."""
    source = formats.checkpoint_path(path)
    dest = out or source
    lock = contextlib.nullcontext() if dry_run else file_lock(dest)
    with lock, Checkpoint.open(source, key=key) as ckpt:
        row: dict[str, Any] = {"path": os.fspath(path), "output": None, "written": False, "backup": None,
                               "converted": [], "superseded": False}
        if ckpt.format not in ("torch-zip", "torch-legacy"):  # nothing pickled: nothing to convert
            row.update(weights_only=None, unsafe_globals=[], called=[],
                       note=f"a {ckpt.format} checkpoint holds no pickle: nothing to sanitize")
            if out is not None and not dry_run:
                ckpt.write(out, ckpt.envelope, fmt=ckpt.format)
                row.update(output=str(out), written=True)
            return row
        if ckpt.layout.kind == "module":
            raise BadInput(
                f"{source}: holds a whole pickled nn.Module ({module_class(ckpt.container.payload)}), which "
                "torch.load(weights_only=True) refuses whatever its attributes hold; nothing was written. "
                "Save its state_dict() and sanitize that", path=source)
        report = ckpt.sanitize()
        row.update(report.to_dict())
        if dry_run:
            return row
        if not report.converted:
            if out is not None and out.resolve() != source.resolve():
                ckpt.write(out, ckpt.envelope)  # -o always leaves a file there, as upgrade -o does
                row.update(output=str(out), written=True)
            return row
        env = Envelope.build(ckpt.state_dict.entries, layout=ckpt.output_layout().name, previous=ckpt.envelope)
        env.state_dicts = ckpt.recorded_locations()
        entry: dict[str, Any] = {
            "action": "sanitize", "at": now_utc(), "revision": env.revision,
            "converted": {f"{c['global']} -> {c['to']}": c["count"] for c in row["converted"]},
            "blocking": list(report.blocking), "ckptmigrate_version": env.ckptmigrate_version,
        }
        old = superseded(ckpt.envelope)
        if old is not None:
            entry["superseded"] = old
            row["superseded"] = True
        env.history.append(entry)
        independent = True
        if out is None and backup:
            kept, independent = make_backup(source)
            row["backup"] = str(kept)
        try:
            ckpt.write(dest, env, append_in_place=independent)
        except BaseException:
            if row["backup"] is not None:
                Path(row["backup"]).unlink(missing_ok=True)
            raise
        row.update(output=str(dest), written=True)
    with Checkpoint.open(dest, key=key) as again:  # the verdict on the file as written
        row.update(again.pickle_safety().to_dict())
    return row
