"""User story: "the schema of a checkpoint of many tensors is encoded in C, as json.dumps encodes it."

The schema (a key → ``{"shape": [...], "dtype": ...}`` for every tensor) is most of an envelope;
``_encode.schema_json`` (compiled) encodes the common schema and hands any other back to the
pure-Python encoder. The text must be what ``json.dumps(envelope, separators=(",", ":"),
sort_keys=True)`` gives with the compiled encoder and without it, for hundreds of seeded random
schemas — also the odd ones (bools and floats in shapes, ints beyond 64 bits, more than 64 dims,
extra fields, keys and dtypes json escapes, non-string keys).
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from ckptmigrate.formats import torchzip

pytestmark = pytest.mark.skipif(torchzip._encode is None, reason="the compiled encoder is not built")


def expected(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True)


def random_schema(rng: random.Random) -> Any:
    layouts = [{"shape": [rng.choice([0, 1, 64, 70000]) for _ in range(rng.randrange(4))],
                "dtype": rng.choice(["float32", "bfloat16", "int64"])} for _ in range(3)]
    schema: dict[Any, Any] = {}
    for _ in range(rng.choice([0, 1, 10, 500])):
        key = f"layers.{rng.randrange(10**6)}.w" if rng.random() < 0.9 else rng.choice(
            ["é", "模型", "\udc80", 'quo"te\\', "\n\t\x00", "\x7f", "~ ", "🙂", "", "a" * 200])
        value: Any = dict(rng.choice(layouts))
        roll = rng.random()
        if roll < 0.01:
            value["shape"] = [True, 2]
        elif roll < 0.02:
            value["shape"] = [1.0]
        elif roll < 0.03:
            value["extra"] = 1
        elif roll < 0.04:
            value = {"shape": (1, 2), "dtype": "x"}
        elif roll < 0.05:
            value = {"shape": [1], "dtype": None}
        elif roll < 0.06:
            value = {"shape": [1], "kind": "x"}
        elif roll < 0.07:
            value = ["not", "a", "dict"]
        elif roll < 0.08:
            value = {"shape": [2**63, -(2**63)], "dtype": "float32"}
        elif roll < 0.09:
            value = {"shape": [1] * rng.choice([64, 65]), "dtype": rng.choice(["é", '"', "\x7f"])}
        elif roll < 0.10:
            value = {"shape": [-(2**63) + 1, 2**63 - 1, 0, -1], "dtype": "int64"}
        schema[key] = value
    if rng.random() < 0.05 and schema:
        schema[3] = {"shape": [], "dtype": "float32"}  # a key json.dumps cannot sort among strings
    return schema


def encoded(envelope: dict[str, Any], compiled: bool) -> Any:
    saved = torchzip._encode
    if not compiled:
        torchzip._encode = None
    try:
        return torchzip._envelope_json(envelope)
    except TypeError as exc:
        return type(exc)
    finally:
        torchzip._encode = saved


def test_schemas_are_encoded_as_json_dumps_encodes_them() -> None:
    rng = random.Random(7)
    in_c = 0
    for _ in range(400):
        envelope = {"format_version": 1, "schema": random_schema(rng), "revision": "abc"}
        try:
            want: Any = expected(envelope)
        except TypeError as exc:
            want = type(exc)
        assert encoded(envelope, True) == want
        assert encoded(envelope, False) == want
        schema = envelope["schema"]
        in_c += type(schema) is dict and set(map(type, schema)) <= {str} and (
            torchzip._encode.schema_json(sorted(schema), schema, torchzip._C_ENCODE_STR) is not None)
    assert in_c > 100  # the common case was encoded in C


def test_a_large_schema_in_c_reads_back_as_the_envelope() -> None:
    schema = {f"blocks.{i}.w": {"shape": [64, i % 3], "dtype": "float32"} for i in range(5000)}
    envelope = {"format_version": 1, "schema": schema, "history": [{"op": "rename"}]}
    assert torchzip._encode.schema_json(sorted(schema), schema, torchzip._C_ENCODE_STR) is not None
    assert torchzip.parse_envelope(torchzip.envelope_bytes(envelope)) == envelope
