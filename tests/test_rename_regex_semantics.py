"""User story: "I port the key mapping I already wrote for transformers / mmengine, and it does the same."

``ckpt.rename_regex(pattern, repl)`` renames every key as ``re.sub(pattern, repl, key)`` would: the
pattern is searched (anchored with ``^`` when the user wants a prefix), the replacement applies to the
match. Selection patterns (``drop``, ``cast``, ``split``, ...) keep matching the whole key. An error for
a pattern that matches nothing says which of the two applies.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.ops.operations import OpError

Cli = Callable[..., subprocess.CompletedProcess[str]]
MAPPING = (r"^encoder\.layer\.(\d+)\.", r"encoder.blocks.\1.")


class Encoder(nn.Module):
    """A BERT-like encoder whose layers hold a BatchNorm (its module version travels in ``_metadata``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(3))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = nn.ModuleDict({"encoder": Encoder()})  # "encoder.layer." also appears mid-key


def chain(tmp_path: Path, body: str) -> Path:
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1.py").write_text(f'"""Port the key mapping."""\nrevision = "r1"\ndown_revision = None\n\n\n'
                                    f"def upgrade(ckpt):\n    {body}\n")
    return versions.parent


def test_an_anchored_key_mapping_renames_exactly_what_re_sub_renames(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    model = Model()
    original = model.state_dict()
    path = tmp_path / "model.pt"
    torch.save(original, path)
    chain(tmp_path, f"ckpt.rename_regex({MAPPING[0]!r}, {MAPPING[1]!r})")

    cli("upgrade", "model.pt", "--from", "base", "--migrations", "chain", check=True)
    upgraded = torch.load(path)
    want = [re.sub(*MAPPING, k) for k in original]  # what the hand-written converter would give
    assert list(upgraded) == want
    assert "decoder.encoder.layer.0.0.weight" in upgraded  # ^ kept the mid-key occurrence untouched
    for old, new in zip(original, want, strict=True):
        assert torch.equal(upgraded[new], original[old])
    # the module versions follow their modules, so BatchNorm's loader still sees version 2
    meta = upgraded._metadata
    assert meta["encoder.blocks.1.1"] == original._metadata["encoder.layer.1.1"]
    assert "encoder.layer.1.1" not in meta and "decoder.encoder.layer.1.1" in meta

    cli("downgrade", "model.pt", "--to", "base", "--migrations", "chain", check=True)
    restored = torch.load(path)
    assert list(restored) == list(original)
    for key in original:
        assert torch.equal(restored[key], original[key])


def test_an_unanchored_pattern_is_searched_and_replaces_only_the_match(tmp_path: Path) -> None:
    sd = {"encoder.layer.0.weight": torch.ones(2), "decoder.encoder.layer.0.weight": torch.zeros(2),
          "head.weight": torch.ones(1)}
    torch.save(sd, tmp_path / "m.pt")
    with Checkpoint.open(tmp_path / "m.pt") as ckpt:
        ckpt.rename_regex(r"layer\.(\d+)", r"blocks.\1")
        assert list(ckpt.state_dict) == [re.sub(r"layer\.(\d+)", r"blocks.\1", k) for k in sd]
        assert ckpt.journal[0][1]["mapping"] == {"encoder.blocks.0.weight": "encoder.layer.0.weight",
                                                 "decoder.encoder.blocks.0.weight": "decoder.encoder.layer.0.weight"}


@pytest.mark.parametrize(("call", "says"), [
    (lambda c: c.rename_regex(r"^layers\.", "blocks."), "searched in each key, as re.sub does; anchor it with ^"),
    (lambda c: c.drop(r"layer"), "a pattern must match the whole key, as re.fullmatch"),
    (lambda c: c.cast(r"weight", torch.float16), "a pattern must match the whole key, as re.fullmatch"),
])
def test_a_pattern_that_matches_nothing_says_which_semantics_apply(
    tmp_path: Path, call: Callable[[Checkpoint], None], says: str
) -> None:
    torch.save({"encoder.layer.0.weight": torch.ones(2)}, tmp_path / "m.pt")
    with Checkpoint.open(tmp_path / "m.pt") as ckpt, pytest.raises(OpError) as err:
        call(ckpt)
    assert "matches no key" in str(err.value) and says in str(err.value)
