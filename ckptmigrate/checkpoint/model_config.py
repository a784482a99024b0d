"""The model's configuration, as a migration sees it in ``ckpt.config``: head counts and sizes that
ops read instead of hard-coded numbers.

Found, in order: what the caller set (a model factory's ``config``), Lightning's
``hyper_parameters`` in the file, and a Hugging Face ``config.json`` beside it. Only plain values
are kept (numbers, strings, booleans, lists and dicts of them): inert pickled objects stay out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MAX_CONFIG_JSON = 1 << 20


def plain(value: Any, depth: int = 0, _path: frozenset[int] = frozenset()) -> Any:
    """``value`` if it is plain JSON-like data (dicts and lists of numbers, strings, ...), else None.
    A reference cycle (a pickle may hold one) is not plain data: it becomes None where it closes."""
    if depth > 20 or id(value) in _path:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    path = _path | {id(value)}
    if isinstance(value, Mapping):
        out = {k: plain(v, depth + 1, path) for k, v in value.items() if isinstance(k, str)}
        return {k: v for k, v in out.items() if v is not None or value.get(k) is None}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1, path) for v in value]
    return None


def of_model(model: Any) -> dict[str, Any]:
    """A model's own configuration: ``model.config`` (a dict, a dataclass or an HF ``PretrainedConfig``)."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif hasattr(config, "__dataclass_fields__"):
        import dataclasses

        config = dataclasses.asdict(config)
    elif not isinstance(config, Mapping):
        config = vars(config) if hasattr(config, "__dict__") else {}
    return plain(config) or {}


def find(extras: Mapping[str, Any], path: Path | None) -> dict[str, Any]:
    """The configuration stored with a checkpoint: Lightning hyper-parameters, else config.json."""
    hparams = plain(extras.get("hyper_parameters"))
    if isinstance(hparams, dict) and hparams:
        return hparams
    if path is not None:
        candidate = path.parent / "config.json"
        try:
            if candidate.is_file() and candidate.stat().st_size <= MAX_CONFIG_JSON:
                data = json.loads(candidate.read_text())
                if isinstance(data, dict):
                    return plain(data) or {}
        except (OSError, ValueError):
            return {}
    return {}
