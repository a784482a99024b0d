"""User story: "thousands of small records have their local headers checked a window at a time, with the same verdict."

The zip parse checks that every local header repeats what the central directory says of its record
(what torch's miniz reads). Where a window of the walk holds many listed records, it checks them
at once (``zipwalk.Walk.listed_run``): every byte but the data and padding compared with what it
must be. It may only be faster: on torch's files, ckptmigrate's rewrites, in-place appends, and
mutations of their headers, names, extra fields and data descriptors, the records read or the
refusal must be those of the record-by-record walk.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.formats import zipdirectory, zipwalk
from ckptmigrate.formats.zipformat import ZipFormatError
from ckptmigrate.formats.zipread import read_archive


class Bytes:
    """An archive held in memory, read by range as a remote object is."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def pread(self, n: int, offset: int) -> bytes:
        return self.data[offset : offset + n]


def verdict(data: bytes) -> Any:
    try:
        return list(read_archive(Bytes(data), len(data)).items())
    except ZipFormatError as exc:
        return "refused", str(exc)


def record_by_record(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(zipwalk, "_MIN_RUN", 1 << 40)  # no window is checked at once
        return verdict(data)


def runs_taken(data: bytes, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many records the walk of ``data`` checked in runs."""
    taken = 0
    run = zipwalk.Walk._run

    def counting(self: Any, buf: bytes, base: int, offsets: list[int]) -> int | None:
        nonlocal taken
        end = run(self, buf, base, offsets)
        taken += len(offsets) - 1 if end is not None else 0
        return end

    with monkeypatch.context() as m:
        m.setattr(zipwalk.Walk, "_run", counting)
        verdict(data)
    return taken


CHAIN = '''
revision = "r1"
down_revision = None


def upgrade(ckpt):
    ckpt.unwrap("module.")
'''


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """torch's file of 400 small tensors; ckptmigrate's rewrite of it (-o: sizes stated in the local
    headers, no data descriptors); the same file upgraded in place (an appended tail)."""
    tmp = tmp_path_factory.mktemp("runs")
    sd = {f"module.layers.{i}.w": torch.full((i % 9 + 1,), float(i)) for i in range(400)}
    torch.save(sd, tmp / "torch.pt")
    (tmp / "chain" / "versions").mkdir(parents=True)
    (tmp / "chain" / "versions" / "r1.py").write_text(CHAIN)
    cli = [sys.executable, "-m", "ckptmigrate"]
    subprocess.run([*cli, "upgrade", str(tmp / "torch.pt"), "-o", str(tmp / "rewritten.pt"), "--from", "base",
                    "--migrations", str(tmp / "chain")], check=True, capture_output=True)
    shutil.copyfile(tmp / "torch.pt", tmp / "appended.pt")
    subprocess.run([*cli, "upgrade", str(tmp / "appended.pt"), "--no-backup", "--from", "base", "--migrations",
                    str(tmp / "chain")], check=True, capture_output=True)
    return {name: (tmp / f"{name}.pt").read_bytes() for name in ("torch", "rewritten", "appended")}


def test_written_archives_read_alike_and_mostly_in_runs(archives: dict[str, bytes],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, data in archives.items():
        got = verdict(data)
        assert got == record_by_record(data, monkeypatch), name
        assert got[0] != "refused", name
        assert runs_taken(data, monkeypatch) > 300, name


def structure_bytes(data: bytes) -> list[int]:
    """Offsets of the bytes of every local header, name, extra field and data descriptor."""
    out: list[int] = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            start = info.header_offset
            nlen, xlen = int.from_bytes(data[start + 26 : start + 28], "little"), int.from_bytes(
                data[start + 28 : start + 30], "little")
            data_at = start + 30 + nlen + xlen
            out += range(start, data_at)
            if info.flag_bits & 0x08:
                out += range(data_at + info.compress_size, data_at + info.compress_size + 16)
    return out


@pytest.mark.parametrize("name", ["torch", "rewritten", "appended"])
def test_mutated_records_get_the_same_records_or_the_same_refusal(archives: dict[str, bytes], name: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = archives[name]
    where = structure_bytes(data)
    rng = random.Random(len(name))
    refused = 0
    for trial in range(250):
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            at = rng.choice(where) if rng.random() < 0.9 else rng.randrange(len(out))
            out[at] = rng.choice([out[at] ^ 1 << rng.randrange(8), rng.randrange(256), 0])
        mutated = bytes(out)
        got = verdict(mutated)
        assert got == record_by_record(mutated, monkeypatch), (name, trial)
        refused += got[0] == "refused"
    assert refused > 100


def test_a_record_whose_extra_field_is_shorter_or_longer_reads_alike(archives: dict[str, bytes],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A record's padding extra field grown or shrunk by a few bytes (its data moved with it, its
    lengths fixed up): the runs must not take it for the torch layout they expect."""
    data = archives["torch"]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = [i for i in archive.infolist() if "/data/" in i.filename][100:300:23]
    for info in infos:
        start = info.header_offset
        nlen = int.from_bytes(data[start + 26 : start + 28], "little")
        xlen = int.from_bytes(data[start + 28 : start + 30], "little")
        for delta in (-4, -1, 1, 3):
            if xlen + delta < 0:
                continue
            body = bytearray(data[start : start + 30 + nlen + xlen])
            body[28:30] = (xlen + delta).to_bytes(2, "little")
            body[30 + nlen + 2 : 30 + nlen + 4] = max(0, xlen + delta - 4).to_bytes(2, "little")
            body = body[: 30 + nlen + xlen + min(delta, 0)] + b"Z" * max(delta, 0)
            mutated = data[:start] + bytes(body) + data[start + 30 + nlen + xlen :]
            assert verdict(mutated) == record_by_record(mutated, monkeypatch), (info.filename, delta)


def test_a_real_checkpoint_reads_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sorted(Path("/work/shared/fixtures/real").glob("*.pth"))
    for path in real[:3]:
        data = path.read_bytes()
        if not zipfile.is_zipfile(io.BytesIO(data)):
            continue
        assert verdict(data) == record_by_record(data, monkeypatch), path.name


def windows(data: bytes, mutated: bytes) -> Any:
    """(reader, window bytes, its offset, listed header offsets in it) over ``mutated``, with the
    directory of ``data``: every window a walk could check at once."""
    reader = zipwalk.Walk(Bytes(mutated), len(mutated))
    n, size, offset, _end = reader.end_records(len(data) - 22, "the end record")
    centrals = reader.directory(data[offset : offset + size], n, "the archive")
    reader.check_names(centrals, "the archive")
    reader.live = zipdirectory.by_header(centrals)
    heads = sorted(reader.live)
    for first in range(0, len(heads) - 10, 37):
        base = heads[first]
        buf = mutated[base : base + (16 << 10)]
        inside = [h for h in heads[first:] if h + 30 <= base + len(buf)]
        for count in sorted({8, 20, len(inside) - 1}):
            if count < zipwalk._MIN_RUN or count >= len(inside):
                continue
            reader._buf, reader._at = buf, base
            yield reader, buf, base, inside[: count + 1], offset


def one_by_one(reader: Any, buf: bytes, base: int, offsets: list[int], limit: int) -> Any:
    reader.records = {}
    for start, after in zip(offsets, offsets[1:], strict=False):
        if reader._listed(buf, base, start, reader.live[start], limit) != after:
            return None
    return reader.records


def at_once(reader: Any, buf: bytes, base: int, offsets: list[int]) -> Any:
    reader.records = {}
    return None if reader._run(buf, base, offsets) is None else reader.records


@pytest.mark.parametrize(("field", "value"), [(4, 46), (6, 0x0809), (6, 0x0800), (8, 8), (10, 0x1234), (14, 7),
                                              (18, 9), (26, 99), (28, 0)])
def test_a_run_is_taken_exactly_when_each_record_reads_to_the_next(archives: dict[str, bytes], field: int,
                                                                   value: int) -> None:
    """Every local header changed alike (the version, flags, method, time, CRC, a size, a length): a
    window's records are taken at once exactly when each one, read on its own, ends where the next
    begins, with the same records. One header or descriptor byte changed at random: taken at once
    only so (a header unlike the first may be left to the record-by-record walk)."""
    rng = random.Random(field * 7 + value)
    for name in ("torch", "rewritten"):
        data = archives[name]
        alike = bytearray(data)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                alike[info.header_offset + field : info.header_offset + field + 2] = value.to_bytes(2, "little")
        where = structure_bytes(data)
        single = bytearray(data)
        at = rng.choice(where)
        single[at] ^= 1 << rng.randrange(8)
        taken = 0
        flipped = bytes(single)
        for mutated in (data, bytes(alike), flipped):
            for reader, buf, base, offsets, limit in windows(data, mutated):
                expected = one_by_one(reader, buf, base, offsets, limit)
                got = at_once(reader, buf, base, offsets)
                if mutated is not flipped:
                    assert got == expected, (name, field, base, len(offsets))
                else:  # one header unlike the first (its time, say): the run may leave it to the walk
                    assert got is None or got == expected, (name, field, base, len(offsets))
                taken += got is not None
        assert taken > 0


@pytest.mark.parametrize(("field", "value"), [(4, 46), (6, 0x0809), (8, 8), (10, 0x1234)])
def test_a_field_changed_alike_in_every_local_header_reads_alike(archives: dict[str, bytes], field: int, value: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The version needed, the flags, the method or the time changed in every tensor's local header
    the same way (each record then agrees with the next): runs compare against the first, so they must also
    judge the first as a record's own check does."""
    for name in ("torch", "rewritten"):
        data = archives[name]
        out = bytearray(data)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if "/data/" in info.filename:  # the tensors' records: those the runs read
                    out[info.header_offset + field : info.header_offset + field + 2] = value.to_bytes(2, "little")
        mutated = bytes(out)
        assert verdict(mutated) == record_by_record(mutated, monkeypatch), (name, field)


def test_a_run_read_in_c_is_taken_exactly_when_each_record_reads_to_the_next(archives: dict[str, bytes],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled parse (``_zipscan``) reads a window's run as the record-by-record walk reads each
    record: taken exactly when each ends where the next begins, with the same records, whatever one
    flipped header or descriptor byte does; wherever the Python run takes one, so does it."""
    if zipwalk._scan is None:
        pytest.skip("the compiled parse is not built or not wanted")
    rng = random.Random(5)
    taken = 0
    for name in ("torch", "rewritten"):
        data = archives[name]
        where = structure_bytes(data)
        for trial in range(12):
            single = bytearray(data)
            if trial:
                single[rng.choice(where)] ^= 1 << rng.randrange(8)
            mutated = bytes(single)
            for reader, buf, base, offsets, limit in windows(data, mutated):
                expected = one_by_one(reader, buf, base, offsets, limit)
                compiled = at_once(reader, buf, base, offsets)
                with monkeypatch.context() as m:
                    m.setattr(zipwalk, "_scan", None)
                    pure = at_once(reader, buf, base, offsets)
                assert compiled == expected, (name, trial, base, len(offsets))
                assert pure is None or pure == compiled, (name, trial, base, len(offsets))
                taken += compiled is not None
    assert taken > 0
