"""User story: "a state dict of many tensors is read in one pass, to exactly what the careful reading gives."

A state dict pickled as torch (or ckptmigrate's writer) pickles it is decoded directly
(``ckptmigrate.formats.pickle_direct``) instead of being scanned and then run by the unpickler. For
every pickle the result must be the general path's — the same payload (types, key order,
``_metadata``, tensors, shared tensors and storages), the same storages and globals named — or, when
the general path refuses the pickle, the same refusal. That is checked here on the pickles torch
and ckptmigrate write, on the real checkpoints and golden files re-saved by torch, and on thousands
of mutations of them: byte flips, cuts and insertions, and memo indices rewritten to what a hostile
file would put there.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickletools
import random
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.formats import pickle_direct, pickled
from ckptmigrate.formats.pickle_writer import dump
from ckptmigrate.formats.pickled import PickleFormatError, load
from ckptmigrate.formats.torchzip import _StoragePlan
from ckptmigrate.tensors.refs import Storage, TensorRef

REAL = Path("/work/shared/fixtures/real")
GOLDEN = Path(__file__).parent / "fixtures" / "format-v1"


def describe(obj: Any, seen: dict[int, int]) -> Any:
    """Everything a reader of the payload can observe, with shared objects numbered."""
    t = type(obj)
    if t is TensorRef:
        s = obj.storage
        return ("tensor", seen.setdefault(id(obj), len(seen)), seen.setdefault(id(s), len(seen)), s.key, s.dtype,
                s.location, s.nbytes, obj.storage_offset, obj.shape, obj.stride, obj.dtype, obj.requires_grad,
                obj.extra, obj.neg, obj.conj)
    if isinstance(obj, dict):
        attributes = describe(vars(obj), seen) if hasattr(obj, "__dict__") else None
        return (t.__name__, seen.setdefault(id(obj), len(seen)), [(describe(k, seen), describe(v, seen))
                                                                  for k, v in obj.items()], attributes)
    if isinstance(obj, (list, tuple)):
        return (t.__name__, [describe(v, seen) for v in obj])
    return (t.__name__, repr(obj))


def outcome(data: bytes, direct: bool) -> Any:
    """(payload, storages, globals named) as ``load`` reads them, or its refusal."""
    storages: dict[str, Storage] = {}
    named: dict[str, bool] = {}
    try:
        payload = load(data, storages, named, direct=direct)
    except PickleFormatError as exc:
        return "refused", str(exc)
    seen: dict[int, int] = {}
    return describe(payload, seen), [(k, describe(s, seen)) for k, s in storages.items()], sorted(named.items())


def decoded(data: bytes) -> bool:
    return pickle_direct.decode(data, {}, pickled._rebuild_tensor_v2) is not None


def data_pkl(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def training_checkpoint() -> dict[str, object]:
    """A model's and its optimizer's state after a step (lists, floats, tuples, int keys), as a
    training loop saves them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "loss": 0.25,
            "history": [1.5, float("nan"), -2.0], "tokens": 1 << 40, "shape": (3, (4, 5))}


@pytest.fixture(scope="module")
def pickles() -> dict[str, bytes]:
    """State dicts as torch writes them (300 tensors: one- and four-byte memo indices; 0 to 4
    dimensions; views and shared storages; ``_metadata``), training checkpoints, ckptmigrate's rewrite
    of them, and a pickle the decode leaves to the general path (a config object)."""
    many = {f"layers.{i}.w": torch.zeros((i % 3 + 1,) * (i % 5)) for i in range(300)}
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 2))
    base = torch.arange(40, dtype=torch.float16)
    shared = {"a": base[:10], "b": base[10:].view(5, 6), "c": torch.ones(3, dtype=torch.bfloat16),
              "é-ünïcode": torch.zeros(2, dtype=torch.int8), "d": base[::2]}
    tied = torch.randn(4, 4)
    out = {
        "torch.save(dict)": data_pkl(many),
        "torch.save(state_dict())": data_pkl(model.state_dict()),
        "shared storages": data_pkl(shared),
        "a tensor twice": data_pkl(collections.OrderedDict([("w", tied), ("tied", tied),
                                                            ("grad", tied.requires_grad_())])),
        "plain values beside tensors": data_pkl({"w": torch.ones(2), "epoch": 3, "name": "x", "best": None,
                                                 "big": 70000, "neg": -5, "flag": True}),
        "a nested checkpoint": data_pkl({"model": collections.OrderedDict(many), "tied": [many["layers.7.w"]] * 2}),
        "a training checkpoint": data_pkl(training_checkpoint()),
        "a config object": data_pkl({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}),
        "an empty dict": data_pkl({}),
        "a bare tensor": data_pkl(torch.arange(6).reshape(2, 3)),
    }
    for name in ["torch.save(dict)", "torch.save(state_dict())", "shared storages", "plain values beside tensors",
                 "a training checkpoint"]:
        out[f"ckptmigrate's writer: {name}"] = dump(load(out[name]), _StoragePlan())
    return out


