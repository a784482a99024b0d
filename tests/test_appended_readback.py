"""User story: "a rename appended in place is read back in time proportional to what it appended,
and that read-back is as strict as reading the whole file."

After an in-place append, ckptmigrate checks the file as torch will read it. The bytes before the
append were parsed strictly when the file was opened, under the same lock, and are never written:
``zipread.read_appended`` parses only the appended bytes, the records the new directory names in
the old part (they must be records that parse found, with their name, size and CRC), and the old
records the append supersedes (read again as superseded records are read). These tests hold it
to the whole parse (``read_archive``): on real appends — one, then several on the same file, with
an extra that embeds a zip — both give the same records, and on appends damaged byte by byte, or
given a directory that names what is not a record of the old archive, both refuse or both accept
with the same records.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.formats import zipio, zipread


def code_snapshot() -> bytes:
    """A small zip kept as an extra (an end record signature inside data.pkl)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train.py", "print('hi')\n")
    return buf.getvalue()


def entries_of(path: Path) -> zipio.Entries:
    with open(path, "rb") as fh:
        return zipio.read_entries(fh, os.fstat(fh.fileno()).st_size)


def whole(path: Path) -> zipio.Entries | str:
    """The whole parse of the file: its records, or why it refuses it."""
    try:
        return entries_of(path)
    except zipio.ZipFormatError:
        return "refused"


def appended(path: Path, base: zipio.Entries, base_length: int) -> zipio.Entries | str:
    try:
        with open(path, "rb") as fh:
            return zipio.read_appended_entries(fh, os.fstat(fh.fileno()).st_size, base, base_length)
    except zipio.ZipFormatError:
        return "refused"


def rename_in_place(path: Path, old: str, new: str) -> tuple[zipio.Entries, int]:
    """Append a rename to ``path``; the records and length of the archive it appended to."""
    with Checkpoint.open(path) as ckpt:
        base, length = ckpt.container.records, path.stat().st_size
        ckpt.rename(old, new)
        ckpt.write(path, None)
    assert path.stat().st_size > length  # appended, not rewritten
    return base, length


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    sd = {f"module.blocks.{i // 8}.w{i % 8}": torch.full((4,), float(i)) for i in range(400)}
    torch.save({"state_dict": sd, "code": code_snapshot()}, path)
    return path


def test_appends_read_back_as_the_whole_parse_reads_them(model: Path) -> None:
    base, length = rename_in_place(model, "module.blocks.0.w0", "head.w0")
    assert appended(model, base, length) == entries_of(model)
    # a second append on the same file: the first one's data.pkl and directory are superseded bytes now
    base, length = rename_in_place(model, "module.blocks.0.w1", "head.w1")
    got = appended(model, base, length)
    assert isinstance(got, dict) and got == entries_of(model)
    loaded = torch.load(model, weights_only=True)["state_dict"]
    assert (float(loaded["head.w1"][0]), float(loaded["module.blocks.1.w0"][0])) == (1.0, 8.0)


def test_a_damaged_append_is_refused_exactly_when_the_whole_parse_refuses_it(model: Path, tmp_path: Path) -> None:
    base, length = rename_in_place(model, "module.blocks.0.w0", "head.w0")
    intact = model.read_bytes()
    rng = random.Random(13)
    positions = sorted(rng.sample(range(length, len(intact)), 300)) + list(range(len(intact) - 120, len(intact)))
    refused = 0
    damaged = tmp_path / "damaged.pt"
    for at in positions:
        data = bytearray(intact)
        data[at] ^= 1 << rng.randrange(8)
        damaged.write_bytes(bytes(data))
        expected = whole(damaged)
        assert appended(damaged, base, length) == expected, f"byte {at} of {len(intact)}"
        refused += expected == "refused"
    assert 0 < refused < len(positions)  # both kinds were tried


def test_a_directory_naming_what_the_old_archive_does_not_hold_is_refused(model: Path, tmp_path: Path) -> None:
    base, length = rename_in_place(model, "module.blocks.0.w0", "head.w0")
    data = bytearray(model.read_bytes())
    entries = entries_of(model)
    storage = next(e for name, e in entries.items() if name.endswith("/data/7"))
    other = next(e for name, e in base.items() if name.endswith("/data/8"))
    # the new directory's entry for data/7, pointed at data/8's local header (an old record of another name)
    eocd = len(data) - 22
    locator = data[eocd - 20 : eocd - 16] == b"PK\x06\x07"
    if locator:
        cd_offset = struct.unpack_from("<Q", data, struct.unpack_from("<Q", data, eocd - 12)[0] + 48)[0]
    else:
        cd_offset = struct.unpack_from("<I", data, eocd + 16)[0]
    at = data.index(struct.pack("<I", storage.header_offset), cd_offset)
    data[at : at + 4] = struct.pack("<I", other.header_offset)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    assert whole(bad) == "refused"
    with pytest.raises(zipio.ZipFormatError, match="data/7"), open(bad, "rb") as fh:
        zipio.read_appended_entries(fh, len(data), base, length)


def test_the_in_place_write_checks_only_what_it_appended(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    whole_parse, appended_parse = zipread.read_archive, zipread.read_appended
    monkeypatch.setattr(zipio, "read_archive", lambda *a: (parsed.append("whole"), whole_parse(*a))[1])
    monkeypatch.setattr(zipread, "read_appended", lambda *a: (parsed.append("appended"), appended_parse(*a))[1])
    with Checkpoint.open(model) as ckpt:
        parsed.clear()
        ckpt.rename("module.blocks.0.w0", "head.w0")
        ckpt.write(model, None)
    assert parsed == ["appended"]
    # a copy (-o) is parsed whole: its records were copied, not left in place
    with Checkpoint.open(model) as ckpt:
        parsed.clear()
        ckpt.rename("head.w0", "module.blocks.0.w0")
        ckpt.write(model.with_name("copy.pt"), None)
    assert parsed == ["whole"]
