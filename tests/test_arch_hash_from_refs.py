"""`inspect` and every envelope hash a state dict's architecture straight from the tensor references
a file was read into, without building its schema first: the hash must be the one the schema gives
(docs/format.md), whatever the keys and shapes — odd ones go the schema's way."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.checkpoint.envelope import Envelope, architecture_hash, architecture_hash_of, schema_of
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.tensors.refs import Deferred, Storage, TensorRef


def page_hash(schema: dict[str, dict[str, Any]]) -> str:
    """The architecture hash as docs/format.md defines it, written out independently."""
    lines = b"".join(
        f"{key}\t{','.join(str(d) for d in schema[key]['shape'])}\t{schema[key]['dtype']}\n".encode()
        for key in sorted(schema)
    )
    return "sha256:" + hashlib.sha256(lines).hexdigest()


def ref(shape: tuple[Any, ...], dtype: str = "float32") -> TensorRef:
    stride = tuple(1 for _ in shape)
    return TensorRef(Storage("0", dtype, "cpu", 64), 0, shape, stride, dtype)


def test_a_saved_model_hashes_as_its_schema(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    sd = {f"layers.{i}.{name}": torch.zeros(shape) for i in range(300)
          for name, shape in (("weight", (4, 3)), ("bias", (4,)), ("scale", ()))}
    sd["step"] = 7  # not a tensor: not in the schema
    torch.save(sd, path)
    with Checkpoint.open(path) as ckpt:
        expected = page_hash(ckpt.schema())
        assert ckpt.arch_hash() == expected
        assert Envelope.build(ckpt.state_dict.entries, layout="flat", describe_code=False).arch_hash == expected


@pytest.mark.parametrize("odd", [
    {"décodeur.poids": ref((2, 2))},  # a key that is not ASCII
    {3: ref((2,))},  # a key that is not a string
    {"flag": ref((True, 2))},  # a dimension that is a bool: its text is "True", not "1"
    {"big": ref((2**40, 1))},
    {"later": Deferred((5, 5), "float16", lambda: torch.zeros(5, 5))},  # not a reference
])
def test_odd_keys_and_shapes_hash_as_their_schema(odd: dict[Any, Any]) -> None:
    sd = {"a.weight": ref((1, 2)), "b.weight": ref((1,), "bfloat16"), **odd, "c": ref(())}
    assert architecture_hash_of(sd) == architecture_hash(schema_of(sd)) == page_hash(schema_of(sd))


def test_two_keys_that_read_alike_are_refused_as_the_schema_refuses_them() -> None:
    sd = {"1": ref((1,)), 1: ref((1,))}
    with pytest.raises(BadInput, match="two keys"):
        architecture_hash_of(sd)


def test_references_sharing_shapes_and_dtypes_or_not_hash_as_their_schema() -> None:
    """A file's references share their shape tuples and dtype strings (each text is made once per
    object): shared, equal but distinct, and different ones hash as the schema does."""
    shared = (3, 4)
    sd = {f"w{i}": ref(shared if i % 3 else (3, 4) if i % 2 else (i, 1), "float16" if i % 5 else "".join("int8"))
          for i in range(300)}
    assert architecture_hash_of(sd) == architecture_hash(schema_of(sd)) == page_hash(schema_of(sd))
