"""The Python API: plain functions the CLI is a thin layer over."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptmigrate.checkpoint.envelope import Envelope, now_utc, schema_of
from ckptmigrate.checkpoint.layout import locate
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.formats import safetensors_io, torchzip
from ckptmigrate.release.stamping import stamp
from ckptmigrate.storage.atomic import atomic_write
from ckptmigrate.storage.locking import file_lock

__all__ = [
    "autogenerate_revision", "compact", "inspect", "load", "record_schema", "revision_graph", "save",
    "script_directory", "stamp",
]

if TYPE_CHECKING:  # the migration machinery is imported when used: `inspect` starts faster without it
    from ckptmigrate.chain.revisions import RevisionGraph, ScriptDirectory


def inspect(path: str | os.PathLike[str], *, keys: bool = False, key: str | None = None) -> dict[str, Any]:
    """Describe a checkpoint from its metadata alone (no tensor bytes read, torch not imported)."""
    with Checkpoint.open(path, key=key) as ckpt:
        return ckpt.summary(keys=keys)


def script_directory(migrations: str | os.PathLike[str] | None = None, *, cwd: Path | None = None) -> ScriptDirectory:
    """The script directory named by ``migrations`` (a path or a module), else by pyproject.toml."""
    from ckptmigrate.chain import config
    from ckptmigrate.chain.revisions import ScriptDirectory

    if migrations is not None:
        return ScriptDirectory.from_spec(migrations if isinstance(migrations, str) else Path(migrations), Path.cwd())
    cfg = config.load(cwd)
    if cfg.migrations is None:
        raise BadInput(
            "no migrations configured: pass --migrations DIR_OR_MODULE, or run `ckptmigrate init` "
            "to create one and record it in pyproject.toml"
        )
    return ScriptDirectory.from_spec(cfg.migrations, cfg.root)


def revision_graph(migrations: str | os.PathLike[str] | RevisionGraph | None = None) -> RevisionGraph:
    from ckptmigrate.chain.revisions import RevisionGraph

    if isinstance(migrations, RevisionGraph):
        return migrations
    return script_directory(migrations).load()


def _optional_graph(migrations: Any) -> RevisionGraph | None:
    from ckptmigrate.chain import config

    if migrations is None and config.load().migrations is None:
        return None
    return revision_graph(migrations)


def save(
    obj: Any, path: str | os.PathLike[str], *, migrations: Any = None, lineage: str | None = None,
    tags: Mapping[str, str] | None = None, format: str | None = None,
    include: str | Sequence[str] | None = None,
) -> Path:
    """Save a module, a state dict or a checkpoint dict, stamped at the lineage's head revision."""
    import torch

    path = Path(path)
    payload = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(payload, Mapping):
        raise BadInput(f"save: expected a module or a dict, got {type(obj).__name__}")
    fmt = format or ("safetensors" if path.suffix == ".safetensors" else "torch-zip")
    graph = _optional_graph(migrations)
    revision = None
    if graph is not None and len(graph):
        head = graph.head(lineage)
        revision, lineage = head.id, head.lineage
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


def load(
    path: str | os.PathLike[str], *, migrations: Any = None, to: str = "head",
    map_location: Any = None, mmap: bool = True, trust_pickle: bool = False, key: str | None = None,
) -> Checkpoint:
    """Open a checkpoint and upgrade it in memory to ``to``; the file on disk is not changed.

    Tensors are memory-mapped (``mmap``) and loaded on the CPU (a CUDA-saved file needs no
    ``map_location``); ``trust_pickle=True`` runs the file's pickle code to rebuild the extras as
    real objects — only for files you trust.
    """
    import warnings

    import torch

    from ckptmigrate.chain.engine import apply, new_envelope, plan_for
    from ckptmigrate.checkpoint.compat import version_notes

    ckpt = Checkpoint.open(path, key=key)
    ckpt.map_location = map_location
    ckpt.mmap = mmap
    notes = version_notes(
        ckpt.metadata, ckpt.summary()["devices"], torch_version=torch.__version__,
        cuda_available=torch.cuda.is_available(), cuda_version=torch.version.cuda,
    )
    for note in notes:
        warnings.warn(f"{ckpt.path}: {note}", stacklevel=2)
    if trust_pickle:
        ckpt.trust_pickle()
    graph = _optional_graph(migrations)
    if graph is None or not len(graph):
        return ckpt
    plan = plan_for(ckpt, graph, to=to)
    ckpt.head_revision = graph.head(plan.lineage).id
    if plan.steps:
        history = apply(ckpt, plan)
        ckpt.envelope = new_envelope(ckpt, plan, history, written=False)
    return ckpt


def record_schema(revision: str, source: Any, *, migrations: Any = None) -> Path:
    """Record the schema ``revision`` produces, from a model (built on ``meta`` costs nothing), a
    state dict or a checkpoint file, beside the revision's script — what fingerprinting of unstamped
    checkpoints matches against."""
    rev = revision_graph(migrations).get(revision)
    if isinstance(source, (str, os.PathLike)):
        with Checkpoint.open(source) as ckpt:
            schema = ckpt.schema()
    else:
        state_dict = source.state_dict() if hasattr(source, "state_dict") and callable(source.state_dict) else source
        schema = schema_of(state_dict)
    rev.schema_path.write_text(json.dumps(schema, indent=1) + "\n")
    return rev.schema_path


def compact(path: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """Rewrite a torch zip file with only its live records (in-place appends leave orphaned bytes).

    Returns the sizes before and after. The envelope is kept as it is; tensors are copied by the kernel.
    """
    dest = Path(output) if output is not None else Path(path)
    with file_lock(dest), Checkpoint.open(path) as ckpt:
        before = os.stat(path).st_size
        ckpt.write(dest, ckpt.envelope, compact=True)
    return before, os.stat(dest).st_size


def autogenerate_revision(
    message: str, *, rev_id: str | None = None, lineage: str | None = None, migrations: Any = None,
    model: str | None = None,
) -> Path:
    """Write a revision whose ops take head's schema to the current model's, and record its snapshot.

    With no revision yet, the first one describes the model as it is (no ops). Every guess carries a
    ``# REVIEW:`` comment in the generated script.
    """
    import uuid

    from ckptmigrate.autogenerate import plan as autogenerate
    from ckptmigrate.autogenerate import render as migration_source
    from ckptmigrate.chain import schemas

    directory = script_directory(migrations)
    graph = directory.load()
    new = schemas.model_schema(schemas.model_spec(model))
    down = None
    steps: list[Any] = []
    if lineage in graph.heads() or (lineage is None and len(graph)):
        head = graph.head(lineage)
        old = head.schema()
        if old is None:
            raise BadInput(
                f"head {head.id} has no schema snapshot ({head.schema_path}); record one with "
                "ckptmigrate.api.record_schema() from a model or checkpoint of that revision"
            )
        down, lineage = head.id, head.lineage
        steps = autogenerate.generate(old, new)
    rev_id = rev_id or uuid.uuid4().hex[:12]
    body = migration_source.render(message, rev_id, down, lineage, steps)
    path = directory.write_revision(message, rev_id=rev_id, lineage=lineage, graph=graph, body=body)
    path.with_suffix(".schema.json").write_text(json.dumps(new, indent=1) + "\n")
    return path
