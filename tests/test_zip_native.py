"""User story: "the compiled zip parse reads every archive exactly as the Python parse does, only faster."

``ckptmigrate/formats/_zipscan.c`` reads the common case of ``zipread`` (a central directory, its
names, the local records as torch writes them, an append's records, a superseded directory) and
hands anything else back to the Python code. On torch's files (many dtypes and shapes, more than
65,535 records), ckptmigrate's rewrites and in-place appends, their read-back after an append, and
hundreds of seeded mutations of them (flipped bytes, truncations, insertions), the records read or
the refusal (its message included) must be those of the Python parse alone.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.formats import native, zipdirectory, zipread, zipwalk
from ckptmigrate.formats.zipformat import Entries, ZipFormatError
from ckptmigrate.formats.zipread import read_appended, read_archive

pytestmark = pytest.mark.skipif(zipread._scan is None, reason="the compiled parse is not built or not wanted")

CHAIN = '''
revision = "r{n}"
down_revision = {down}


def upgrade(ckpt):
    ckpt.rename_prefix("{old}", "{new}")
'''


class Bytes:
    """An archive held in memory, read by range as a remote object is."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def pread(self, n: int, offset: int) -> bytes:
        return self.data[offset : offset + n]


def outcome(read: Callable[[], Entries]) -> Any:
    try:
        entries = read()
    except ZipFormatError as exc:
        return "refused", str(exc)
    return [(name, type(e), tuple(e)) for name, e in entries.items()], sorted(entries._folded.items())


def both(read: Callable[[], Entries], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """What ``read`` gives with the compiled parse, and with the Python parse alone."""
    compiled = outcome(read)
    with monkeypatch.context() as m:
        for module in (zipdirectory, zipwalk, zipread):  # each reads its part of the parse in C
            m.setattr(module, "_scan", None)
        pure = outcome(read)
    return compiled, pure


def archive_of(data: bytes) -> Callable[[], Entries]:
    return lambda: read_archive(Bytes(data), len(data))


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ckptmigrate", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """torch's file of tensors of many dtypes and shapes (some names upper case); ckptmigrate's
    rewrite of it (-o); the same file upgraded in place once and twice (appended tails, superseded
    directories); and torch's file of 66,000 records (a zip64 entry count)."""
    tmp = tmp_path_factory.mktemp("native")
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool, torch.complex64]
    sd = {f"model.Layer{i}.w": torch.zeros(i % 5 + 1, i % 3 + 1, dtype=dtypes[i % len(dtypes)]) for i in range(600)}
    sd["model.scalar"] = torch.tensor(3.0)
    sd["model.empty"] = torch.zeros(0, 4)
    torch.save(sd, tmp / "torch.pt")
    versions = tmp / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1.py").write_text(CHAIN.format(n=1, down=None, old="model.", new="net."))
    (versions / "r2.py").write_text(CHAIN.format(n=2, down='"r1"', old="net.", new="body."))
    chain = ["--migrations", str(tmp / "chain")]
    cli("upgrade", str(tmp / "torch.pt"), "-o", str(tmp / "rewritten.pt"), "--from", "base", "--to", "r1", *chain)
    shutil.copyfile(tmp / "torch.pt", tmp / "appended.pt")
    cli("upgrade", str(tmp / "appended.pt"), "--no-backup", "--from", "base", "--to", "r1", *chain)
    shutil.copyfile(tmp / "appended.pt", tmp / "twice.pt")
    cli("upgrade", str(tmp / "twice.pt"), "--no-backup", "--to", "r2", *chain)
    torch.save({f"w{i}": torch.tensor(float(i)) for i in range(66_000)}, tmp / "many.pt")
    return {name: (tmp / f"{name}.pt").read_bytes() for name in ("torch", "rewritten", "appended", "twice", "many")}


