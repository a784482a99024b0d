"""Readable key reports: a 500-key mismatch reads as a few lines grouped by module prefix."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

_NUM = re.compile(r"^\d+$")


def _span(values: list[str]) -> str:
    nums = sorted({int(v) for v in values})
    if len(nums) > 2 and nums == list(range(nums[0], nums[-1] + 1)):
        return f"{{{nums[0]}..{nums[-1]}}}"
    return "{" + ",".join(map(str, nums)) + "}" if len(nums) > 1 else str(nums[0])


def group_keys(keys: Iterable[str]) -> list[str]:
    """``encoder.layer.{0..11}.attn.{k,q,v}.weight``-style lines covering every key exactly."""
    by_shape: dict[tuple[str, ...], list[list[str]]] = defaultdict(list)
    parts: tuple[str, ...]
    for key in keys:
        pieces = key.split(".")
        shape = tuple("#" if _NUM.match(p) else p for p in pieces)
        by_shape[shape].append(pieces)
    lines1: dict[tuple[str, ...], list[str]] = {}
    for shape, members in by_shape.items():
        collapsed = tuple(
            _span([m[i] for m in members]) if part == "#" else part for i, part in enumerate(shape)
        )
        lines1[collapsed] = []
    # merge lines that differ only in one non-numeric segment (q/k/v, weight/bias)
    merged: dict[tuple[str, ...], set[str]] = {}
    order: list[tuple[str, ...]] = []
    for parts in lines1:
        placed = False
        for i in range(len(parts) - 1, -1, -1):
            template = parts[:i] + ("*",) + parts[i + 1 :]
            if template in merged:
                merged[template].add(parts[i])
                placed = True
                break
        if not placed:
            for i in range(len(parts) - 1, -1, -1):
                template = parts[:i] + ("*",) + parts[i + 1 :]
                if sum(1 for p in lines1 if len(p) == len(parts) and p[:i] + ("*",) + p[i + 1 :] == template) > 1:
                    merged[template] = {parts[i]}
                    order.append(template)
                    placed = True
                    break
        if not placed:
            merged[parts] = set()
            order.append(parts)
    out = []
    for template in order:
        values = merged[template]
        if values:
            alt = next(iter(values)) if len(values) == 1 else "{" + ",".join(sorted(values)) + "}"
            out.append(".".join(alt if p == "*" else p for p in template))
        else:
            out.append(".".join(template))
    return out
