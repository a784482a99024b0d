"""User story: "an envelope of 100,000 tensors is bounds-checked in milliseconds, with the verdict the
step-by-step scan gave."

``boundedjson.check_shape`` counts an untrusted envelope's values and nesting before ``json`` builds
anything. It counts in one pass of compiled code (``formats/_jsonshape.c``) where built, else in a
few C passes of Python's (strings cut out, then brackets and commas counted); the scan it replaced
visited each string and bracket in Python, a second for 100,000 tensors. On real envelopes, on
documents made to sit on each bound, and on byte mutations of them, each way must agree with it:
both accept, or both refuse for one of the same reasons; and the two ways count exactly alike.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from ckptmigrate.formats import boundedjson, native

_STRUCTURE = re.compile(rb'[\[\]{}"]')


def stepwise(data: bytes, *, max_values: int, max_depth: int) -> None:
    """The scan ``check_shape`` replaced, kept as the reference: each string and bracket a step."""
    pos = depth = values = 0
    while (m := _STRUCTURE.search(data, pos)) is not None:
        values += data.count(b",", pos, m.start())
        char = data[m.start()]
        if char == 0x22:
            s = boundedjson._STRING.match(data, m.start())
            if s is None:
                raise boundedjson.JSONBoundsError("not JSON: an unterminated string")
            pos = s.end()
            values += 1
        else:
            pos = m.end()
            if char in b"[{":
                depth += 1
                values += 1
                if depth > max_depth:
                    raise boundedjson.JSONBoundsError(f"nested deeper than {max_depth} levels")
            else:
                depth -= 1
        if values > max_values:
            raise boundedjson.JSONBoundsError(f"holds more than {max_values:,} values")
    if values + data.count(b",", pos) > max_values:
        raise boundedjson.JSONBoundsError(f"holds more than {max_values:,} values")


@pytest.fixture(autouse=True, params=["compiled", "python"])
def counted_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every story here holds for the compiled count (``_jsonshape.c``) and the Python one."""
    if request.param == "python":
        monkeypatch.setattr(boundedjson, "_jsonshape", None)
    elif native.pure_python():
        pytest.skip(f"{native.PURE_PYTHON_ENV} is set")
    else:
        assert boundedjson._jsonshape is not None, "_jsonshape.c is not built: run scripts/setup.sh"
    return str(request.param)


def verdict(check: object, data: bytes, max_values: int, max_depth: int) -> str:
    try:
        check(data, max_values=max_values, max_depth=max_depth)  # type: ignore[operator]
    except boundedjson.JSONBoundsError as exc:
        return str(exc).split(":")[0].split(" than")[0]
    return "accepted"


def envelope(n: int) -> bytes:
    schema = {f"model.layers.{i}.w{i % 7}": {"dtype": "float32", "shape": [64, i % 5 + 1]} for i in range(n)}
    return json.dumps({"schema": schema, "tags": {"note": 'a "quoted" \\ [text] {x}, y'}, "history": [[], {}]},
                      separators=(",", ":")).encode()


def agree(data: bytes, max_values: int, max_depth: int) -> None:
    new = verdict(boundedjson.check_shape, data, max_values, max_depth)
    old = verdict(stepwise, data, max_values, max_depth)
    if new != old and "accepted" in (new, old):
        # only a document whose brackets json.loads refuses anyway may pass the old scan and not this one
        assert new == "not JSON" and old == "accepted", (new, old, data[:200])
        with pytest.raises(ValueError):
            json.loads(data)


def counted(data: bytes) -> tuple[int, int]:
    """The values and the depth the reference scan finds: the smallest bounds that accept ``data``."""
    values = next(v for v in range(1, 10**7) if verdict(stepwise, data, v, 10**6) == "accepted")
    depth = next(d for d in range(0, 10**4) if verdict(stepwise, data, values, d) == "accepted")
    return values, depth


def test_documents_on_each_bound_get_the_same_verdict() -> None:
    for data in (envelope(40), b'{"x":' + b"[" * 30 + b"]" * 30 + b"}", b'["a\\"b", "c,d", {"e": [1, 2, 3]}]'):
        values, depth = counted(data)
        for v in (values - 1, values, values + 1):
            for d in (depth - 1, depth, depth + 1):
                agree(data, v, d)
        assert verdict(boundedjson.check_shape, data, values, depth) == "accepted"
        assert verdict(boundedjson.check_shape, data, values - 1, depth) == "holds more"
        assert verdict(boundedjson.check_shape, data, values, depth - 1) == "nested deeper"


def test_mutated_envelopes_get_the_same_verdict() -> None:
    rng = random.Random(11)
    base = envelope(30)
    values, depth = counted(base)
    for _ in range(600):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data[at] = rng.choice(b'[]{}",\\:a1 ')
        agree(bytes(data), rng.choice((values, values - 3, values + 5)), rng.choice((depth, depth - 1, 64)))


def test_the_compiled_count_is_the_python_count(counted_by: str) -> None:
    compiled = native.load("_jsonshape")
    if compiled is None:
        pytest.skip("the compiled count is not built or not wanted")
    rng = random.Random(5)
    base = envelope(30)
    documents = [base, b"", b'"', b'"\\', b'"a\\"', b"]]][[", b'x"\\', b"[" * 70 + b"]" * 69]
    for _ in range(800):
        data = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(data))
            data[at] = rng.choice(b'[]{}",\\:a1 \x00\xff')
        documents.append(bytes(data[: rng.choice((len(data), rng.randrange(len(data) + 1)))]))
    for data in documents:
        assert compiled.counts(data) == boundedjson.counts(data), data[:200]