def test_written_archives_read_alike(archives: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, data in archives.items():
        compiled, pure = both(archive_of(data), monkeypatch)
        assert compiled == pure, name
        assert compiled[0] != "refused", (name, compiled)
    assert len(outcome(archive_of(archives["many"]))[0]) > 66_000


def test_a_real_checkpoint_reads_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    real = [p for p in sorted(Path("/work/shared/fixtures/real").glob("*")) if p.is_file() and zipfile.is_zipfile(p)]
    for path in real[:6]:
        data = path.read_bytes()
        compiled, pure = both(archive_of(data), monkeypatch)
        assert compiled == pure, path.name


def test_a_local_file_reads_alike(archives: dict[str, bytes], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "twice.pt"
    path.write_bytes(archives["twice"])
    fd = os.open(path, os.O_RDONLY)
    try:
        compiled, pure = both(lambda: read_archive(fd, len(archives["twice"])), monkeypatch)
    finally:
        os.close(fd)
    assert compiled == pure
    assert compiled[0] != "refused"


def mutations(data: bytes, seed: int, trials: int) -> list[bytes]:
    """Seeded mutations of ``data``: bytes flipped, set or zeroed (mostly in its zip structures: the
    directory, the local headers, the end records), cut short, or bytes inserted or removed."""
    rng = random.Random(seed)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        heads = [info.header_offset for info in archive.infolist()]
    directory = data.rfind(b"PK\x01\x02", 0, len(data) - 22)
    hot = [h + k for h in heads for k in range(0, 64)] + list(range(max(0, directory - 4096), len(data)))
    out = []
    for _ in range(trials):
        mutated = bytearray(data)
        kind = rng.random()
        if kind < 0.7:
            for _ in range(rng.randint(1, 3)):
                at = rng.choice(hot) if rng.random() < 0.9 else rng.randrange(len(mutated))
                at = min(at, len(mutated) - 1)
                mutated[at] = rng.choice([mutated[at] ^ 1 << rng.randrange(8), rng.randrange(256), 0])
        elif kind < 0.8:
            del mutated[rng.randrange(len(mutated) // 2, len(mutated)) :]
        elif kind < 0.9:
            at = rng.choice(hot)
            mutated[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            at = rng.choice(hot)
            del mutated[at : at + rng.randint(1, 8)]
        out.append(bytes(mutated))
    return out


@pytest.mark.parametrize("name", ["torch", "rewritten", "appended", "twice"])
def test_mutated_archives_get_the_same_records_or_the_same_refusal(archives: dict[str, bytes], name: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    refused = 0
    for trial, mutated in enumerate(mutations(archives[name], seed=len(name), trials=120)):
        compiled, pure = both(archive_of(mutated), monkeypatch)
        assert compiled == pure, (name, trial)
        refused += compiled[0] == "refused"
    assert refused > 30, name


def test_an_appended_archive_reads_back_alike(archives: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-back of an in-place append (``read_appended``), on the appended file and on
    mutations of what was appended: the same records or refusal as the Python parse, and as the
    whole parse where that accepts."""
    before, after = archives["torch"], archives["appended"]
    assert after.startswith(before)
    base = read_archive(Bytes(before), len(before))
    appended = after[len(before) :]
    rng = random.Random(13)
    trials = [after]
    for _ in range(150):
        tail = bytearray(appended)
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(tail)) if rng.random() < 0.5 else rng.randrange(max(0, len(tail) - 4096), len(tail))
            tail[at] = rng.choice([tail[at] ^ 1 << rng.randrange(8), rng.randrange(256)])
        trials.append(before + bytes(tail))
    accepted = 0
    for trial, data in enumerate(trials):
        read = lambda data=data: read_appended(Bytes(data), len(data), base, len(before))  # noqa: E731
        compiled, pure = both(read, monkeypatch)
        assert compiled == pure, trial
        if compiled[0] != "refused":
            accepted += 1
            assert compiled == outcome(archive_of(data)), trial
    assert accepted >= 1


def test_the_pure_python_setting_turns_the_compiled_parse_off(archives: dict[str, bytes], tmp_path: Path) -> None:
    path = tmp_path / "torch.pt"
    path.write_bytes(archives["torch"])
    probe = ("import sys; from ckptmigrate.formats import zipread; f = open(sys.argv[1], 'rb'); "
             f"print(zipread._scan is None, len(zipread.read_archive(f.fileno(), {len(archives['torch'])})))")
    env = {**os.environ, native.PURE_PYTHON_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", probe, str(path)], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", str(len(read_archive(Bytes(archives["torch"]), len(archives["torch"]))))]


def test_a_damaged_central_directory_gets_the_same_records_or_the_same_refusal(
        archives: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes of the central directory itself flipped (its entries' names, flags, sizes, offsets,
    lengths): the compiled directory, names and entries give way to the Python ones alike."""
    for name in ("torch", "many"):
        data = archives[name]
        size, offset = int.from_bytes(data[-10:-6], "little"), int.from_bytes(data[-6:-2], "little")
        if offset == 0xFFFFFFFF:  # zip64: the directory's offset and size are in the zip64 end record
            record = data[-22 - 20 - 56 :]
            size, offset = int.from_bytes(record[40:48], "little"), int.from_bytes(record[48:56], "little")
        rng = random.Random(7)
        for trial in range(40 if name == "many" else 150):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                at = offset + rng.randrange(min(size, 8192) if rng.random() < 0.5 else size)
                mutated[at] = rng.choice([mutated[at] ^ 1 << rng.randrange(8), rng.randrange(256), 0x2F, 0x41])
            compiled, pure = both(archive_of(bytes(mutated)), monkeypatch)
            assert compiled == pure, (name, trial)


def test_hostile_windows_are_read_within_their_bytes(archives: dict[str, bytes]) -> None:
    """The compiled walk given random bytes, offsets and limits against a real directory: it reads
    within the buffer (AddressSanitizer holds it there in a sanitized build), stores only records
    the directory lists, and never moves backwards, nor past the limit but by a data descriptor
    (as the Python walk's ``_listed``: the walk then finds the record runs into the directory)."""
    assert zipread._scan is not None
    data = archives["torch"]
    reader = zipwalk.Walk(Bytes(data), len(data))
    n, size, offset, _end = reader.end_records(len(data) - 22, "the end record")
    centrals = reader.directory(data[offset : offset + size], n, "the archive")
    live = zipdirectory.names_by_header(reader, centrals)
    heads = sorted(live)
    rng = random.Random(3)
    for _ in range(3000):
        head = rng.choice(heads)
        base = head - rng.randrange(0, 64)
        buf = bytearray(data[base : base + rng.randrange(0, 4096)])
        for _ in range(rng.randint(0, 4)):
            if buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        pos = head if rng.random() < 0.9 else base + rng.randrange(0, 8192)
        limit = pos + rng.randrange(0, 1 << 16) if rng.random() < 0.9 else rng.randrange(0, 1 << 40)
        records: dict[int, tuple[str, int, int]] = {}
        end, _small, count = zipwalk._scan.listed(bytes(buf), base, pos, limit, live, records)
        assert end == pos or pos < end <= limit + 16
        assert len(records) == count and records.keys() <= live.keys()
        stepped, _count = zipwalk._scan.skip(bytes(buf), base, pos, limit)
        assert stepped == pos or pos < stepped <= limit
