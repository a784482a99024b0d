"""User story: "the central directory of an archive of many records is written in C, as before."

An in-place append lists every record of the file again: 100,000 central directory records for a
checkpoint of 100,000 tensors. ``_encode.central_directory`` (compiled) packs them when none needs
zip64 and hands the directory back to the pure-Python writer otherwise. The bytes must be the pure
writer's for hundreds of seeded random record lists — also those with records past 4 GiB, values
``struct`` refuses (negative, too large, bools) and names of 64 KiB — and a file written with it
must read back, in torch and in ckptmigrate's strict reader.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.formats import zipio

pytestmark = pytest.mark.skipif(zipio._encode is None, reason="the compiled encoder is not built")


def directory(entries: list[Any], compiled: bool) -> Any:
    """What a writer of these records writes after them, or the error it raises."""
    saved = zipio._encode
    if not compiled:
        zipio._encode = None
    try:
        layout = zipio.ZipLayout(4096)
        layout._entries = list(entries)
        return layout.end()
    except Exception as exc:  # noqa: BLE001 - the pure path's error is the expected outcome
        return type(exc), str(exc)
    finally:
        zipio._encode = saved


def random_entries(rng: random.Random) -> list[Any]:
    odd = [0xFFFFFFFF, 0xFFFFFFFE, 2**32, 2**40, -1, True, 2**64]
    entries = []
    for i in range(rng.choice([0, 1, 10, 300, 70_000 if rng.random() < 0.02 else 3])):
        name: Any = f"archive/data/{i}".encode()
        offset, size, crc = rng.randrange(2**31), rng.randrange(2**20), rng.randrange(2**32)
        if rng.random() < 0.01:
            what = rng.randrange(5)
            if what == 0:
                offset = rng.choice(odd)
            elif what == 1:
                size = rng.choice(odd)
            elif what == 2:
                crc = rng.choice(odd)
            elif what == 3:
                name = rng.choice([b"", "é".encode(), b"n" * 65535, b"n" * 65536])
            else:
                name = rng.choice(["text", bytearray(b"x")])
        entries.append((name, offset, size, crc))
    return entries


def test_random_directories_are_written_as_the_pure_writer_writes_them() -> None:
    rng = random.Random(11)
    in_c = 0
    for _ in range(300):
        entries = random_entries(rng)
        expected = directory(entries, False)
        assert directory(entries, True) == expected
        in_c += zipio._encode is not None and zipio._encode.central_directory(entries) is not None
    assert in_c > 100


def test_an_archive_written_with_it_reads_back(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.full((3,), float(i)) for i in range(300)}
    path = tmp_path / "a.pt"
    with open(path, "wb") as fh:
        writer = zipio.ZipWriter(fh)
        buf = io.BytesIO()
        torch.save(sd, buf)
        with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
            for name in z.namelist():
                writer.add_bytes(name, z.read(name))
        writer.close()
    with open(path, "rb") as fh:
        entries = zipio.read_entries(fh, path.stat().st_size)
    assert len(entries) == len(zipfile.ZipFile(io.BytesIO(buf.getvalue())).namelist())
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
