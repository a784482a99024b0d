"""User story: "thousands of tensors are decoded a run at a time, to exactly what the careful reading gives."

Past its first ~30 tensors, torch pickles every key and tensor of a state dict as the same opcodes
with other numbers in them, and ``ckptmigrate.formats.pickle_direct`` decodes a run of them with C
loops over regex matches (the "tiles"), or, where it is built, with ``_tiles.c``: every story here
holds for both. A tile is taken only when the run tiles the bytes exactly as the opcode-by-opcode
read would read them; anything else is left to that read. Checked here by
comparing with the general path (scan + restricted unpickler) on files torch writes with many
dtypes, shapes, views and shared storages, keys that hide a tensor's opcodes or are long, other
pickle protocols, and mutations aimed inside the runs.
"""

from __future__ import annotations

import io
import pickletools
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from test_pickle_direct import decoded, outcome

from ckptmigrate.api import stamp
from ckptmigrate.formats import native, pickle_direct, pickled
from ckptmigrate.formats.pickle_direct import _TILE_BODY, _Decoder
from ckptmigrate.formats.pickle_writer import dump
from ckptmigrate.formats.torchzip import _StoragePlan

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool,
          torch.float64, torch.complex64]


def data_pkl(obj: object, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_protocol=protocol)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def many_kinds(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` tensors of every dtype, 0 to 4 dimensions, views at offsets into shared storages,
    tensors listed twice, requires_grad, non-ASCII keys."""
    rng = random.Random(seed)
    base = torch.arange(4096, dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        kind = rng.random()
        if kind < 0.55:
            dims = rng.randrange(5)
            t = torch.zeros(tuple(rng.randint(0, 3) for _ in range(dims)), dtype=rng.choice(DTYPES))
        elif kind < 0.75:  # a view of a shared storage, at an offset, maybe strided
            start = rng.randrange(1000)
            t = base[start : start + 64 : rng.choice([1, 2])]
            if rng.random() < 0.5:
                t = t[: 30].view(5, 6) if t.is_contiguous() else t
        elif kind < 0.85 and out:  # the same tensor again
            t = out[rng.choice(list(out))]
        elif kind < 0.92:
            t = torch.tensor(float(i))  # 0-d
        else:
            t = torch.ones(3, requires_grad=True)
        key = f"layers.{i}.{'wéight' if i % 97 == 0 else 'w'}"
        out[key] = t
    return out


@pytest.fixture(autouse=True, params=["compiled", "python"])
def runs_decoded_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every story here holds for the compiled decode of the runs (``_tiles.c``) and the Python one."""
    if request.param == "python":
        monkeypatch.setattr(pickle_direct, "_tiles", None)
    elif native.pure_python():
        pytest.skip(f"{native.PURE_PYTHON_ENV} is set")
    else:
        assert pickle_direct._tiles is not None, "_tiles.c is not built: run scripts/setup.sh"
    return str(request.param)


def tiled(data: bytes) -> int:
    """How many tensors the decode of ``data`` took in runs (each puts eight memo entries)."""
    count = 0
    original = _Decoder.tiles

    def counting(self: _Decoder, pos: int, stack: list[Any]) -> Any:
        nonlocal count
        before = len(self.memo)
        got = original(self, pos, stack)
        count += (len(self.memo) - before) // 8 if got is not None else 0
        return got

    _Decoder.tiles = counting  # type: ignore[method-assign]
    try:
        pickle_direct.decode(data, {}, pickled._rebuild_tensor_v2)
    finally:
        _Decoder.tiles = original  # type: ignore[method-assign]
    return count


@pytest.fixture(scope="module")
def big() -> bytes:
    return data_pkl(many_kinds(2500))


def units(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every key and its tensor in ``data`` that a run may decode: a BINUNICODE
    followed by a tensor in the run's form."""
    out = []
    for op, arg, pos in pickletools.genops(data):
        if op.name == "BINUNICODE":
            m = pickle_direct._TILE.match(data, pos)
            if m is not None and m.end(2) == pos + 5 + len(arg.encode("utf-8", "surrogatepass")):
                out.append((pos, m.end()))
    return out


def test_thousands_of_tensors_of_every_kind_decode_alike_and_mostly_in_runs(big: bytes) -> None:
    assert outcome(big, True) == outcome(big, False)
    assert decoded(big)
    # plain new storages are decoded in runs; shared ones, tensors met before and the first ~30 are not
    assert tiled(big) > 1000


def test_a_plain_state_dict_is_decoded_in_runs_across_setitems_batches() -> None:
    data = data_pkl({f"module.blocks.{i // 16}.w{i % 16}": torch.full((4,), float(i)) for i in range(2600)})
    assert outcome(data, True) == outcome(data, False)
    assert tiled(data) >= 2500


def test_keys_that_hide_a_tensor_or_are_long_are_read_opcode_by_opcode() -> None:
    sd = {f"layers.{i}.weight": torch.zeros(4) for i in range(600)}
    sd[f"layers.{'l' * 3000}"] = torch.ones(3)  # longer than a run's key may be
    sd.update({f"more.{i}": torch.zeros(2) for i in range(300)})
    data = data_pkl(sd)
    assert outcome(data, True) == outcome(data, False)
    assert decoded(data)
    # a key whose bytes hold a whole tensor's opcodes (the next one's): a run that split the key
    # there would read another key and tensor than the opcode-by-opcode read
    spans = units(data)
    for start, end in spans[100:400:37]:
        key_len = int.from_bytes(data[start + 1 : start + 5], "little")
        after, _ = next(s for s in spans if s[0] == end)
        body = data[end + 5 + int.from_bytes(data[end + 1 : end + 5], "little") : next(
            e for s, e in spans if s == after)]
        key = b"x" + body + b"y"
        hidden = data[:start + 1] + len(key).to_bytes(4, "little") + key + data[start + 5 + key_len :]
        assert outcome(hidden, True) == outcome(hidden, False)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_other_pickle_protocols_get_the_same_result(protocol: int) -> None:
    data = data_pkl(many_kinds(400, seed=protocol), protocol)
    assert outcome(data, True) == outcome(data, False)


def test_mutations_inside_the_runs_get_the_same_result_or_the_same_refusal() -> None:
    """Each mutation aimed at a unit in a run: a key length one off, a memo index one off, a storage
    key's length or digits changed, a storage key repeated, a get moved, requires_grad
    flipped, a byte flipped anywhere in the unit."""
    data = data_pkl({f"m.{i}.w": torch.zeros(i % 4 + 1) for i in range(700)})
    spans = units(data)
    assert len(spans) > 600
    rng = random.Random(5)
    refused = decoded_after = 0
    for trial in range(400):
        start, end = rng.choice(spans)
        out = bytearray(data)
        kind = trial % 6
        if kind == 0:  # the key's length field
            n = int.from_bytes(out[start + 1 : start + 5], "little")
            out[start + 1 : start + 5] = (n + rng.choice([-1, 1])).to_bytes(4, "little")
        elif kind == 1:  # a LONG_BINPUT or BINGET argument
            ops = [i for i in range(start, end - 4) if out[i] in (0x72, 0x68, 0x6A)]
            at = rng.choice(ops)
            out[at + 1] = (out[at + 1] + rng.choice([-1, 1, 7])) % 256
        elif kind == 2:  # the storage key: its digits or its length byte
            body = _TILE_BODY.match(data, start + 5 + int.from_bytes(data[start + 1 : start + 5], "little"))
            assert body is not None
            at = body.start(6)
            if rng.random() < 0.5:
                out[at] = rng.choice(b"0123456789")
            else:
                out[at - 4] = (out[at - 4] + 1) % 128
        elif kind == 3:  # another unit's storage key bytes copied over this one's (same length)
            other_start, _ = rng.choice(spans)
            a = _TILE_BODY.match(data, start + 5 + int.from_bytes(data[start + 1 : start + 5], "little"))
            b = _TILE_BODY.match(data, other_start + 5 + int.from_bytes(data[other_start + 1 : other_start + 5],
                                                                           "little"))
            assert a is not None and b is not None
            if len(a[6]) != len(b[6]):
                continue
            out[a.start(6) : a.end(6)] = b[6]
        elif kind == 4:  # requires_grad flipped
            at = data.find(b"\x89", start, end)
            out[at] = 0x88
        else:
            at = rng.randrange(start, end)
            out[at] = rng.randrange(256)
        mutated = bytes(out)
        direct = outcome(mutated, True)
        assert direct == outcome(mutated, False), (trial, kind, start)
        refused += direct[0] == "refused"
        decoded_after += decoded(mutated)
    assert refused > 20 and decoded_after > 100


def live_data_pkl(path: Path) -> bytes:
    """The ``data.pkl`` that ``torch.load`` of ``path`` reads (the live central directory's)."""
    with zipfile.ZipFile(path) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


def test_a_file_ckptmigrate_wrote_is_decoded_in_runs_as_torchs_own(tmp_path: Path) -> None:
    sd = {f"model.layers.{i // 8}.w{i % 8}": torch.full((4,), float(i)) for i in range(1200)}
    original = tmp_path / "torch.pt"
    torch.save(sd, original)
    by_torch = live_data_pkl(original)
    assert tiled(by_torch) >= 1100
    in_place = tmp_path / "in_place.pt"
    shutil.copyfile(original, in_place)
    stamp(in_place)
    for written in (in_place, stamp(original, output=tmp_path / "rewritten.pt")):
        assert live_data_pkl(written) == by_torch  # the envelope is a record of its own
    # a rename: what torch.save of the renamed state dict writes, so it is decoded in runs as that is
    renamed = {k.replace("model.", "backbone."): v for k, v in pickled.load(by_torch).items()}
    data = dump(renamed, _StoragePlan())
    assert data == data_pkl({k.replace("model.", "backbone."): v for k, v in sd.items()})
    assert outcome(data, True) == outcome(data, False)
    assert tiled(data) == tiled(by_torch)
