"""What "returns what torch.load returned" means in the tests: the same structure, key order,
types, ``_metadata``, and tensors with the same dtype, shape, requires_grad and bytes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def assert_same_payload(got: Any, want: Any, where: str = "payload") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__}, not a tensor"
        assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
        facts = (want.dtype, tuple(want.shape), want.requires_grad)
        assert (got.dtype, tuple(got.shape), got.requires_grad) == facts, where
        assert torch.equal(_bytes(got.cpu()), _bytes(want.cpu())), f"{where}: different bytes"
    elif isinstance(want, Mapping):
        assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
        assert list(got) == list(want), f"{where}: keys {list(got)[:6]} vs {list(want)[:6]}"
        for k in want:
            assert_same_payload(got[k], want[k], f"{where}[{k!r}]")
        meta_got, meta_want = getattr(got, "_metadata", None), getattr(want, "_metadata", None)
        assert (meta_got is None) == (meta_want is None), f"{where}: _metadata present in one only"
        if meta_want is not None:
            assert list(meta_got.items()) == list(meta_want.items()), f"{where}._metadata differs"
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_payload(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    elif hasattr(want, "__dict__") and not isinstance(want, type):
        assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
        assert_same_payload(vars(got), vars(want), f"{where}.__dict__")
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} vs {want!r}"
