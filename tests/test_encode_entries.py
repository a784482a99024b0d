"""User story: "a state dict of many tensors is written back fast, exactly as torch.save writes it."

The entries of a state dict (a ``str`` key, a plain tensor) are written by compiled code
(``ckptmigrate/formats/_encode.c``) when it is built; it hands every other entry back to the
pure-Python writer. The bytes of ``data.pkl`` must be the pure writer's, byte for byte, and the
storage records assigned the same; and for a state dict torch saved, both must be the bytes
``torch.save`` wrote, memo layout and all (so that a file ckptmigrate wrote reads as fast as one
torch wrote: the reader's run decode takes torch's layout). Checked here on state dicts torch
saved (dtypes, 0-d tensors, views with offsets, shared storages and tensors, more than 256 and
more than 65,536 memo entries, non-ASCII keys, nested dicts and ``_metadata``), on hundreds of
seeded random payloads built to hit every hand-back (bits, attributes, big and odd ints, lone
surrogates, storage keys taken), and by ``torch.load`` of a file written with it.
"""

from __future__ import annotations

import collections
import io
import math
import random
import zipfile
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.formats import pickle_writer, torchzip
from ckptmigrate.formats.pickled import load
from ckptmigrate.tensors.refs import ITEMSIZE, Source, Storage, TensorRef

pytestmark = pytest.mark.skipif(pickle_writer._encode is None, reason="the compiled writer is not built")


def both(payload: Any) -> tuple[tuple[bytes, list[Any]], tuple[bytes, list[Any]]]:
    """(data.pkl, the plan's records) as the compiled and as the pure-Python writer make them."""
    out = []
    for compiled in (True, False):
        plan = torchzip._StoragePlan()
        saved = pickle_writer._encode
        if not compiled:
            pickle_writer._encode = None
        try:
            data = pickle_writer.dump(payload, plan)
        finally:
            pickle_writer._encode = saved
        out.append((data, [(key, id(storage)) for key, storage in plan.records]))
    return out[0], out[1]


def entries_in_c(payload: Any) -> int:
    """How many entries the compiled writer wrote for ``payload``."""
    counted = [0]
    real = pickle_writer._encode
    assert real is not None

    class Counting:
        @staticmethod
        def entries(*args: Any) -> tuple[bytes, int, int]:
            run, count, following = real.entries(*args)
            counted[0] += count
            return run, count, following

    pickle_writer._encode = Counting  # type: ignore[assignment]
    try:
        pickle_writer.dump(payload, torchzip._StoragePlan())
    finally:
        pickle_writer._encode = real
    return counted[0]


def data_pkl(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def saved_state_dicts() -> dict[str, Any]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
              torch.uint8, torch.bool, torch.complex64]
    base = torch.arange(300, dtype=torch.float32)
    tied = torch.randn(4, 4)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2))
    return {
        "dtypes": {f"w.{i}.{j}": torch.ones(3, 2).to(d) for i, d in enumerate(dtypes) for j in range(3)},
        "0-d and empty": {"scalar": torch.tensor(2.5), "step": torch.tensor(7), "empty": torch.zeros(0, 3)},
        "views with offsets": {"a": base[:10], "b": base[10:40].view(5, 6), "c": base[40::3],
                               "d": base[100:].view(4, 50).t(), "e": base[299:], "big": torch.zeros(70000)[65537:]},
        "shared storages and tensors": collections.OrderedDict(
            [("w", tied), ("again", tied), ("half", tied[2:]), ("other", torch.ones(2))]),
        "many dims": {"x": torch.zeros(1, 2, 1, 3, 1, 2, 1, 1, 2), "y": torch.zeros(2, 3, 4, 5)},
        "non-ASCII keys": {"first": torch.zeros(2), "second": torch.zeros(2), "é-ünïcode": torch.zeros(2),
                           "模型.权重": torch.ones(2), "emoji 🙂": torch.ones(2)},
        "requires_grad": {"g": torch.ones(3).requires_grad_(), "n": torch.ones(3)},
        "a module's state dict (_metadata)": model.state_dict(),
        "nested": {"model": model.state_dict(), "ema": {"w": torch.ones(2), "b": torch.zeros(2)}, "epoch": 3},
        "more than 65,536 memo entries": {f"layers.{i}.w": torch.full((2,), float(i)) for i in range(23_000)},
    }


@pytest.mark.parametrize("name", list(saved_state_dicts()))
def test_state_dicts_torch_saved_are_written_byte_for_byte_as_torch_wrote_them(name: str) -> None:
    saved = data_pkl(saved_state_dicts()[name])
    payload = load(saved)
    compiled, pure = both(payload)
    assert compiled == pure
    assert compiled[0] == saved
    if name in ("dtypes", "non-ASCII keys", "more than 65,536 memo entries"):  # layouts that repeat
        assert entries_in_c(payload) > 0


def test_a_large_state_dict_is_written_in_c_but_for_its_first_entry_of_each_layout() -> None:
    sd = {f"module.blocks.{i // 16}.w{i % 16}": torch.full((64,), float(i)) for i in range(3000)}
    payload = load(data_pkl(sd))
    compiled, pure = both(payload)
    assert compiled == pure
    assert entries_in_c(payload) == 2998  # the first two memoise the globals and build the opcodes of the layout


