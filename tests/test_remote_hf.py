"""User story: "Our models live on the Hugging Face Hub: I inspect a repository's safetensors file, its
pytorch_model.bin and a sharded model, see their revision and diff them against my local copy without
downloading their weights; a wrong repository, file or revision is one line; my token is never shown."

Against a Hub on 127.0.0.1 (tests/hubserver.py: the Hub's repository, tree and resolve endpoints,
``Range`` honoured), through huggingface_hub's ``HfFileSystem`` pointed at it by ``HF_ENDPOINT``, as
a subprocess CLI. The bytes are the ones the server counted.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckptmigrate import api
from tests.hubserver import HubServer

Cli = Callable[..., subprocess.CompletedProcess[str]]
TOKEN = "hf_testtokenNeverShown1234567890"


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(256, 1024) for i in range(4)} | {"head.bias": torch.zeros(2)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    root = tmp_path_factory.mktemp("hub")
    for name in ("tiny", "legacy", "sharded"):
        (root / "alice" / name).mkdir(parents=True)
    save_file(weights(), str(root / "alice" / "tiny" / "model.safetensors"))
    (root / "alice" / "tiny" / "config.json").write_text('{"model_type": "tiny"}')
    torch.save(weights(), root / "alice" / "legacy" / "pytorch_model.bin")
    sharded = root / "alice" / "sharded"
    full = weights()
    names = sorted(full)
    shard_of = {}
    for i, part in enumerate((names[:3], names[3:]), start=1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: full[k] for k in part}, str(sharded / shard))
        shard_of |= dict.fromkeys(part, shard)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shard_of}))
    api.stamp(sharded, tags={"run": "7"}, digest=True)  # stamped where it was made, then pushed
    server = HubServer(root).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(hub: HubServer) -> dict[str, str]:
    hub.served.reset()
    hub.tokens.clear()
    return {**hub.env, "HF_TOKEN": TOKEN}


def resolved(hub: HubServer) -> list[tuple[str, int, int]]:
    """The file reads the server answered: (file, first byte, last byte); a read without Range is (file, 0, -1)."""
    out = []
    for line in hub.served.log:
        match = re.fullmatch(r"GET /alice/\w+/resolve/\w+/(\S+)(?: bytes=(\d+)-(\d+))?", line)
        if match:
            out.append((match.group(1), int(match.group(2) or 0), int(match.group(3) or -1)))
    return out


def test_a_safetensors_model_is_read_by_its_header(cli: Cli, hub: HubServer, env: dict[str, str],
                                                   tmp_path: Path) -> None:
    url = "hf://alice/tiny/model.safetensors"
    info = cli("inspect", url, "--json", env=env)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["tensors"] == 5 and summary["container"] == "safetensors" and summary["path"] == url
    data = _file(hub, "tiny", "model.safetensors")
    header_end = 8 + int.from_bytes(data[:8], "little")
    reads = resolved(hub)
    assert reads and all(start < header_end and end != -1 for _, start, end in reads), reads
    assert hub.served.body_bytes_sent < 16 * 1024 < len(data) // 100  # the header and the API's JSON, not 4 MiB
    assert summary["transfer"]["bytes_received"] <= hub.served.body_bytes_sent
    assert hub.tokens and set(hub.tokens) == {TOKEN}  # the token went to the server, as a bearer token
    assert TOKEN not in info.stdout + info.stderr

    # a revision by name and by commit id, and a diff against the local copy: headers only
    commit = hub.commit("alice/tiny")
    for spec in ("main", commit):
        current = cli("current", f"hf://alice/tiny@{spec}/model.safetensors", env=env)
        assert current.returncode == 0 and current.stdout.strip() == "unstamped", current.stderr
    listed = cli("current", "hf://alice/tiny/**/*.safetensors", env=env)  # a glob within a repository
    assert listed.stdout.strip() == f"{url}: unstamped", listed.stderr
    across = cli("current", "hf://alice/*/model.safetensors", env=env)  # the Hub lists no repositories here
    assert across.returncode == 2 and across.stderr.count("\n") == 1, across.stderr
    mine = weights()
    mine["out.bias"] = mine.pop("head.bias")
    save_file(mine, str(tmp_path / "mine.safetensors"))
    hub.served.reset()
    diff = cli("diff", url, tmp_path / "mine.safetensors", env=env)
    assert "head.bias" in diff.stdout and "out.bias" in diff.stdout, diff.stdout + diff.stderr
    assert all(end != -1 for _, _, end in resolved(hub)) and hub.served.body_bytes_sent < 16 * 1024


def test_a_pytorch_model_bin_is_read_by_its_directory_and_data_pkl(cli: Cli, hub: HubServer,
                                                                   env: dict[str, str], tmp_path: Path) -> None:
    url = "hf://alice/legacy/pytorch_model.bin"
    size = len(_file(hub, "legacy", "pytorch_model.bin"))
    info = cli("inspect", url, "--json", env=env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["tensors"] == 5
    assert all(end != -1 for _, _, end in resolved(hub)) and hub.served.body_bytes_sent < size // 8, hub.served.log

    # a migration planned on the Hub, written locally (-o); the Hub itself is written by commits on a branch
    # (tests/test_remote_hf_write.py), so a revision that is a commit id is refused before anything is sent
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", "ckpt.rename('head.bias', 'out.bias')")):
        (versions / f"{rev}.py").write_text(f"revision = {rev!r}\ndown_revision = {down!r}\n\n\n"
                                            f"def upgrade(ckpt):\n    {code}\n")
    plan = cli("upgrade", url, "--from", "c1", "--migrations", versions.parent, "--dry-run", env=env)
    assert plan.returncode == 0 and "would upgrade c1 -> c2" in plan.stdout, plan.stdout + plan.stderr
    out = tmp_path / "local.pt"
    done = cli("upgrade", url, "--from", "c1", "--migrations", versions.parent, "-o", out, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(torch.load(out, weights_only=True)) == [*sorted(k for k in weights() if k != "head.bias"),
                                                          "out.bias"]
    assert TOKEN.encode() not in out.read_bytes() and TOKEN not in done.stdout + done.stderr
    hub.served.reset()
    pinned = f"hf://alice/legacy@{hub.commit('alice/legacy')}/pytorch_model.bin"
    refused = cli("upgrade", pinned, "--from", "c1", "--migrations", versions.parent, env=env)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"{pinned}: revision {hub.commit('alice/legacy')} is not a branch, and a Hub commit needs" in refused.stderr
    reads = ("GET", "HEAD", "POST /api/models/alice/legacy/paths-info")
    assert not [line for line in hub.served.log if not line.startswith(reads)]  # nothing sent


def test_a_sharded_model_is_read_by_its_index(cli: Cli, hub: HubServer, env: dict[str, str]) -> None:
    prefix = "hf://alice/sharded"
    current = cli("current", f"{prefix}/", "--json", env=env)
    assert current.returncode == 0, current.stderr
    [row] = json.loads(current.stdout)
    assert row["path"] == prefix and row["stamped"] is True
    read = {name for name, _, _ in resolved(hub)}
    assert "model.safetensors.index.json" in read, hub.served.log
    assert not [name for name in read if name.endswith(".safetensors")]  # never a shard
    ok = cli("verify", f"{prefix}/", env=env)  # every byte: the shards mirrored, their digests checked
    assert ok.returncode == 0 and ok.stdout.startswith(f"{prefix}: OK (5 tensors, "), ok.stdout + ok.stderr
    hub.served.reset()
    info = cli("inspect", f"{prefix}/", "--json", env=env)  # the index and each shard's header, by range
    assert info.returncode == 0, info.stderr
    [summary] = json.loads(info.stdout)
    assert summary["tensors"] == 5
    for name, start, end in resolved(hub):
        if name.endswith(".safetensors"):
            data = _file(hub, "sharded", name)
            assert end != -1 and start < 8 + int.from_bytes(data[:8], "little"), (name, start, end)


@pytest.mark.parametrize(("url", "problem"), [
    ("hf://alice/nope/model.safetensors", "no such repository"),
    ("hf://alice/tiny/nope.safetensors", "no such object"),
    ("hf://alice/tiny@v9/model.safetensors", "no such revision"),
])
def test_a_wrong_repository_file_or_revision_is_one_line(cli: Cli, env: dict[str, str], url: str,
                                                          problem: str) -> None:
    for args in (("inspect", url), ("current", url), ("diff", url, url)):
        proc = cli(*args, env=env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith(f"ckptmigrate: error: {url}: cannot read: {problem}"), proc.stderr
        assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr


def _file(hub: HubServer, repo: str, name: str) -> bytes:
    return (hub.root / "alice" / repo / name).read_bytes()
