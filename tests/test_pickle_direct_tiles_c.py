"""User story: "the compiled decode of a state dict's runs gives, entry for entry, what the Python one gives."

Where ``ckptmigrate/formats/_tiles.c`` is built, :meth:`ckptmigrate.formats.pickle_direct._Decoder.tiles`
hands a run of keys and tensors to it; it takes the units it reads whole and leaves the rest to the
opcode-by-opcode read, which then decides. Held here against the Python decode of the same bytes,
beyond what the payload shows: the memo entries, the storages made and their order, the globals
named, or the same refusal; on files torch writes (many dtypes and layouts, more than 65,536 memo
entries), on ckptmigrate's own rewrites, on hundreds of seeded mutations aimed at the runs, and with
the objects made by calling their classes (what the decode does for a class whose ``__init__``
may do more than set its fields).
"""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_pickle_direct import describe, mutate
from test_pickle_direct_tiles import data_pkl, many_kinds, units

from ckptmigrate.formats import native, pickle_direct, pickled
from ckptmigrate.formats.pickle_direct import _Decoder, _Global
from ckptmigrate.formats.pickle_writer import dump
from ckptmigrate.formats.torchzip import _StoragePlan
from ckptmigrate.tensors.refs import Storage, TensorRef

COMPILED = pickle_direct._tiles
pytestmark = pytest.mark.skipif(native.pure_python(), reason=f"{native.PURE_PYTHON_ENV} is set")


