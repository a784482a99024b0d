"""User story: "the envelope of a 100,000-tensor checkpoint is type-checked in milliseconds, with the
verdict the field-by-field walk gave."

``envelope_schema.validate`` checks every field of an untrusted envelope before anything reads one.
The schema (a dict per tensor) is most of it; a schema as ckptmigrate writes it is checked a column
at a time (``_plain_schema``) and the rest of the record walked, with the text of a list or object
of strings (a history entry's keys, tags, per-tensor digests) checked at once. Held here to the
walk it replaces (every value visited, then each field's check): on a real envelope and on seeded
mutations aimed at every way a schema entry, a list of keys or an object of strings can be wrong,
or nest too deep — the same acceptance, or the same one-line error.
"""

from __future__ import annotations

import copy
import random
from contextlib import closing
from typing import Any

import pytest
import torch

from ckptmigrate.checkpoint import envelope_schema
from ckptmigrate.checkpoint.envelope_schema import FIELDS, MAX_DEPTH, REQUIRED, check_structure, validate
from ckptmigrate.formats.torchzip import read_envelope
from ckptmigrate.tensors.refs import Source


def every_value(data: Any) -> None:
    """``check_structure`` as it was: each value a step."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"the envelope's {where or 'record'} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            if envelope_schema._bad_text(value):
                raise ValueError(f"the envelope's {where or 'record'} holds a lone surrogate (not UTF-8 text)")
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and envelope_schema._bad_text(k):
                    raise ValueError(f"the envelope's {where or 'record'} has a key with a lone surrogate")
                stack.append((v, depth + 1, where or str(k)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, where) for v in value)


def walked(data: dict[str, Any]) -> None:
    """The check ``validate`` made before the column checks: every value visited, then each field."""
    every_value(data)
    missing = [f for f in REQUIRED if f not in data]
    if missing:
        raise ValueError(f"the envelope lacks {', '.join(missing)}")
    for name, (ok, expected) in FIELDS.items():
        if name in data and not ok(data[name]):
            raise ValueError(f"the envelope's {name} is not {expected} ({type(data[name]).__name__} found); "
                             "the file's metadata is damaged or was not written by ckptmigrate")


def verdict(check: Any, data: dict[str, Any]) -> str | None:
    try:
        check(data)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def envelope(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The envelope ckptmigrate stamps into a real file: dtypes, 0-d, non-ASCII keys."""
    from ckptmigrate.api import stamp

    path = tmp_path_factory.mktemp("env") / "model.pt"
    sd = {f"layers.{i}.w": torch.zeros(i % 3, 4, dtype=torch.bfloat16 if i % 2 else torch.float32)
          for i in range(300)}
    sd["scale"] = torch.tensor(1.0)
    sd["décodeur.poids"] = torch.zeros(2, 2)
    torch.save(sd, path)
    stamp(path)
    with closing(Source(path)) as source:
        got = read_envelope(source)
    assert got is not None
    return got


def test_a_stamped_envelope_is_checked_a_column_at_a_time(envelope: dict[str, Any]) -> None:
    assert envelope_schema._plain_schema(envelope["schema"])
    assert verdict(validate, envelope) is None and verdict(walked, envelope) is None


ODD_VALUES: list[Any] = [None, True, 1, -1, 1.5, "3", [], {}, [3], "\udc80", "é", 2**70, [[1]], {"a": 1}]
TEXTS = ["layers.0.w", "é", "\udc80", "k\ud800", "", "模型"]


def texts(rng: random.Random, n: int) -> list[str]:
    """Strings, now and then a lone surrogate (or, rarely, not a string)."""
    out: list[Any] = [rng.choice(TEXTS[:2]) + str(i) for i in range(n)]
    if rng.random() < 0.4:
        out[rng.randrange(n)] = rng.choice(TEXTS + [3, None, ["x"]])
    return out


def nested(rng: random.Random, inner: Any) -> Any:
    """``inner`` a few levels either side of MAX_DEPTH down."""
    for _ in range(rng.randint(MAX_DEPTH - 5, MAX_DEPTH + 2)):
        inner = [inner]
    return inner


def mutated_rest(data: dict[str, Any], rng: random.Random) -> None:
    """A list of keys in a history entry, tags, per-tensor digests: strings, maybe a bad one, maybe deep."""
    what = rng.randrange(4)
    if not isinstance(data["history"], list):
        data["history"] = []
    if what == 0:
        keys = texts(rng, rng.choice([1, 5, 50]))
        data["history"] = [*data["history"], {"action": "upgrade", "revision": "r1",
                                               "ops": [{"op": "rename", "keys": keys}], "inverse": [keys]}]
    elif what == 1:
        keys, values = texts(rng, 6), texts(rng, 6)
        data["tags"] = dict(zip(keys, values, strict=True)) if all(type(k) is str for k in keys) else {"k": "v"}
    elif what == 2:
        keys = [k for k in texts(rng, 20) if type(k) is str]
        data["digest"] = {"alg": "sha256", "overall": "x", "tensors": dict(zip(keys, texts(rng, len(keys)),
                                                                                strict=True))}
    else:
        data["history"] = [*data["history"], {"action": "upgrade", "ops": [nested(rng, texts(rng, 3))],
                                               "tags": {"a": nested(rng, "x")} if rng.random() < 0.3 else None}]


def mutated(envelope: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The envelope with its schema changed in one to three places."""
    data = copy.deepcopy(envelope)
    schema = data["schema"]
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(schema))
        entry = schema[key]
        what = rng.randrange(14)
        if what == 0:
            schema[key] = rng.choice(ODD_VALUES)
        elif what == 1 and isinstance(entry, dict):
            entry["dtype"] = rng.choice(ODD_VALUES)
        elif what == 2 and isinstance(entry, dict):
            entry["shape"] = rng.choice(ODD_VALUES)
        elif what == 3 and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
            entry["shape"] = [*entry["shape"], rng.choice(ODD_VALUES)]
        elif what == 4 and isinstance(entry, dict):
            entry[rng.choice(["extra", "dtype", "stride"])] = rng.choice(ODD_VALUES)
        elif what == 5 and isinstance(entry, dict):
            entry.pop(rng.choice(["dtype", "shape"]), None)
        elif what == 6:
            schema[rng.choice(["\udc80", "k\ud800", "ok", "é"])] = copy.deepcopy(entry)
        elif what == 7:
            nested: Any = "x"
            for _ in range(rng.choice([10, 70])):
                nested = [nested]
            schema[key] = {"dtype": "float32", "shape": [1], "deep": nested}
        elif what == 8:
            data["schema"] = rng.choice([[], None, {}, "schema", {1: {"dtype": "float32", "shape": []}}])
            return data
        elif what == 9:
            data.pop("schema")
            return data
        elif what == 10:
            data[rng.choice(["tags", "history", "git"])] = rng.choice(ODD_VALUES)
        elif what == 11:  # a record of strings but its schema: their fields are named one by one
            return {"schema": schema, "arch_hash": "sha256:0", "layout": rng.choice(TEXTS)}
        else:
            mutated_rest(data, rng)
    return data


def test_mutated_schemas_get_the_verdict_of_the_walk(envelope: dict[str, Any]) -> None:
    rng = random.Random(7)
    refused = 0
    for _ in range(1000):
        data = mutated(envelope, rng)
        expected = verdict(walked, data)
        assert verdict(validate, data) == expected
        if envelope_schema._plain_schema(data.get("schema")):
            assert envelope_schema._schema(data["schema"]) and verdict(check_structure, data["schema"]) is None
        refused += expected is not None
    assert 300 < refused < 1000  # both kinds of verdict were exercised
