"""User story: "Whatever bytes I am handed, if ckptmigrate accepts the file, torch loads exactly the
tensors ckptmigrate read and hashed."

A differential fuzz test of the zip reader against torch itself. Real archives — a ``torch.save``
file with shared storages and several dtypes, the same file after two in-place appends (superseded
``data.pkl``, directories and end records inside), an out-of-place rewrite that left two torch
records dead, and a file crafted structure by structure — are mutated: bytes flipped, inserted,
deleted and duplicated; header, count, size and offset fields set to interesting values; names
re-cased or cut with a NUL in one or every copy; records and end records appended; tails cut.
Whenever ``Checkpoint.open`` accepts the result, ``torch.load(weights_only=True)`` and
``torch.load(mmap=True)`` must both load it, with the same keys, dtypes, shapes and bytes as
ckptmigrate's ``materialize()`` (what ``verify``'s digest hashes). A refusal is always allowed.

``CKPTMIGRATE_FUZZ_EXAMPLES`` sets the hypothesis examples (default 150) and the seeded sweep's
cases (default 400; about 25 s in all on two cores); ``CI`` derandomizes the run.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zipcraft import layout_of

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.formats import torchzip

EXAMPLES = int(os.environ.get("CKPTMIGRATE_FUZZ_EXAMPLES", "150"))
SWEEP = max(EXAMPLES * 8 // 3, 50)
IN_CI = bool(os.environ.get("CI"))
SIGNATURES = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"PK\x07\x08")
NAMES = (b"data.pkl", b"data/0", b"data/1", b"version", b"byteorder", b".format_version", b"ckptmigrate.json")


def state_dict() -> dict[str, torch.Tensor]:
    base = torch.arange(12, dtype=torch.float32)
    return {"a": base, "view": base[3:7], "b": torch.ones(3, dtype=torch.int64), "h": torch.rand(5).half(),
            "m": torch.eye(3)}


def build_bases(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    plain = root / "plain.pt"
    torch.save(state_dict(), plain)
    appended = root / "appended.pt"
    shutil.copy(plain, appended)
    for old, new in (("a", "a2"), ("m", "m2")):
        with Checkpoint.open(appended) as ckpt:
            ckpt.rename(old, new)
            ckpt.write(appended, None)
    dropped = root / "dropped.pt"
    with Checkpoint.open(plain) as ckpt:
        ckpt.drop("b")
        ckpt.drop("h")
        ckpt.write(dropped, None)
    return {"plain": plain.read_bytes(), "appended": appended.read_bytes(), "dropped": dropped.read_bytes(),
            "crafted": layout_of({"w": torch.arange(4.0), "x": torch.ones(2)}).build()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return build_bases(tmp_path_factory.mktemp("bases"))


# -- mutations ----------------------------------------------------------------------------------------


def structure_offsets(data: bytes) -> list[int]:
    out = []
    for sig in SIGNATURES:
        at = data.find(sig)
        while at >= 0:
            out.append(at)
            at = data.find(sig, at + 1)
    return sorted(out) or [0]


def interesting(data: bytes, offsets: list[int]) -> list[int]:
    n = len(data)
    return [0, 1, 2, 0x7F, 0xFF, 0xFFFF, 0xFFFFFFFF, n, n - 22, n + 1, n - 1, *offsets[:8],
            *(o + 30 for o in offsets[:4])]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutation, chosen and placed by ``rng``, biased towards zip structures and names."""
    buf = bytearray(data)
    offsets = structure_offsets(data)
    kind = rng.choice(["flip", "field", "field", "insert", "delete", "duplicate", "append", "case", "nul",
                       "truncate", "swap"])
    near = min(len(buf) - 1, rng.choice(offsets) + rng.randrange(64)) if rng.random() < 0.8 else rng.randrange(len(buf))
    if kind == "flip":
        buf[near] ^= rng.randrange(1, 256)
    elif kind == "field":
        width = rng.choice([2, 4, 8])
        value = rng.choice(interesting(data, offsets)) % (1 << (8 * width))
        at = min(near, len(buf) - width)
        buf[at : at + width] = value.to_bytes(width, "little")
    elif kind == "insert":
        filler = rng.choice([bytes(rng.randrange(1, 65)), os.urandom(rng.randrange(1, 65)), rng.choice(SIGNATURES)])
        buf[near:near] = filler
    elif kind == "delete":
        del buf[near : near + rng.randrange(1, 65)]
    elif kind == "duplicate":
        start = rng.choice(offsets)
        piece = data[start : start + rng.randrange(4, 120)]
        at = rng.choice(offsets + [len(buf)])
        buf[at:at] = piece
    elif kind == "append":
        tail = rng.choice([data[-22:], data[-98:], data[rng.choice(offsets):], data])
        buf += tail
    elif kind in ("case", "nul"):
        name = rng.choice(NAMES)
        hits = [i for i in range(len(buf)) if buf.startswith(name, i)]
        if hits:
            chosen = hits if rng.random() < 0.5 else [rng.choice(hits)]
            pos = rng.randrange(len(name))
            for i in chosen:
                if kind == "nul":
                    buf[i + pos] = 0
                else:
                    buf[i + pos] = ord(chr(buf[i + pos]).swapcase()) if chr(buf[i + pos]).isalpha() else buf[i + pos]
    elif kind == "truncate":
        del buf[rng.randrange(1, len(buf)) :]
    else:  # swap two structures' first bytes
        a, b = rng.choice(offsets), rng.choice(offsets)
        buf[a : a + 4], buf[b : b + 4] = data[b : b + 4], data[a : a + 4]
    return bytes(buf)


