"""Readable key reports: a 500-key mismatch reads as a few lines grouped by module prefix."""

from __future__ import annotations

from collections.abc import Iterable

Line = tuple[frozenset[str], ...]


def _render(values: frozenset[str]) -> str:
    if len(values) == 1:
        return next(iter(values))
    if all(v.isdigit() for v in values):
        nums = sorted(int(v) for v in values)
        if len(nums) > 2 and nums == list(range(nums[0], nums[-1] + 1)):
            return f"{{{nums[0]}..{nums[-1]}}}"
        return "{" + ",".join(map(str, nums)) + "}"
    return "{" + ",".join(sorted(values)) + "}"


def _merge_once(lines: list[Line]) -> list[Line]:
    for position in range(max((len(line) for line in lines), default=0) - 1, -1, -1):
        merged: dict[tuple[object, ...], Line] = {}
        for line in lines:
            if len(line) <= position:
                merged[("whole", line)] = line
                continue
            rest = (len(line), position, line[:position], line[position + 1 :])
            if rest in merged:
                previous = merged[rest]
                merged[rest] = previous[:position] + (previous[position] | line[position],) + previous[position + 1 :]
            else:
                merged[rest] = line
        if len(merged) < len(lines):
            return list(merged.values())
    return lines


def group_keys(keys: Iterable[str]) -> list[str]:
    """``encoder.layer.{0..11}.attn.{k,q,v}.weight``-style lines that cover exactly the given keys.

    Two lines merge only when they differ in one dotted segment, so a line never stands for a key
    that is not there.
    """
    lines: list[Line] = list(dict.fromkeys(tuple(frozenset([p]) for p in k.split(".")) for k in keys))
    while True:
        merged = _merge_once(lines)
        if len(merged) == len(lines):
            break
        lines = merged
    return [".".join(_render(part) for part in line) for line in lines]
