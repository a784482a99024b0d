"""Rename rules autogenerate infers from pairs of keys: a prefix swap, one key, or a regex whose
groups are the layer indices both names share, so that one op covers every layer."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ckptmigrate.autogenerate.keys import regex, similarity


@dataclass(frozen=True)
class Rule:
    """A rename of every key the pattern matches: a prefix swap, one key, or a regex across layers."""

    op: str  # rename_prefix | rename | rename_regex
    old: str
    new: str
    lead: str  # literal text every matching key starts with
    groups: int

    @property
    def shown(self) -> tuple[str, str]:
        """Both sides for people: ``encoder.layer.N.attention.output.`` → ``layers.N.self_attn.``."""
        if self.op != "rename_regex":
            return self.old, self.new
        tail = self.old.endswith(r"(.+)")
        src = re.sub(r"\\(.)", r"\1", self.old.removesuffix(r"(.+)").replace(r"(\d+)", "N"))
        dst = re.sub(r"\\(\d+|g<\d+>)", "N", self.new)
        return src, dst.rsplit("N", 1)[0] if tail else dst

    @property
    def similarity(self) -> float:
        return similarity(*self.shown)

    def apply(self, key: str) -> str | None:
        if not key.startswith(self.lead):
            return None
        if self.op == "rename_prefix":
            return self.new + key[len(self.old):]
        if self.op == "rename":
            return self.new if key == self.old else None
        m = regex(self.old).fullmatch(key)
        return m.expand(self.new) if m else None


def common_prefixes(keys: Iterable[str]) -> list[str]:
    """Every dotted prefix all keys share (``""`` included), never a whole key."""
    common: list[str] = os.path.commonprefix([k.split(".")[:-1] for k in keys]) or []  # type: ignore[assignment]
    return ["".join(s + "." for s in common[:i]) for i in range(len(common) + 1)]


def subsequence(short: tuple[str, ...], long: tuple[str, ...]) -> bool:
    it = iter(long)
    return len(short) < len(long) and all(s in it for s in short)


def generalise(src: list[str], dsts: list[list[str]]) -> tuple[str, list[str], int, str]:
    """src as a regex whose digit segments that reappear in the dsts are groups; the dsts as templates."""
    refs: list[dict[int, int]] = []
    for dst in dsts:
        ref: dict[int, int] = {}
        for j, s in enumerate(dst):
            i = next((i for i, t in enumerate(src) if s.isdigit() and t == s and i not in ref.values()), None)
            if i is not None:
                ref[j] = i
        refs.append(ref)
    groups = sorted({i for ref in refs for i in ref.values()})
    num = {i: n + 1 for n, i in enumerate(groups)}
    pattern = r"\.".join(r"(\d+)" if i in num else re.escape(s) for i, s in enumerate(src))
    templates = [".".join(_backref(num[ref[j]]) if j in ref else s for j, s in enumerate(dst))
                 for dst, ref in zip(dsts, refs, strict=True)]
    lead = "".join(s + "." for s in src[: groups[0]]) if groups else ".".join(src)
    return pattern, templates, len(groups), lead


def _backref(n: int) -> str:
    return f"\\{n}" if n < 10 else f"\\g<{n}>"


def rule_for(old: str, new: str) -> Rule | None:
    """The rename that moves ``old`` to ``new``: the differing prefix when the tails agree, else the whole key."""
    os_, ns = old.split("."), new.split(".")
    c = 0
    while c < min(len(os_), len(ns)) and os_[-1 - c] == ns[-1 - c]:
        c += 1
    if c == 0:
        if os_[:-1] != ns[:-1] and similarity(old, new) < 0.6:
            return None
        pattern, (tpl,), n, lead = generalise(os_, [ns])
        return Rule("rename_regex", pattern, tpl, lead, n) if n else Rule("rename", old, new, old, 0)
    p, q = os_[:-c], ns[:-c]
    pattern, (tpl,), n, lead = generalise(p, [q])
    if n:
        return Rule("rename_regex", pattern + r"\.(.+)", (tpl + "." if q else "") + _backref(n + 1), lead, n)
    pre, post = "".join(s + "." for s in p), "".join(s + "." for s in q)
    return Rule("rename_prefix", pre, post, pre, 0)


def conflict(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Two renames that send one key to different places, or different keys to one place."""
    inv = {v: k for k, v in b.items()}
    return any((k in b and b[k] != v) or (v in inv and inv[v] != k) for k, v in a.items())