#: Records a well-formed append may add or replace (relative to the archive folder), and contents.
RECORD_NAMES = ("byteorder", "BYTEORDER", "version", ".data/version", ".DATA/VERSION", "data.pkl", "DATA.PKL",
                "data/0", "Data/0", "data/9", "constants.pkl", ".storage_alignment", ".format_version", "x")
CONTENTS = (b"big", b"little", b"9\n", b"11\n", b"", b"64", b"sixty-four")


def append_record(data: bytes, rng: random.Random, scratch: Path) -> bytes:
    """A well-formed in-place append of one record (ckptmigrate's own writer): names that collide
    ignoring case, records torch reads before the payload, a replaced data.pkl or storage."""
    scratch.write_bytes(data)
    other = {name.split("/", 1)[1]: body for name, body in layout_records()}
    content = rng.choice([*CONTENTS, other["data.pkl"], other["data/0"], os.urandom(rng.randrange(1, 64))])
    try:
        with open(scratch, "r+b") as fh:
            torchzip.append_records(fh, {rng.choice(RECORD_NAMES): content})
    except (torchzip.TorchZipError, ValueError):
        return data
    return scratch.read_bytes()


def layout_records() -> list[tuple[str, bytes]]:
    return [(r.name.decode(), r.data) for r in layout_of({"w": torch.full((4,), 666.0)}).recs]


# -- the oracle ----------------------------------------------------------------------------------------


@dataclass
class Tally:
    cases: int = 0
    accepted: int = 0


def agree(path: Path, tally: Tally) -> None:
    """If ckptmigrate accepts ``path``, torch must load exactly what it read."""
    tally.cases += 1
    try:
        with Checkpoint.open(path) as ckpt:
            ours = {k: v.clone() for k, v in ckpt.materialize().items()}
    except BadInput:
        return
    tally.accepted += 1
    for mmap in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                theirs = torch.load(path, weights_only=True, mmap=mmap)
            except Exception as exc:  # noqa: BLE001 - any failure of torch on an accepted file is the bug
                raise AssertionError(f"ckptmigrate accepted it, torch.load(mmap={mmap}) failed: {exc}") from exc
        assert isinstance(theirs, dict) and list(theirs) == list(ours), (mmap, list(theirs), list(ours))
        for key, value in theirs.items():
            mine = ours[key]
            assert (value.dtype, value.shape, value.stride()) == (mine.dtype, mine.shape, mine.stride()), key
            assert value.contiguous().view(torch.uint8).tolist() == mine.contiguous().view(torch.uint8).tolist(), key


HYPOTHESIS = Tally()  # what the hypothesis test ran, reported by the sweep after it


def test_every_base_archive_is_accepted_and_agrees(bases: dict[str, bytes], tmp_path: Path) -> None:
    tally = Tally()
    for name, data in bases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        agree(path, tally)
    assert tally.accepted == len(bases)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=IN_CI, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(["plain", "appended", "dropped", "crafted"]), seed=st.integers(0, 2**32 - 1),
       steps=st.integers(1, 3))
def test_mutated_archives_ckptmigrate_accepts_load_the_same_in_torch(
    bases: dict[str, bytes], tmp_path: Path, base: str, seed: int, steps: int
) -> None:
    rng = random.Random(seed)
    data = bases[base]
    for _ in range(steps):
        data = append_record(data, rng, tmp_path / "scratch.pt") if rng.random() < 0.25 else mutate(data, rng)
    path = tmp_path / "mutated.pt"
    path.write_bytes(data)
    agree(path, HYPOTHESIS)


def test_a_seeded_sweep_finds_no_disagreement(bases: dict[str, bytes], tmp_path: Path) -> None:
    """The count behind the README's figure: cases run, cases accepted, zero disagreements."""
    tally = Tally()
    rng = random.Random(0 if IN_CI else None)
    names = sorted(bases)
    for i in range(SWEEP):
        data = bases[names[i % len(names)]]
        for _ in range(rng.randrange(1, 4)):
            data = append_record(data, rng, tmp_path / "scratch.pt") if rng.random() < 0.25 else mutate(data, rng)
        path = tmp_path / f"case{i % 2}.pt"
        path.write_bytes(data)
        agree(path, tally)
    print(f"\ndifferential zip fuzz: sweep {tally.cases} cases ({tally.accepted} accepted), hypothesis "
          f"{HYPOTHESIS.cases} cases ({HYPOTHESIS.accepted} accepted), 0 disagreements")
    assert tally.accepted > 0  # the oracle compared something


def test_a_flip_in_tensor_bytes_is_accepted_and_torch_sees_the_same_flip(
    bases: dict[str, bytes], tmp_path: Path
) -> None:
    """Not every mutation is refused: tensor bytes are data, and both readers see the changed value."""
    data = bytearray(bases["plain"])
    data[data.index(struct.pack("<f", 5.0))] ^= 1
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    tally = Tally()
    agree(path, tally)
    assert tally.accepted == 1
    with Checkpoint.open(path) as ckpt:
        assert ckpt.materialize()["a"][5].item() != 5.0
