"""A team keeps its migration chain honest in CI: `check` fails when the model changed without a
migration, `diff` shows what changed between any two of checkpoint / revision / model, and
`revision --autogenerate` writes the missing migration."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

from tests.conftest import ROOT

MODEL_V1 = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def build():
    return Net()
"""

HUGE = """
from torch import nn


def build():
    # about 30 billion parameters: only the meta device can hold it
    return nn.Sequential(*[nn.Linear(16384, 16384, bias=False) for _ in range(112)])
"""


def _project(tmp_path: Path, model_source: str) -> Path:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "netmod.py").write_text(textwrap.dedent(model_source))
    (project / "pyproject.toml").write_text('[tool.ckptmigrate]\nmodel = "netmod:build"\n')
    return project


def test_check_passes_then_fails_after_a_refactor_and_autogenerate_fixes_it(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    project = _project(tmp_path, MODEL_V1)
    cli("init", cwd=project, check=True)
    cli("revision", "-m", "initial", "--rev-id", "0001", "--autogenerate", cwd=project, check=True)
    assert (project / "migrations" / "versions" / "0001_initial.schema.json").exists()
    ok = cli("check", cwd=project)
    assert ok.returncode == 0, ok.stderr
    assert "ok: head 0001" in ok.stdout

    torch.manual_seed(0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("netmod_v1", project / "netmod.py")
    assert spec is not None and spec.loader is not None
    v1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v1)
    old_model = v1.build()
    torch.save(old_model.state_dict(), project / "old.pth")

    (project / "netmod.py").write_text(textwrap.dedent(MODEL_V1).replace("self.blocks", "self.layers"))
    failed = cli("check", cwd=project)
    assert failed.returncode == 1
    assert "the model changed but no migration describes it" in failed.stdout
    assert "blocks.{0..2}.{bias,weight} -> layers.{0..2}.{bias,weight}" in failed.stdout
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr

    cli("revision", "-m", "rename blocks", "--rev-id", "0002", "--autogenerate", cwd=project, check=True)
    script = (project / "migrations" / "versions" / "0002_rename_blocks.py").read_text()
    assert script.count("ckpt.") == 1, script
    assert cli("check", cwd=project).returncode == 0

    cli("upgrade", "old.pth", cwd=project, check=True)
    spec2 = importlib.util.spec_from_file_location("netmod_v2", project / "netmod.py")
    assert spec2 is not None and spec2.loader is not None
    v2 = importlib.util.module_from_spec(spec2)
    spec2.loader.exec_module(v2)
    new_model = v2.build()
    new_model.load_state_dict(torch.load(project / "old.pth"))
    x = torch.randn(4, 8)
    torch.testing.assert_close(old_model(x), new_model(x))


def test_diff_in_every_combination(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from ckptmigrate import api
    from ckptmigrate.autogenerate.plan import diff_schemas
    from ckptmigrate.chain import schemas
    from ckptmigrate.example import model_at

    torch.save(model_at(1).state_dict(), tmp_path / "era1.pth")
    torch.save(model_at(6).state_dict(), tmp_path / "era6.pth")
    graph = api.revision_graph(str(ROOT / "migrations"))
    spec = "ckptmigrate.example:current_model"
    names = [str(tmp_path / "era1.pth"), str(tmp_path / "era6.pth"), "0001", "0004", "model"]
    same = {frozenset({names[0], "0001"}), frozenset({names[1], "model"})}
    for a in names:
        for b in names:
            _, schema_a = schemas.resolve(a, graph=graph, model=spec)
            _, schema_b = schemas.resolve(b, graph=graph, model=spec)
            expected_same = a == b or frozenset({a, b}) in same
            assert diff_schemas(schema_a, schema_b).empty == expected_same, (a, b)

    common = ["--migrations", str(ROOT / "migrations"), "--model", spec]
    data = json.loads(cli("diff", "era1.pth", "model", *common, "--json", check=True).stdout)
    assert not data["same"] and data["renamed"]["module.embed.weight"] == "embed.weight"
    text = cli("diff", "0003", "0004", *common, check=True).stdout
    assert "removed   layers.{0,1}.attn.qkv.weight  [96, 32] float32" in text
    assert "added     layers.{0,1}.attn.{k,q,v}.weight  [32, 32] float32" in text
    assert len(text.splitlines()) < 8


def test_a_30b_parameter_model_is_checked_on_the_meta_device(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    project = _project(tmp_path, HUGE)
    cli("init", cwd=project, check=True)
    cli("revision", "-m", "initial", "--rev-id", "0001", "--autogenerate", cwd=project, check=True)
    schema = json.loads((project / "migrations" / "versions" / "0001_initial.schema.json").read_text())
    params = sum(torch.Size(e["shape"]).numel() for e in schema.values())
    assert params > 30e9
    result = cli("check", cwd=project)
    assert result.returncode == 0, result.stderr