def random_payload(rng: random.Random) -> Any:
    """A state dict of tensor references, mostly of a few layouts (the common case), with one entry
    in ten made to hit a way an entry is handed back (or a writer error, for both to raise alike)."""
    dtypes = ["float32", "float16", "int64", "bool", "complex64", "float8_e4m3fn", "uint16"]
    layouts = [(rng.choice(dtypes), rng.choice([(), (64,), (3, 4), (2, 1, 5, 7)]), rng.choice([0, 0, 7]))
               for _ in range(3)]
    storages: list[Storage] = []
    refs: list[TensorRef] = []
    odd_dims = [0, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**40, -1, -(2**31), -(2**31) - 1, True, 1.0]

    def ref() -> TensorRef:
        odd = rng.random() < 0.1
        what = rng.randrange(12) if odd else -1
        if what == 0 and refs:
            return rng.choice(refs)  # the same tensor twice
        dtype, shape, offset = rng.choice(layouts)
        stride: Any = tuple(1 for _ in shape)
        if what == 1 and storages:
            storage = rng.choice(storages)  # a storage shared by views
        else:
            numel = max(1, math.prod(shape)) + offset
            # a key taken, odd text, or the text of "storage" or a device: got back from the memo
            key: Any = str(len(storages)) if what != 2 else rng.choice(
                ["0", "é", "\udc80", None, "1", "cpu", "storage", "cuda:0"])
            location = "cpu" if what != 3 else rng.choice(["cuda:0", "cpü", "\udc80"])
            nbytes: Any = numel * ITEMSIZE[dtype] + (0 if what != 4 else rng.choice([1, 2**40, -8, True]))
            storage = Storage(key, dtype, location, nbytes)
            storages.append(storage)
        if what == 5:
            shape = tuple(rng.choice(odd_dims) for _ in range(rng.choice([1, 3, 4, 8, 65, 70])))
            stride = tuple(rng.choice(odd_dims) for _ in shape)
        elif what == 6:
            offset = rng.choice([2**31, 2**40, 2**70, -3, True])
        elif what == 7:
            shape, stride = list(shape), list(stride)  # lists: written as tuples
        made = TensorRef(storage, offset, shape, stride, dtype if what != 8 else rng.choice(dtypes),
                         requires_grad=False if what != 9 else rng.choice([True, 1, 0, None]))
        if what == 10:
            made.neg, made.conj = rng.choice([(True, False), (False, True), (0, 0), (1, 0)])
        elif what == 11:
            made.extra = rng.choice([{"parameter": True}, {"parameter": False}])
        refs.append(made)
        return made

    def key(i: int) -> Any:
        if rng.random() < 0.95:
            return f"layers.{i}.w"
        return rng.choice(["é", "模", "\udc80x", "k" * 300, "", 3, None, f"layers.{i}.w"])

    def state_dict(depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = collections.OrderedDict() if rng.random() < 0.3 else {}
        for i in range(rng.choice([1, 5, 40, 300, 1001] if depth == 0 else [1, 5, 40])):
            if depth == 0 and rng.random() < 0.005:
                out[key(i)] = state_dict(depth + 1)
            elif rng.random() < 0.01:
                out[key(i)] = rng.choice([3, "text", None, [1, 2], 70000])
            else:
                out[key(i)] = ref()
        if isinstance(out, collections.OrderedDict) and rng.random() < 0.5:
            out._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
        return out

    payload = state_dict(0)
    return payload if rng.random() < 0.8 else {"model": payload, "also": [payload], "n": 1}


def outcome(payload: Any, compiled: bool) -> Any:
    """The bytes and records the writer gives, or the error it raises."""
    saved = pickle_writer._encode
    if not compiled:
        pickle_writer._encode = None
    plan = torchzip._StoragePlan()
    try:
        return pickle_writer.dump(payload, plan), [(key, id(storage)) for key, storage in plan.records]
    except Exception as exc:  # noqa: BLE001 - the pure path's error is the expected outcome
        return type(exc), str(exc)
    finally:
        pickle_writer._encode = saved


def test_random_payloads_are_written_as_the_pure_writer_writes_them() -> None:
    rng = random.Random(13)
    written = 0
    for _ in range(250):
        payload = random_payload(rng)
        expected = outcome(payload, False)
        assert outcome(payload, True) == expected
        written += entries_in_c(payload) if type(expected[0]) is bytes else 0
    assert written > 10_000, written  # the common case was common enough to matter


def test_a_file_written_with_the_compiled_writer_loads_in_torch(tmp_path: Path) -> None:
    state = saved_state_dicts()
    sd = {**state["dtypes"], **state["views with offsets"], **state["0-d and empty"], **state["non-ASCII keys"]}
    src, out = tmp_path / "src.pt", tmp_path / "out.pt"
    torch.save(sd, src)
    with closing(Source(src)) as source:
        payload, _, _, _, _ = torchzip.read(source)
        assert entries_in_c(payload) > 0
        with open(out, "wb") as fh:
            torchzip.write(fh, payload, None)
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == list(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and loaded[k].stride() == v.stride(), k
        assert torch.equal(loaded[k], v), k
