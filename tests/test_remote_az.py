"""User story: "Our checkpoints live in Azure Blob Storage: I inspect them, see their revision and plan
an upgrade without downloading them; a missing container or blob is one line, and my account key is
never shown." (Writes to az:// are tests/test_remote_az_write.py.)

Against Azurite (Microsoft's Azure Storage emulator, the Blob service, in memory; installed from npm
by scripts/setup.sh) on 127.0.0.1 through adlfs, as a subprocess CLI. The account is Azurite's
well-known development account, named by ``AZURE_STORAGE_CONNECTION_STRING`` as for a real one.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.azurite import KEY, running

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def azurite() -> Iterator[tuple[dict[str, str], Any]]:
    with running() as served:
        yield served


def test_blobs_in_azure_are_read_by_range(cli: Cli, azurite: tuple[dict[str, str], Any],
                                            tmp_path: Path) -> None:
    env, container = azurite
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save({f"layers.{i}.weight": torch.randn(256, 1024) for i in range(4)} | {"head.bias": torch.zeros(2)}, buf)
    big = buf.getvalue()
    container.upload_blob("runs/m.pt", big)
    url = "az://ckpts/runs/m.pt"
    info = cli("inspect", url, "--json", env=env)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["tensors"] == 5 and summary["path"] == url
    assert 0 < summary["transfer"]["bytes_received"] < len(big) // 8  # the directory and data.pkl, not 4 MiB
    assert cli("current", "az://ckpts/runs/*.pt", env=env).stdout.strip() == f"{url}: unstamped"
    assert cli("current", "abfs://ckpts/runs/m.pt", env=env).stdout.strip() == "unstamped"

    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", "ckpt.rename('head.bias', 'out.bias')")):
        (versions / f"{rev}.py").write_text(f"revision = {rev!r}\ndown_revision = {down!r}\n\n\n"
                                            f"def upgrade(ckpt):\n    {code}\n")
    plan = cli("upgrade", url, "--from", "c1", "--migrations", versions.parent, "--dry-run", env=env)
    assert plan.returncode == 0 and "would upgrade c1 -> c2" in plan.stdout, plan.stdout + plan.stderr
    local = tmp_path / "m.pt"
    done = cli("upgrade", url, "--from", "c1", "--migrations", versions.parent, "-o", local, env=env)
    assert done.returncode == 0 and "out.bias" in torch.load(local, weights_only=True), done.stderr
    assert container.download_blob("runs/m.pt").readall() == big
    assert [b.name for b in container.list_blobs()] == ["runs/m.pt"]


def test_a_missing_container_or_blob_is_one_line_without_the_key(cli: Cli, azurite: tuple[dict[str, str], Any]) -> None:
    env, _container = azurite
    for url in ("az://ckpts/runs/nope.pt", "az://nocontainer/m.pt"):
        for args in (("inspect", url), ("current", url)):
            proc = cli(*args, env=env)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
            assert proc.stderr.startswith(f"ckptmigrate: error: {url}: cannot read: "), proc.stderr
            assert KEY not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    anonymous = cli("inspect", "az://ckpts/runs/m.pt")  # no connection string, no account
    assert anonymous.returncode == 2 and anonymous.stderr.count("\n") == 1, anonymous.stderr
    assert "az://ckpts/runs/m.pt: cannot read: no credentials found (set AZURE_STORAGE_CONNECTION_STRING" \
        in anonymous.stderr
