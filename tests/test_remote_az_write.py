"""User story: "Our checkpoints live in Azure Blob Storage: I upgrade and stamp them in place, or
write an upgraded copy to another blob, and a blob is never half-written, never lost (a backup is
kept), and never overwritten by a run that lost a race."

Against Azurite (tests/azurite.py) on 127.0.0.1 through adlfs and azure-storage-blob, as a
subprocess CLI. A write stages blocks and commits the block list conditionally on the ETag read;
the blobs here are each one Put Blob, so the kept bytes of a metadata-only migration are streamed
down and staged again (Azurite does not implement Put Block From URL; a blob of committed blocks is
appended to instead: tests/test_remote_append.py); the backup is a server-side copy.
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

from ckptmigrate import api
from tests.azurite import KEY, running

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def azurite() -> Iterator[tuple[dict[str, str], Any]]:
    with running() as served:
        yield served


@pytest.fixture
def env(azurite: tuple[dict[str, str], Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in azurite[0].items():
        monkeypatch.setenv(k, v)
    return azurite[0]


@pytest.fixture
def container(azurite: tuple[dict[str, str], Any]) -> Any:
    return azurite[1]


@pytest.fixture
def prefix(tmp_path: Path) -> str:
    """A blob-name prefix of the test's own in the shared container."""
    return tmp_path.name


def checkpoint(numel: int = 256 * 1024, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"body.weight": torch.randn(numel), "head.bias": torch.arange(4.0)}, buf)
    return buf.getvalue()


