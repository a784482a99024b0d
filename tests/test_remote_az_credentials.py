"""User story: "Our storage account is reached as production reaches it — over HTTPS, by its name with
an account key or with a SAS token, no connection string — and I upgrade a checkpoint in place
there: it is written with its backup, and the secret never shows."

Against Azurite over HTTPS (tests/azurite.py: a self-signed certificate for 127.0.0.1 the clients
are told to trust) through adlfs and azure-storage-blob, as a subprocess CLI: the account's host
comes from ``FSSPEC_AZ_ACCOUNT_HOST`` (fsspec's settings for the ``az`` filesystem), the credential
from ``AZURE_STORAGE_ACCOUNT_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``, as adlfs reads them. A SAS that
may read but not write fails the write in one line and leaves the blob and the container as they were.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.azurite import KEY, running_https

Cli = Callable[..., subprocess.CompletedProcess[str]]
ACCOUNT = "devstoreaccount1"


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Any]]:
    with running_https(tmp_path_factory.mktemp("certs")) as served:
        yield served


def sas(*, write: bool) -> str:
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    allowed = AccountSasPermissions(read=True, list=True, write=write, add=write, create=write, delete=write)
    return generate_account_sas(ACCOUNT, KEY, ResourceTypes(service=True, container=True, object=True), allowed,
                                expiry=datetime.now(UTC) + timedelta(hours=1))


def chain(tmp_path: Path) -> Path:
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "c1.py").write_text('revision = "c1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n')
    (versions / "c2.py").write_text('revision = "c2"\ndown_revision = "c1"\n\n\ndef upgrade(ckpt):\n'
                                    "    ckpt.rename('head.bias', 'out.bias')\n")
    return versions.parent


def put_checkpoint(container: Any, name: str) -> bytes:
    buf = io.BytesIO()
    torch.save({"body.weight": torch.randn(4096), "head.bias": torch.arange(4.0)}, buf)
    container.upload_blob(name, buf.getvalue())
    return buf.getvalue()


def blobs(container: Any, prefix: str) -> list[str]:
    return sorted(b.name for b in container.list_blobs(name_starts_with=prefix + "/"))


@pytest.mark.parametrize("credential", ["account key", "SAS token"])
def test_upgrade_in_place_with_the_accounts_key_or_a_sas(cli: Cli, azurite: tuple[dict[str, str], Any],
                                                         tmp_path: Path, credential: str) -> None:
    endpoint, container = azurite
    prefix = tmp_path.name
    name, secret = (("AZURE_STORAGE_ACCOUNT_KEY", KEY) if credential == "account key"
                    else ("AZURE_STORAGE_SAS_TOKEN", sas(write=True)))
    env = {**endpoint, name: secret}
    original = put_checkpoint(container, f"{prefix}/m.pt")
    url = f"az://ckpts/{prefix}/m.pt"

    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)

    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["written"] and row["backup"] == f"{url}.bak"
    assert blobs(container, prefix) == [f"{prefix}/m.pt", f"{prefix}/m.pt.bak"]
    assert container.download_blob(f"{prefix}/m.pt.bak").readall() == original
    upgraded = torch.load(io.BytesIO(container.download_blob(f"{prefix}/m.pt").readall()))
    assert set(upgraded) == {"body.weight", "out.bias"}
    assert cli("current", url, env=env, check=True).stdout.strip() == "c2"
    signature = secret.split("sig=")[-1]
    for shown in (proc.stdout, proc.stderr):
        assert secret not in shown and signature not in shown


def test_a_sas_that_may_not_write_fails_in_one_line_and_changes_nothing(
        cli: Cli, azurite: tuple[dict[str, str], Any], tmp_path: Path) -> None:
    endpoint, container = azurite
    prefix = tmp_path.name
    token = sas(write=False)
    original = put_checkpoint(container, f"{prefix}/m.pt")
    url = f"az://ckpts/{prefix}/m.pt"
    env = {**endpoint, "AZURE_STORAGE_SAS_TOKEN": token}

    assert cli("current", url, env=env).returncode == 0  # reading is allowed
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), env=env)

    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"ckptmigrate: error: {url}: cannot back up: access denied"), line
    assert "AuthorizationPermissionMismatch" in line and "RequestId" not in line and "<?xml" not in line, line
    assert token.split("sig=")[-1] not in proc.stderr
    assert blobs(container, prefix) == [f"{prefix}/m.pt"]
    assert container.download_blob(f"{prefix}/m.pt").readall() == original
