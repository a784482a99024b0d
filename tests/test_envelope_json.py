"""The envelope record is the JSON text ``json.dumps(envelope, separators=(",", ":"), sort_keys=True)``
gives (docs/format.md), however its schema is encoded: a schema of many keys is encoded entry by
distinct entry, and anything unusual in it is left to ``json`` itself."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from ckptmigrate.formats import torchzip


def as_json(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True)


def record_text(envelope: dict[str, Any]) -> str:
    data = torchzip.envelope_bytes(envelope)
    return (zlib.decompress(data) if data[:1] == b"\x78" else data).decode()


def envelope(schema: Any) -> dict[str, Any]:
    return {"format_version": 1, "revision": "r2", "tags": {"b": "2", "a": "1"},
            "history": [{"action": "upgrade", "changed": ["z", "a"], "schema": "not the schema"}],
            "schema": schema, "arch_hash": "sha256:00", "layout": "flat"}


def test_a_large_schema_encodes_as_json_does() -> None:
    schema = {f"blocks.{i}.{name}": {"shape": shape, "dtype": dtype} for i in range(2000)
              for name, shape, dtype in (("weight", [64, 32], "float32"), ("bias", [64], "bfloat16"),
                                         ("step", [], "int64"))}
    schema["é\u2603 \"quoted\"\\"] = {"dtype": "float16", "shape": [1, 2**40]}
    assert record_text(envelope(schema)) == as_json(envelope(schema))


@pytest.mark.parametrize("schema", [
    {"a": {"shape": [True, 2], "dtype": "float32"}, "b": {"shape": [1, 2], "dtype": "float32"}},
    {"a": {"shape": [1.0], "dtype": "float32"}, "b": {"shape": [1], "dtype": "float32"}},
    {"a": {"shape": [1], "dtype": "float32", "note": "more"}},
    {"a": {"shape": (1,), "dtype": "float32"}},
    {"a": {"shape": [1], "dtype": None}},
    {"a": [1]},
    {},
    None,
    [],
])
def test_an_unusual_schema_encodes_as_json_does(schema: Any) -> None:
    assert record_text(envelope(schema)) == as_json(envelope(schema))