def chain(tmp_path: Path, race: str | None = None) -> Path:
    """c1 (base) -> c2: a rename; ``race``: a line the c2 script runs first (another writer)."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (versions / "c1.py").write_text('"""c1."""\nrevision = "c1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
                                    "    pass\n")
    body = f"    {race}\n" if race else ""
    (versions / "c2.py").write_text(
        '"""c2."""\nimport os\n\nrevision = "c2"\ndown_revision = "c1"\n\n\ndef upgrade(ckpt):\n'
        f"{body}    ckpt.rename('head.bias', 'out.bias')\n")
    return versions.parent


def names(container: Any, prefix: str) -> list[str]:
    return sorted(b.name for b in container.list_blobs(name_starts_with=prefix + "/"))


def read(container: Any, name: str) -> bytes:
    return bytes(container.download_blob(name).readall())


def loads(data: bytes) -> dict[str, torch.Tensor]:
    return dict(torch.load(io.BytesIO(data), weights_only=True))


def test_upgrade_in_place_keeps_a_backup_and_reports_the_transfer(
        cli: Cli, env: dict[str, str], container: Any, prefix: str, tmp_path: Path) -> None:
    original = checkpoint()
    container.upload_blob(f"{prefix}/m.pt", original)
    url = f"az://ckpts/{prefix}/m.pt"
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backup"] == f"{url}.bak"
    new = read(container, f"{prefix}/m.pt")
    assert sorted(loads(new)) == ["body.weight", "out.bias"]
    assert torch.equal(loads(new)["body.weight"], loads(original)["body.weight"])
    assert read(container, f"{prefix}/m.pt.bak") == original
    transfer = result["transfer"]
    # the backup is a server-side copy; the kept bytes come down and go up again (Azurite has no
    # Put Block From URL, so it is not used)
    assert transfer["bytes_copied_server_side"] == len(original)
    assert transfer["bytes_sent"] == len(new) and transfer["bytes_received"] >= len(new) - 4096
    assert cli("current", url, env=env).stdout.strip() == "c2"
    assert names(container, prefix) == [f"{prefix}/m.pt", f"{prefix}/m.pt.bak"]
    container.upload_blob(f"{prefix}/m.pt", original, overwrite=True)  # again: .bak is never overwritten
    again = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), env=env)
    assert again.returncode == 0, again.stderr
    assert names(container, prefix) == [f"{prefix}/m.pt", f"{prefix}/m.pt.bak", f"{prefix}/m.pt.bak.1"]
    assert read(container, f"{prefix}/m.pt.bak") == original


def test_dash_o_between_blobs_and_from_a_local_file(cli: Cli, env: dict[str, str], container: Any, prefix: str,
                                                    tmp_path: Path) -> None:
    original = checkpoint()
    container.upload_blob(f"{prefix}/m.pt", original)
    migrations = chain(tmp_path)
    src, dst = f"az://ckpts/{prefix}/m.pt", f"az://ckpts/{prefix}/out/m.pt"
    done = cli("upgrade", src, "--from", "c1", "--migrations", migrations, "-o", dst, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(loads(read(container, f"{prefix}/out/m.pt"))) == ["body.weight", "out.bias"]
    assert read(container, f"{prefix}/m.pt") == original  # the source is untouched
    again = cli("upgrade", src, "--from", "c1", "--migrations", migrations, "-o", dst, env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert f"{dst}: the output exists" in again.stderr
    nowhere = cli("upgrade", src, "--from", "c1", "--migrations", migrations, "-o", "az://nocontainer/m.pt", env=env)
    assert nowhere.returncode == 2 and nowhere.stderr.count("\n") == 1, nowhere.stderr
    assert "az://nocontainer/m.pt: cannot write: the bucket does not exist" in nowhere.stderr, nowhere.stderr
    assert KEY not in nowhere.stderr

    local = tmp_path / "local.pt"
    local.write_bytes(checkpoint(seed=1))
    pushed = f"az://ckpts/{prefix}/pushed.pt"
    up = cli("upgrade", local, "--from", "c1", "--migrations", migrations, "-o", pushed, env=env)
    assert up.returncode == 0, up.stderr
    assert cli("current", pushed, env=env).stdout.strip() == "c2"
    assert local.read_bytes() == checkpoint(seed=1)
    assert names(container, prefix) == [f"{prefix}/m.pt", f"{prefix}/out/m.pt", f"{prefix}/pushed.pt"]


def test_stamp_in_place(cli: Cli, env: dict[str, str], container: Any, prefix: str) -> None:
    original = checkpoint()
    container.upload_blob(f"{prefix}/m.pt", original)
    url = f"az://ckpts/{prefix}/m.pt"
    proc = cli("stamp", url, "--tag", "run=7", "--digest", env=env)
    assert proc.returncode == 0, proc.stderr
    assert api.inspect(url)["envelope"]["tags"] == {"run": "7"}
    assert loads(read(container, f"{prefix}/m.pt")).keys() == loads(original).keys()
    ok = cli("verify", url, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith(f"{url}: OK"), ok.stdout + ok.stderr


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_the_loser_of_two_writers_writes_nothing(cli: Cli, env: dict[str, str], container: Any, prefix: str,
                                                 tmp_path: Path, suffix: str) -> None:
    from safetensors.torch import save

    if suffix == "pt":
        ours, theirs = checkpoint(), checkpoint(seed=1)
    else:
        ours, theirs = (save({"body.weight": torch.randn(1000), "head.bias": torch.arange(4.0)}) for _ in "ab")
    name = f"{prefix}/m.{suffix}"
    container.upload_blob(name, ours)
    (tmp_path / "theirs").write_bytes(theirs)
    race = ("from azure.storage.blob import BlobClient; BlobClient.from_connection_string("
            f"os.environ['AZURE_STORAGE_CONNECTION_STRING'], 'ckpts', {name!r}).upload_blob("
            f"open({str(tmp_path / 'theirs')!r}, 'rb').read(), overwrite=True)")
    url = f"az://ckpts/{name}"
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path, race), "--json", env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{url}: the object changed since it was read (ETag" in proc.stderr
    error = json.loads(proc.stdout)["error"]
    found = container.get_blob_client(name).get_blob_properties().etag
    assert (error["type"], error["found"]) == ("ObjectChanged", found)
    assert read(container, name) == theirs  # their blob stands
    assert names(container, prefix) == [name]  # the backup taken for the lost write is gone


def test_a_safetensors_rename_streams_the_data_behind_a_new_header(cli: Cli, env: dict[str, str], container: Any,
                                                                   prefix: str, tmp_path: Path) -> None:
    from safetensors.torch import load, save

    tensors = {"body.weight": torch.randn(300_000), "head.bias": torch.arange(4.0)}
    original = save(tensors)
    container.upload_blob(f"{prefix}/m.safetensors", original)
    url = f"az://ckpts/{prefix}/m.safetensors"
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    new = read(container, f"{prefix}/m.safetensors")
    got = load(new)
    assert sorted(got) == ["body.weight", "out.bias"]
    assert torch.equal(got["body.weight"], tensors["body.weight"])
    assert torch.equal(got["out.bias"], tensors["head.bias"])
    old_head, new_head = (8 + int.from_bytes(b[:8], "little") for b in (original, new))
    assert new[new_head:] == original[old_head:]
    assert read(container, f"{prefix}/m.safetensors.bak") == original
    transfer = json.loads(proc.stdout)["transfer"]
    assert transfer["bytes_sent"] == len(new)
    assert cli("current", url, env=env).stdout.strip() == "c2"


def test_azure_itself_refuses_a_stale_commit_and_an_interrupted_one_changes_nothing(
        env: dict[str, str], container: Any, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptmigrate.errors import ObjectChanged
    from ckptmigrate.storage import azure_write
    from ckptmigrate.util.urls import as_location

    original = checkpoint(1024)
    name = f"{prefix}/m.pt"
    container.upload_blob(name, original)
    url = as_location(f"az://ckpts/{name}")
    staged = tmp_path / "new.pt"
    staged.write_bytes(checkpoint(1024, seed=1))
    monkeypatch.setattr(azure_write.AzureObject, "check_unchanged", lambda self: None)  # the commit's own If-Match
    stale = azure_write.AzureObject.of(url, '"0x8D0000000000000"')
    with pytest.raises(ObjectChanged, match="the object changed since it was read"):
        azure_write.upload(stale, staged)
    create = azure_write.AzureObject.of(url, None)
    create.create_only = True  # If-None-Match: * on a blob that is there
    with pytest.raises(ObjectChanged, match="an object appeared there"):
        azure_write.upload(create, staged)
    # interrupted between staged blocks: nothing is committed
    monkeypatch.setenv("CKPTMIGRATE_AZ_BLOCK_SIZE", "1024")
    current = azure_write.AzureObject.of(url, container.get_blob_client(name).get_blob_properties().etag)
    calls = 0
    real = azure_write._Blocks.data

    def interrupted(self: Any, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        real(self, data)

    monkeypatch.setattr(azure_write._Blocks, "data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        azure_write.upload(current, staged)
    assert read(container, name) == original
    assert names(container, prefix) == [name]
    monkeypatch.setattr(azure_write._Blocks, "data", real)
    azure_write.upload(current, staged)  # several blocks, one commit
    assert read(container, name) == staged.read_bytes()
