"""User story: "Our checkpoints live on the Hugging Face Hub: I upgrade, downgrade and stamp them where
they are, or write an upgraded copy to another path or repository, and each write is one commit on
my branch, on top of the commit I read: the old file stays in the repository's history, a run that
lost a race commits nothing, a tag is not written to, and my token is never shown."

Against a Hub on 127.0.0.1 (tests/hubserver.py: reads, plus the preupload, LFS batch and commit
endpoints, a 412 for a stale ``parentCommit``), through huggingface_hub's ``HfApi.create_commit`` as
a subprocess CLI, Xet off (``HF_HUB_DISABLE_XET=1``: the client uploads through Xet whenever hf_xet
is installed, without asking the server, and this Hub has no Xet). The bytes are the ones the
server counted.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from ckptmigrate.storage.ranges import MIN_READ
from tests.hubserver import HubServer

Cli = Callable[..., subprocess.CompletedProcess[str]]
TOKEN = "hf_writeTokenNeverShown0987654321"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(hub: HubServer) -> dict[str, str]:
    hub.served.reset()
    hub.tokens.clear()
    hub.store.uploads.clear()
    return {**hub.env, "HF_TOKEN": TOKEN}


@pytest.fixture
def repo(hub: HubServer, tmp_path: Path) -> Callable[..., str]:
    """A new repository of the test's own, its files as its first commit on ``main``."""
    made = iter(range(100))

    def make(files: dict[str, bytes]) -> str:
        repo_id = f"alice/{tmp_path.name[-30:].replace('_', '-')}-{next(made)}"
        for name, data in files.items():
            (hub.root / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            (hub.root / repo_id / name).write_bytes(data)
        return repo_id

    return make


def checkpoint(numel: int = 64 * 1024, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"body.weight": torch.randn(numel), "head.bias": torch.arange(4.0)}, buf)
    return buf.getvalue()


def loads(data: bytes) -> dict[str, torch.Tensor]:
    return dict(torch.load(io.BytesIO(data), weights_only=True))


def chain(tmp_path: Path, race: str | None = None) -> Path:
    """c1 (base) -> c2: a rename; ``race``: a line the c2 script runs first (another writer)."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (versions / "c1.py").write_text('"""c1."""\nrevision = "c1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
                                    "    pass\n\n\ndef downgrade(ckpt):\n    pass\n")
    body = f"    {race}\n" if race else ""
    (versions / "c2.py").write_text(
        '"""c2."""\nimport os\n\nrevision = "c2"\ndown_revision = "c1"\n\n\ndef upgrade(ckpt):\n'
        f"{body}    ckpt.rename('head.bias', 'out.bias')\n\n\ndef downgrade(ckpt):\n"
        "    ckpt.rename('out.bias', 'head.bias')\n")
    return versions.parent


def writes(hub: HubServer) -> list[str]:
    """The requests that were not reads."""
    return [line for line in hub.served.log if not line.startswith(("GET", "HEAD", "POST /api/models/alice"))
            or re.match(r"POST /api/models/[^ ]+/(preupload|commit)/", line)]


def test_upgrade_in_place_is_one_commit_on_top_of_the_commit_read(cli: Cli, hub: HubServer, env: dict[str, str],
                                                                   repo: Callable[..., str], tmp_path: Path) -> None:
    original = checkpoint()
    repo_id = repo({"m.pt": original, "config.json": b"{}"})
    read_at = hub.commit(repo_id)
    url = f"hf://{repo_id}/m.pt"
    plan = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--dry-run", "--json", env=env)
    assert plan.returncode == 0 and hub.commit(repo_id) == read_at, plan.stderr
    planning = json.loads(plan.stdout)["transfer"]["bytes_received"]
    assert not writes(hub) and planning < len(original) // 2  # a plan reads the directory and data.pkl
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    head = hub.commit(repo_id)
    commit = hub.history(repo_id).commits[head]
    assert head != read_at and commit.parent == read_at  # one commit, on top of the commit read
    assert "ckptmigrate" in commit.title and "upgrade c1 -> c2" in commit.title, commit.title
    assert read_at in commit.description
    new = hub.file(repo_id, "m.pt")
    assert sorted(loads(new)) == ["body.weight", "out.bias"]
    assert torch.equal(loads(new)["body.weight"], loads(original)["body.weight"])
    assert set(commit.files) == {"m.pt", "config.json"} and commit.files["config.json"] == b"{}"

    # the backup is the Hub's history: the commit read, still readable as it was
    assert result["backup"] == f"hf://{repo_id}@{read_at}/m.pt"
    assert hub.file(repo_id, "m.pt", read_at) == original
    old = cli("current", result["backup"], env=env)
    assert old.returncode == 0 and old.stdout.strip() == "unstamped", old.stdout + old.stderr
    assert cli("current", url, env=env).stdout.strip() == "c2"

    # LFS has no splice: the whole new file went up, once; the kept bytes came down to be staged
    transfer = result["transfer"]
    assert hub.store.uploads == [len(new)] and transfer["bytes_sent"] == len(new)
    assert len(original) // 2 < transfer["bytes_received"] - planning <= len(original) + MIN_READ  # + a header read
    assert set(hub.tokens) == {TOKEN} and TOKEN not in proc.stdout + proc.stderr

    # and back down: another commit, on top of the last
    down = cli("downgrade", url, "--to", "c1", "--migrations", chain(tmp_path), env=env)
    assert down.returncode == 0, down.stderr
    assert hub.history(repo_id).commits[hub.commit(repo_id)].parent == head
    assert sorted(loads(hub.file(repo_id, "m.pt"))) == ["body.weight", "head.bias"]
