"""User story: "A 66 KB envelope record that inflates to 64 MiB of ``[[],[],...]`` used to cost 1.75 GB
to read. Now every envelope is refused before the expensive step if it passes a bound."

The bounds (``torchzip.MAX_ENVELOPE``, ``MAX_ENVELOPE_VALUES``, ``MAX_ENVELOPE_DEPTH``) are checked
before inflating past the size bound and before ``json`` builds a single object. Each attack runs
as a real ``ckptmigrate inspect`` subprocess whose address space is capped at 768 MiB (the old
parse needed more than twice that) and which must finish within a generous 20 s: exit 2 and one
line naming the file and the bound.
"""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from ckptmigrate.formats import boundedjson, torchzip

ADDRESS_SPACE = 768 << 20
TIME_LIMIT = 20


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def inspect_capped(path: Path) -> subprocess.CompletedProcess[str]:
    """``ckptmigrate inspect PATH`` with the address space capped; TimeoutExpired fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "inspect", str(path)], capture_output=True, text=True,
        timeout=TIME_LIMIT, preexec_fn=_cap_memory,
    )


def zip_with_envelope(tmp_path: Path, record: bytes) -> Path:
    """A real ``torch.save`` file whose envelope record holds ``record`` (appended as ckptmigrate does)."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(6.0)}, path)
    with open(path, "r+b") as fh:
        torchzip.append_records(fh, {torchzip.ENVELOPE_RECORD: record})
    return path


def assert_refused(proc: subprocess.CompletedProcess[str], path: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in lines[0]
    for word in words:
        assert word in lines[0], lines[0]


def test_a_66_kb_zlib_bomb_of_empty_lists_is_refused_before_it_inflates(tmp_path: Path) -> None:
    bomb = zlib.compress(b"[" + b"[]," * ((64 << 20) // 3) + b"[]]", 9)
    assert len(bomb) < 70_000  # the reported attack: ~66 KB on disk
    path = zip_with_envelope(tmp_path, bomb)
    assert_refused(inspect_capped(path), path, "inflates past", f"{torchzip.MAX_ENVELOPE:,}")


def test_an_envelope_of_more_values_than_the_bound_is_refused_before_json_builds_them(tmp_path: Path) -> None:
    n = torchzip.MAX_ENVELOPE_VALUES + 10
    text = b'{"tags":{},"x":[' + b"[]," * n + b"[]]}"
    assert len(text) < torchzip.MAX_ENVELOPE  # inside the size bound: only the value count refuses it
    path = zip_with_envelope(tmp_path, zlib.compress(text, 9))
    assert_refused(inspect_capped(path), path, "values")


def test_an_envelope_nested_deeper_than_the_bound_is_refused(tmp_path: Path) -> None:
    depth = torchzip.MAX_ENVELOPE_DEPTH  # the object itself is one level, so this is one too many
    path = zip_with_envelope(tmp_path, b'{"x":' + b"[" * depth + b"]" * depth + b"}")
    assert_refused(inspect_capped(path), path, "nested deeper")


def test_an_envelope_nested_900_deep_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    path = zip_with_envelope(tmp_path, b'{"tags":' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}")
    assert_refused(inspect_capped(path), path, "nested deeper")


def test_a_safetensors_envelope_has_the_same_bounds(tmp_path: Path) -> None:
    envelope = '{"x":' + "[" * 100 + "]" * 100 + "}"
    header = json.dumps({"__metadata__": {"ckptmigrate": envelope},
                         "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    assert_refused(inspect_capped(path), path, "nested deeper")


def test_an_envelope_at_the_bounds_is_read() -> None:
    deepest = {"x": json.loads("[" * (torchzip.MAX_ENVELOPE_DEPTH - 1) + "]" * (torchzip.MAX_ENVELOPE_DEPTH - 1))}
    assert torchzip.parse_envelope(json.dumps(deepest).encode()) == deepest
    many = {"x": list(range(torchzip.MAX_ENVELOPE_VALUES - 2))}
    assert torchzip.parse_envelope(zlib.compress(json.dumps(many).encode())) == many


def test_a_real_large_envelope_is_far_inside_the_bounds() -> None:
    """A schema and per-tensor digests of 20,000 tensors: the bounds leave room for real models."""
    n = 20_000
    envelope = {
        "schema": {f"model.layers.{i}.mlp.up_proj.weight": {"shape": [4096, 11008], "dtype": "bfloat16"}
                   for i in range(n)},
        "digest": {"algorithm": "blake3", "tensors": {f"model.layers.{i}.mlp.up_proj.weight": "ab" * 32
                                                      for i in range(n)}},
    }
    packed = torchzip.envelope_bytes(envelope)
    assert torchzip.parse_envelope(packed) == envelope
    raw = json.dumps(envelope).encode()
    assert len(raw) < torchzip.MAX_ENVELOPE // 4


@pytest.mark.parametrize("text", [b'"abc', b'["a\\"]'])
def test_an_unterminated_string_is_refused_by_the_scan(text: bytes) -> None:
    with pytest.raises(boundedjson.JSONBoundsError, match="unterminated"):
        boundedjson.check_shape(text, max_values=10, max_depth=10)


def test_a_truncated_zlib_stream_is_refused() -> None:
    with pytest.raises(boundedjson.JSONBoundsError, match="truncated"):
        boundedjson.inflate(zlib.compress(b'{"a": 1}')[:-6], 1000)


def test_a_string_of_sixteen_million_escapes_is_scanned_in_bounded_memory(tmp_path: Path) -> None:
    """A regular expression with a repeated group saved state per escape: 1.9 GB for this one string."""
    note = b"\\n" * (torchzip.MAX_ENVELOPE // 2 - 64)
    path = zip_with_envelope(tmp_path, zlib.compress(b'{"tags":{"note":"' + note + b'"}}', 9))
    proc = inspect_capped(path)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr and "Memory" not in proc.stderr, proc.stderr
