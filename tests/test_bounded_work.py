"""User story: "a small hostile file cannot stall `verify -j` on our release server or eat its memory".

Each bound of the pickle reader (README, "Pickles ckptmigrate understands") has an attack here, run
through the real CLI with a generous time limit — a refused file must be refused before the
expensive step, not after it: tuples shared so often that hashing one would take 2**90 steps, and a
batch of files naming thousands of globals each, whose stand-ins must not outlive their payloads.
"""

from __future__ import annotations

import gc
import pickle
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptmigrate.formats import pickled, torchzip
from ckptmigrate.formats.pickle_scan import MAX_SHARED_VISITS
from ckptmigrate.formats.pickled import PickleFormatError

LIMIT = 300  # seconds: generous on a busy 2-core machine; the attacks take 2**90 steps without the bounds


def with_data_pkl(path: Path, data: bytes) -> Path:
    torch.save({"w": torch.ones(2)}, path)
    with open(path, "r+b") as fh:
        torchzip.append_records(fh, {"data.pkl": data})
    return path


def tuple_bomb(levels: int) -> bytes:
    """``{t: 1}`` where ``t = (t', t')`` ``levels`` deep, every level through the memo: a few
    hundred bytes whose dict key hashes 2**levels tuples."""
    t: tuple[object, ...] = (0,)
    for _ in range(levels):
        t = (t, t)
    body = pickle.dumps(t, protocol=2)[2:-1]  # the pickler memoises: linear in levels
    return b"\x80\x02}" + body + b"K\x01s."


def test_a_tuple_hash_bomb_is_refused_before_it_is_hashed(tmp_path: Path) -> None:
    data = tuple_bomb(90)
    assert len(data) < 1000
    path = with_data_pkl(tmp_path / "bomb.pt", data)
    proc = subprocess.run([sys.executable, "-m", "ckptmigrate", "inspect", str(path)],
                          capture_output=True, text=True, timeout=LIMIT)
    assert proc.returncode == 2 and "hashing" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_shared_tuples_below_the_bound_still_load() -> None:
    levels = (MAX_SHARED_VISITS // 4).bit_length() - 1  # a key of ~MAX_SHARED_VISITS / 4 tuple visits
    payload = pickled.load(tuple_bomb(levels))
    assert list(payload.values()) == [1]
    try:
        pickled.load(tuple_bomb(levels + 3))
    except PickleFormatError as exc:
        assert "hashing" in str(exc)
    else:
        raise AssertionError("a key of 2 * MAX_SHARED_VISITS tuple visits was read")


def many_globals(n: int, tag: str) -> bytes:
    """A dict of ``n`` entries, each naming a global of its own (``mod_i.Cls_tag``) as a value."""
    out = [b"\x80\x02}q\x00("]
    for i in range(n):
        out.append(pickle.dumps(f"k{i}", protocol=2)[2:-1])
        out.append(f"cmod{i}\nCls_{tag}\n".encode())
    out.append(b"u.")
    return b"".join(out)


def test_stand_ins_die_with_their_payload_so_a_batch_does_not_grow(tmp_path: Path) -> None:
    refs = []
    for round_ in range(4):
        payload = pickled.load(many_globals(5000, str(round_)))
        assert len(payload) == 5000
        refs.append(weakref.ref(payload["k0"]))
        del payload
    gc.collect()
    assert all(r() is None for r in refs), "stand-in classes outlived the payloads that named them"
    assert len(pickled._STANDINS) < 1000


def test_a_batch_of_files_with_many_globals_each_verifies_in_bounded_memory(tmp_path: Path) -> None:
    """40 such files in one process: stand-ins freed per file keep the peak near one file's worth."""
    paths = [with_data_pkl(tmp_path / f"g{i}.pt", many_globals(pickled.MAX_GLOBALS - 10, str(i))) for i in range(40)]
    code = (  # VmHWM: this process's own peak (ru_maxrss would include the parent's at fork)
        "import sys\n"
        "from ckptmigrate import formats\n"
        "for p in sys.argv[1:]:\n"
        "    c = formats.read(p)\n"
        "    assert len(c.payload) > 9000\n"
        "    c.close()\n"
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True,
                          timeout=LIMIT)
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stdout) / 1024
    assert peak_mib < 400, f"peak RSS {peak_mib:.0f} MiB for 40 files of {pickled.MAX_GLOBALS:,} globals each"


@st.composite
def tuple_dags(draw: st.DrawFn) -> tuple[bytes, int]:
    """A pickle of random tuples, each holding a few ints and a few references (through the memo)
    to recent ones, the last used as a dict key; and the number of elements hashing it visits,
    counted here independently. Chains of sharing make some of them bombs."""
    count = draw(st.integers(1, 90))
    sizes: list[int] = []
    out = [b"\x80\x02}"]
    for i in range(count):
        shared = draw(st.lists(st.integers(max(0, i - 3), i - 1), max_size=3)) if i else []
        ints = draw(st.lists(st.integers(0, 255), max_size=2))
        out.append(b"(" + b"".join(b"h" + bytes([j]) for j in shared) + b"".join(b"K" + bytes([v]) for v in ints))
        out.append(b"tq" + bytes([i]) + b"0")  # TUPLE, BINPUT i, POP
        sizes.append(1 + len(ints) + sum(sizes[j] for j in shared))
    out.append(b"h" + bytes([count - 1]) + b"K\x01s.")
    return b"".join(out), sizes[-1]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=tuple_dags())
def test_no_accepted_pickle_hashes_more_than_the_bound(case: tuple[bytes, int]) -> None:
    data, visits = case
    try:
        payload = pickled.load(data)
    except PickleFormatError as exc:
        assert "hashing" in str(exc) or "deep" in str(exc), exc
        assert visits > MAX_SHARED_VISITS or "deep" in str(exc)
    else:
        assert visits <= MAX_SHARED_VISITS + len(data)
        assert list(payload.values()) == [1]
