"""What a key whose shape changed probably went through, by its shapes and name: a position or
patch embedding resampled to a new grid (``interpolate``), a vocabulary grown or cut (``resize``),
or neither (the old values are dropped). Each is a guess the generated script marks for review."""

from __future__ import annotations

import math
import re
from typing import Any

#: Names of position and patch embeddings (and Swin's relative position bias tables), which a new
#: image or window size resamples rather than replaces.
_EMBEDDING_GRID = re.compile(r"pos(ition)?_?emb|patch_?emb|relative_position_bias_table", re.IGNORECASE)


def interpolation(key: str, old: tuple[int, ...], new: tuple[int, ...]) -> tuple[Any, ...] | None:
    """``interpolate`` for a position embedding on a new square grid (prefix tokens kept), or a patch
    embedding's kernel at a new size, when the key's name says it is one; always a guess to review."""
    if not _EMBEDDING_GRID.search(key) or len(old) != len(new):
        return None
    if len(old) == 4 and old[:2] == new[:2]:
        note = (f"{list(old)} -> {list(new)}: by its name, an embedding whose {old[2]}x{old[3]} grid is resampled "
                f"to {new[2]}x{new[3]} (bicubic; for a patch kernel, FlexiViT's pseudo-inverse resize keeps the "
                "function better)")
        return "interpolate", ((new[2], new[3]),), (), note + _LOSSY, True
    if len(old) not in (2, 3) or old[:-2] != new[:-2] or old[-1] != new[-1]:
        return None
    for prefix in range(min(old[-2], new[-2], 9)):
        a, b = math.isqrt(old[-2] - prefix), math.isqrt(new[-2] - prefix)
        if a * a == old[-2] - prefix and b * b == new[-2] - prefix:
            tokens = f" after {prefix} prefix token{'s' if prefix > 1 else ''} (class, distillation, register)" \
                if prefix else ""
            note = (f"{list(old)} -> {list(new)}: by its name, a position embedding: its {a}x{a} grid{tokens} is "
                    f"resampled to {b}x{b} (bicubic, as timm and transformers do); check the prefix tokens and mode")
            return "interpolate", ((b, b),), (("prefix_tokens", prefix),) if prefix else (), note + _LOSSY, True
    return None


def resize(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[Any, ...] | None:
    """``resize`` when only the leading dim changed (a vocabulary, a class count); its init is a guess."""
    if not old or len(old) != len(new) or old[1:] != new[1:]:
        return None
    if new[0] > old[0]:
        note = (f"{list(old)} -> {list(new)}: the leading dim grew (a vocabulary?): the {old[0]} rows stay, the new "
                "ones start at their mean; init='zeros' or 'normal' may suit better")
        return "resize", (new,), (("init", "mean"),), note, False
    note = f"{list(old)} -> {list(new)}: the leading dim shrank (a vocabulary?): the rows from {new[0]} on are dropped"
    return "resize", (new,), (), note + _LOSSY, True


_LOSSY = "; the old values cannot be recovered, so walking back past this revision needs a downgrade()"


def resize_note(old: tuple[int, ...], new: tuple[int, ...]) -> str:
    note = f"{list(old)} -> {list(new)} is not a reshape (element counts differ): the old values are dropped"
    diff = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b] if len(old) == len(new) else []
    if len(diff) == 1:
        grew = new[diff[0]] > old[diff[0]]
        how = "pad(key, shape) keeps the old values" if grew else "truncate(key, shape) keeps a slice"
        note += f"; if only dim {diff[0]} grew or shrank (a vocabulary), ckpt.{how}"
    return note
