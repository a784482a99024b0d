"""User story: "a state dict of many tensors is checked fast, and exactly as strictly as before."

The safety scan that runs before the unpickler steps over a tensor pickled as torch (or ckptmigrate's
writer) pickles it in one regex match instead of thirty opcodes. It must give the verdict the
opcode-by-opcode reading gives — accept, or refuse with the same message — on the pickles ``torch.save``
and ckptmigrate write, and on every mutation of them: random byte flips, cuts and insertions, and
memo indices (the scan's memo checks) rewritten to what a hostile file would put there: a put past
the opcodes read, a get of a tuple put earlier, an index put twice.
"""

from __future__ import annotations

import collections
import io
import pickletools
import random
import zipfile

import pytest
import torch

from ckptmigrate.formats.pickle_scan import PickleFormatError, scan
from ckptmigrate.formats.pickle_writer import dump
from ckptmigrate.formats.pickled import load
from ckptmigrate.formats.torchzip import _StoragePlan


def verdict(data: bytes, whole_tensors: bool) -> str | None:
    try:
        scan(data, whole_tensors=whole_tensors)
    except PickleFormatError as exc:
        return str(exc)
    return None


def data_pkl(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


@pytest.fixture(scope="module")
def pickles() -> dict[str, bytes]:
    """torch's pickles (300 tensors: one-byte and four-byte memo indices; 0 to 4 dimensions) and
    ckptmigrate's rewrite of one."""
    many = {f"layers.{i}.w": torch.zeros((i % 3 + 1,) * (i % 5)) for i in range(300)}
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    torch_pickle = data_pkl(many)
    out = {
        "torch.save(dict)": torch_pickle,
        "torch.save(state_dict())": data_pkl(model.state_dict()),
        "torch.save(checkpoint)": data_pkl({"model": collections.OrderedDict(many), "epoch": 3,
                                            "tied": [many["layers.7.w"]] * 2}),
        "ckptmigrate's writer": dump(load(torch_pickle), _StoragePlan()),
    }
    return out


def test_the_pickles_are_read_whole_and_accepted(pickles: dict[str, bytes]) -> None:
    for name, data in pickles.items():
        assert verdict(data, True) is None, name
        assert verdict(data, False) is None, name


def test_random_mutations_get_the_same_verdict(pickles: dict[str, bytes]) -> None:
    rng = random.Random(13)
    refused = 0
    for trial in range(1500):
        data = bytearray(rng.choice(list(pickles.values())))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            kind = rng.random()
            if kind < 0.6:
                data[at] = rng.randrange(256)
            elif kind < 0.8:
                del data[at : at + rng.randint(1, 8)]
            else:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
        whole, by_opcode = verdict(bytes(data), True), verdict(bytes(data), False)
        assert whole == by_opcode, (trial, bytes(data))
        refused += whole is not None
    assert refused > 100  # the mutations reach the checks


def test_hostile_memo_indices_get_the_same_verdict(pickles: dict[str, bytes]) -> None:
    rng = random.Random(7)
    refused = 0
    for name, data in pickles.items():
        ops = [(op.name, pos, arg) for op, arg, pos in pickletools.genops(data)]
        memo_ops = [(i, op) for i, op in enumerate(ops) if op[0] in ("BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET")]
        puts = [arg for op, _pos, arg in ops if op in ("BINPUT", "LONG_BINPUT")]
        for _ in range(600):
            i, (op, pos, arg) = rng.choice(memo_ops)
            index = max(0, rng.choice([
                rng.choice(puts),  # another entry: maybe a tuple, maybe put again
                i + rng.randint(-3, 3),  # around the opcodes read so far
                arg + rng.randint(-8, 8),  # a neighbour in the same tensor
                rng.randrange(1 << 31),  # far past what was read
                rng.choice(puts[-40:]),
            ]))
            if op.startswith("LONG"):
                mutated = data[: pos + 1] + index.to_bytes(4, "little") + data[pos + 5 :]
            else:
                mutated = data[: pos + 1] + bytes([index % 256]) + data[pos + 2 :]
            whole, by_opcode = verdict(mutated, True), verdict(mutated, False)
            assert whole == by_opcode, (name, op, pos, index)
            refused += whole is not None
    assert refused > 50