def test_state_dicts_are_decoded_to_what_the_general_path_reads(pickles: dict[str, bytes]) -> None:
    for name, data in pickles.items():
        assert outcome(data, True) == outcome(data, False), name
    undecoded = {name for name, data in pickles.items() if not decoded(data)}
    assert undecoded == {"a config object"}  # a global it does not know: the general path's


def test_real_and_golden_checkpoints_resaved_by_torch_are_decoded_alike() -> None:
    files = [*sorted(REAL.glob("*.pth")), *sorted(GOLDEN.glob("*.pth"))]
    assert len(files) >= 4
    for path in files:
        data = data_pkl(torch.load(path, map_location="cpu", weights_only=True))
        assert outcome(data, True) == outcome(data, False), path.name
        assert decoded(data), path.name


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        at = rng.randrange(len(out))
        kind = rng.random()
        if kind < 0.6:
            out[at] = rng.randrange(256)
        elif kind < 0.8:
            del out[at : at + rng.randint(1, 8)]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 8))
    return bytes(out)


def test_random_mutations_get_the_same_result_or_the_same_refusal(pickles: dict[str, bytes]) -> None:
    rng = random.Random(13)
    corpus = [data for name, data in pickles.items() if decoded(data)]
    refused = still_decoded = 0
    for trial in range(1500):
        data = mutate(rng, rng.choice(corpus))
        direct = outcome(data, True)
        assert direct == outcome(data, False), (trial, data)
        refused += direct[0] == "refused"
        still_decoded += decoded(data)
    assert refused > 100 and still_decoded > 0  # both sides of the decode are reached


def test_changed_values_get_the_same_result_or_the_same_refusal(pickles: dict[str, bytes]) -> None:
    """Mutations that keep the opcodes: an int (an offset, a size, a storage's length), a string's
    characters (a key, a storage key, a location), requires_grad, a global's name."""
    rng = random.Random(11)
    refused = still_decoded = 0
    for name, data in pickles.items():
        if not decoded(data):
            continue
        ops = [(op.name, pos) for op, _arg, pos in pickletools.genops(data)
               if op.name in ("BININT1", "BININT2", "BININT", "BINUNICODE", "NEWTRUE", "GLOBAL", "BINFLOAT",
                              "LONG1")]
        for _ in range(200 if ops else 0):  # an empty dict has none
            op, pos = rng.choice(ops)
            out = bytearray(data)
            if op == "NEWTRUE":
                out[pos] = 0x89
            elif op == "BINUNICODE":
                n = int.from_bytes(data[pos + 1 : pos + 5], "little")
                if not n:
                    continue
                out[pos + 5 + rng.randrange(n)] = rng.choice(b"0123456789:/a\x00\xff")
            elif op == "GLOBAL":
                out[pos + 1 + rng.randrange(data.index(b"\n", pos) - pos - 1)] = rng.choice(b"_.aAS")
            else:
                width = {"BININT1": 1, "BININT2": 2, "BININT": 4, "BINFLOAT": 8, "LONG1": 1}[op]
                out[pos + 1 + rng.randrange(width)] = rng.randrange(256)
            direct = outcome(bytes(out), True)
            assert direct == outcome(bytes(out), False), (name, op, pos)
            refused += direct[0] == "refused"
            still_decoded += decoded(bytes(out))
    assert refused > 20 and still_decoded > 300


def test_hostile_memo_indices_get_the_same_result_or_the_same_refusal(pickles: dict[str, bytes]) -> None:
    rng = random.Random(7)
    refused = 0
    for name, data in pickles.items():
        ops = [(op.name, pos, arg) for op, arg, pos in pickletools.genops(data)]
        memo_ops = [op for op in ops if op[0] in ("BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET")]
        if not memo_ops:
            continue
        puts = [arg for op, _pos, arg in ops if op in ("BINPUT", "LONG_BINPUT")]
        for _ in range(150):
            op, pos, arg = rng.choice(memo_ops)
            index = max(0, rng.choice([rng.choice(puts), arg + rng.randint(-3, 3), rng.randrange(1 << 31),
                                       rng.choice(puts[-40:])]))
            if op.startswith("LONG"):
                mutated = data[: pos + 1] + index.to_bytes(4, "little") + data[pos + 5 :]
            else:
                mutated = data[: pos + 1] + bytes([index % 256]) + data[pos + 2 :]
            direct = outcome(mutated, True)
            assert direct == outcome(mutated, False), (name, op, pos, index)
            refused += direct[0] == "refused"
    assert refused > 50