def everything(data: bytes, compiled: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    """All a decode of ``data`` leaves: payload, storages in order, memo, globals named, the
    position of every run the decode took; or the type of its refusal."""
    monkeypatch.setattr(pickle_direct, "_tiles", COMPILED if compiled else None)
    storages: dict[str, Storage] = {}
    named: set[_Global] = set()
    decoder = _Decoder(data, storages, storages, pickled._rebuild_tensor_v2, named)
    try:
        payload = decoder.run()
    except Exception as exc:  # noqa: BLE001 - the refusal is what is compared
        return "refused", type(exc).__name__
    seen: dict[int, int] = {}
    return (describe(payload, seen), [(k, describe(s, seen)) for k, s in storages.items()],
            [describe(entry, seen) for entry in decoder.memo], sorted(f"{g.module}.{g.name}" for g in named))


def alike(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    compiled = everything(data, True, monkeypatch)
    assert compiled == everything(data, False, monkeypatch)
    return compiled


def test_the_compiled_decode_is_built() -> None:
    assert COMPILED is not None, "_tiles.c is not built: run scripts/setup.sh"


def test_files_of_every_kind_leave_the_same_memo_and_storages(monkeypatch: pytest.MonkeyPatch) -> None:
    data = data_pkl(many_kinds(1500, seed=3))
    assert alike(data, monkeypatch)[0] != "refused"


def test_more_than_65536_memo_entries_and_every_int_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # 9,000 tensors put 72,000 memo entries; sizes and offsets take one, two and four bytes
    sd = {f"layer.{i}.w": torch.zeros(1 if i % 3 == 0 else 300 if i % 3 == 1 else 70000, dtype=torch.int8)
          for i in range(9000)}
    data = data_pkl(sd)
    result = alike(data, monkeypatch)
    assert result[0] != "refused" and len(result[2]) > 65536


def test_what_ckptmigrate_writes_is_decoded_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    for source in (data_pkl(many_kinds(800, seed=8)),
                   data_pkl({f"blocks.{i // 16}.w{i % 16}": torch.full((4,), float(i)) for i in range(600)})):
        rewritten = dump(pickled.load(source), _StoragePlan())
        assert alike(rewritten, monkeypatch)[0] != "refused"


def test_seeded_mutations_get_the_same_everything_or_the_same_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte flips, cuts and insertions anywhere, and flips aimed inside the units of a run: in a
    key (often still a key, or no longer UTF-8), anywhere in the unit (mostly no longer a unit)."""
    data = data_pkl({f"m.{i}.{'w' if i % 50 else 'wé'}": torch.zeros(i % 4 + 1, dtype=torch.float16)
                     for i in range(500)})
    spans = units(data)
    rng = random.Random(29)
    refused = taken = 0
    for trial in range(300):
        start, end = rng.choice(spans)
        out = bytearray(data)
        if trial % 3 == 0:
            mutated = mutate(rng, data)
        elif trial % 3 == 1:
            out[rng.randrange(start + 5, start + 5 + int.from_bytes(data[start + 1 : start + 5], "little"))] = \
                rng.choice(b"az.\x00\x7f\x80\xc3\xa9\xed\xff")
            mutated = bytes(out)
        else:
            out[rng.randrange(start, end)] = rng.randrange(256)
            mutated = bytes(out)
        result = alike(mutated, monkeypatch)
        refused += result[0] == "refused"
        taken += result[0] != "refused"
    assert refused > 20 and taken > 50


def test_objects_made_by_calling_their_classes_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """A class whose ``__init__`` may do more than set fields (a ``__post_init__``) is called."""

    @dataclasses.dataclass(slots=True)
    class Checked:
        key: str

        def __post_init__(self) -> None:
            self.key = self.key.upper()

    @dataclasses.dataclass(slots=True)
    class KeywordOnly:
        key: str
        size: int = dataclasses.field(kw_only=True, default=0)

    assert pickle_direct._maker(Checked) is Checked
    assert pickle_direct._maker(KeywordOnly) is KeywordOnly  # its __init__ takes fields in another order
    assert pickle_direct._maker(Storage) is not Storage  # made in C, as its __init__ would
    data = data_pkl(many_kinds(600, seed=4))
    fast = alike(data, monkeypatch)
    monkeypatch.setattr(pickle_direct, "_STORAGE_MAKER", Storage)
    monkeypatch.setattr(pickle_direct, "_TENSOR_MAKER", TensorRef)
    assert everything(data, True, monkeypatch) == fast


def test_the_compiled_decode_refuses_arguments_it_cannot_use() -> None:
    assert COMPILED is not None
    data = data_pkl({f"k{i}": torch.zeros(2) for i in range(40)})
    args: list[Any] = [data, 2, 1024, [], [], {}, {}, {}, {}, print, print, Storage, TensorRef]
    for at, wrong in ((0, bytearray(data)), (3, ()), (11, (Storage, ((1, 2, 3),))), (12, (TensorRef, ())),
                      (1, len(data) + 1)):
        bad = list(args)
        bad[at] = wrong
        with pytest.raises((TypeError, ValueError)):
            COMPILED.scan(*bad)
    assert COMPILED.scan(*args) is None  # no unit where the pickle starts


def test_storages_of_a_dict_subclass_are_left_to_the_python_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller's dict subclass may look its keys up its own way: the compiled decode takes no run."""

    class Storages(dict[str, Storage]):
        pass

    data = data_pkl({f"k{i}": torch.zeros(2) for i in range(100)})
    assert COMPILED is not None
    taken: list[Any] = []

    def scan(*args: Any) -> Any:
        taken.append(COMPILED.scan(*args))
        return taken[-1]

    got = []
    for storages, compiled in ((Storages(), True), (Storages(), False), ({}, True)):
        monkeypatch.setattr(pickle_direct, "_tiles", SimpleNamespace(scan=scan) if compiled else None)
        decoder = _Decoder(data, storages, storages, pickled._rebuild_tensor_v2, set())
        seen: dict[int, int] = {}
        got.append((describe(decoder.run(), seen), [describe(e, seen) for e in decoder.memo], list(storages)))
        if storages:
            assert (taken.count(None) == len(taken)) is (type(storages) is Storages)  # runs taken for a dict only
        taken.clear()
    assert got[0] == got[1] == got[2]
