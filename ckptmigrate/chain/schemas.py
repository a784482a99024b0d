"""Where a schema comes from: the current model (built on ``meta``), a revision's snapshot, a file.

The model is named ``pkg.module:factory`` — in ``[tool.ckptmigrate] model`` or ``--model`` — and is
built on the ``meta`` device, so even a model whose weights would not fit in memory costs nothing.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from ckptmigrate.chain import config
from ckptmigrate.checkpoint.envelope import Schema, schema_of
from ckptmigrate.errors import BadInput
from ckptmigrate.util.urls import as_location, is_remote


def import_object(spec: str, what: str = "model") -> Any:
    """The object named ``pkg.module:attr`` (the project root is importable); BadInput names ``what``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BadInput(f"{what} {spec!r}: expected pkg.module:factory")
    cfg = config.load()
    if cfg.root is not None and cfg.problem is None and str(cfg.root) not in sys.path:
        sys.path.insert(0, str(cfg.root))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadInput(f"{what} {spec!r}: cannot import {module_name} ({exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise BadInput(f"{what} {spec!r}: {module_name} has no attribute {attr}")
    return obj


def build_model(spec: str, *, device: str = "meta") -> Any:
    """Call the factory ``pkg.module:factory`` on ``device``."""
    import torch

    factory = import_object(spec)
    if not callable(factory):
        raise BadInput(f"model {spec!r}: {spec.partition(':')[2]} is not callable")
    try:
        with torch.device(device):
            model = factory()
    except Exception as exc:  # noqa: BLE001 - the project's own code can raise anything
        raise BadInput(f"model {spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def model_spec(explicit: str | None) -> str:
    if explicit:
        return explicit
    cfg = config.load()
    if not cfg.model:
        error = BadInput("no model configured: name one as pkg.module:factory, or set [tool.ckptmigrate] model")
        error.cli_hint = "pass --model pkg.module:factory"
        raise error
    cfg.require_trusted("model code")
    return cfg.model


def model_schema(spec: str) -> Schema:
    return schema_of(build_model(spec).state_dict())


def resolve(source: str, *, graph: Any = None, model: str | None = None) -> tuple[str, Schema]:
    """``model``, a revision id, or a checkpoint path or URL → (label, schema)."""
    from ckptmigrate.checkpoint.lazy import Checkpoint

    if source == "model":
        spec = model_spec(model)
        return f"model {spec}", model_schema(spec)
    if is_remote(source) or Path(source).exists():
        with Checkpoint.open(source) as ckpt:
            return str(as_location(source)) if is_remote(source) else str(source), ckpt.schema()
    if graph is not None:
        rev = graph.get(source)
        snapshot = rev.schema()
        if snapshot is None:
            raise BadInput(f"revision {rev.id} has no schema snapshot ({rev.schema_path} is missing)")
        return f"revision {rev.id}", snapshot
    raise BadInput(f"{source}: neither a file, a revision nor `model`")
