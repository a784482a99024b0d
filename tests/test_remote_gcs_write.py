"""User story: "Our checkpoints live in Google Cloud Storage: I upgrade and stamp them in place, or
write an upgraded copy to another key, and an object is never half-written, never lost (a backup is
kept), and never overwritten by a run that lost a race."

Against a real GCS emulator (gcp-storage-emulator, the JSON API, in memory) on 127.0.0.1 through
gcsfs, as a subprocess CLI (and the API where an interruption is set up). GCS cannot splice byte
ranges server-side: a torch zip's metadata-only rewrite is the old object and an appended tail
joined by ``compose``; every other write streams through one resumable upload. The emulator does
not enforce ``ifGenerationMatch``, so the losing writer is caught by the generation check made
right before the last chunk (the chunk that creates the object) or the ``compose``.
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
from ckptmigrate.storage import gcs_write
from ckptmigrate.storage.staged import staged
from ckptmigrate.util.urls import as_location
from tests.objectstores import running_gcs

Cli = Callable[..., subprocess.CompletedProcess[str]]
CHUNK = 256 << 10  # GCS's smallest chunk: a 1 MiB object goes up in four


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[dict[str, str], Any]]:
    with running_gcs(CKPTMIGRATE_GCS_CHUNK_SIZE=str(CHUNK)) as served:
        yield served


@pytest.fixture
def env(emulator: tuple[dict[str, str], Any]) -> dict[str, str]:
    return emulator[0]


@pytest.fixture
def bucket(emulator: tuple[dict[str, str], Any]) -> Any:
    return emulator[1]


@pytest.fixture
def prefix(tmp_path: Path) -> str:
    """A key prefix of the test's own in the shared bucket."""
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


def names(bucket: Any, prefix: str) -> list[str]:
    return sorted(b.name for b in bucket.client.list_blobs(bucket, prefix=prefix + "/"))


def loads(data: bytes) -> dict[str, torch.Tensor]:
    return dict(torch.load(io.BytesIO(data), weights_only=True))


def test_upgrade_in_place_keeps_a_backup_and_reports_the_transfer(cli: Cli, env: dict[str, str], bucket: Any,
                                                                  prefix: str, tmp_path: Path) -> None:
    original = checkpoint()
    bucket.blob(f"{prefix}/m.pt").upload_from_string(original)
    url = f"gs://ckpts/{prefix}/m.pt"
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backup"] == f"{url}.bak"
    new = bucket.blob(f"{prefix}/m.pt").download_as_bytes()
    assert sorted(loads(new)) == ["body.weight", "out.bias"]
    assert torch.equal(loads(new)["body.weight"], loads(original)["body.weight"])
    assert bucket.blob(f"{prefix}/m.pt.bak").download_as_bytes() == original
    transfer = result["transfer"]
    # the backup is a rewrite; the new object is the old one and an appended tail, joined by compose
    # (tests/test_remote_append.py counts the bytes at the server)
    assert new[:len(original)] == original
    assert transfer["bytes_copied_server_side"] == 2 * len(original)
    assert transfer["bytes_sent"] == len(new) - len(original) < len(original) // 10
    assert cli("current", url, env=env).stdout.strip() == "c2"
    assert names(bucket, prefix) == [f"{prefix}/m.pt", f"{prefix}/m.pt.bak"]


def test_dash_o_between_keys_and_from_a_local_file(cli: Cli, env: dict[str, str], bucket: Any, prefix: str,
                                                   tmp_path: Path) -> None:
    original = checkpoint()
    bucket.blob(f"{prefix}/m.pt").upload_from_string(original)
    migrations = chain(tmp_path)
    src, dst = f"gs://ckpts/{prefix}/m.pt", f"gs://ckpts/{prefix}/out/m.pt"
    done = cli("upgrade", src, "--from", "c1", "--migrations", migrations, "-o", dst, env=env)
    assert done.returncode == 0, done.stderr
    assert sorted(loads(bucket.blob(f"{prefix}/out/m.pt").download_as_bytes())) == ["body.weight", "out.bias"]
    assert bucket.blob(f"{prefix}/m.pt").download_as_bytes() == original  # the source is untouched
    again = cli("upgrade", src, "--from", "c1", "--migrations", migrations, "-o", dst, env=env)
    assert again.returncode == 2 and f"{dst}: the output exists" in again.stderr, again.stderr
    nowhere = cli("upgrade", src, "--from", "c1", "--migrations", migrations, "-o", "gs://no-bucket/m.pt", env=env)
    assert nowhere.returncode == 2 and nowhere.stderr.count("\n") == 1, nowhere.stderr
    assert "gs://no-bucket/m.pt: cannot write: the bucket does not exist" in nowhere.stderr

    local = tmp_path / "local.pt"
    local.write_bytes(checkpoint(seed=1))
    pushed = f"gs://ckpts/{prefix}/pushed.pt"
    up = cli("upgrade", local, "--from", "c1", "--migrations", migrations, "-o", pushed, env=env)
    assert up.returncode == 0, up.stderr
    assert cli("current", pushed, env=env).stdout.strip() == "c2"
    assert local.read_bytes() == checkpoint(seed=1)
    assert names(bucket, prefix) == [f"{prefix}/m.pt", f"{prefix}/out/m.pt", f"{prefix}/pushed.pt"]


def test_stamp_in_place(cli: Cli, env: dict[str, str], bucket: Any, prefix: str) -> None:
    original = checkpoint()
    bucket.blob(f"{prefix}/m.pt").upload_from_string(original)
    url = f"gs://ckpts/{prefix}/m.pt"
    proc = cli("stamp", url, "--tag", "run=7", "--digest", env=env)
    assert proc.returncode == 0, proc.stderr
    assert api.inspect(url)["envelope"]["tags"] == {"run": "7"}
    assert loads(bucket.blob(f"{prefix}/m.pt").download_as_bytes()).keys() == loads(original).keys()
    ok = cli("verify", url, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith(f"{url}: OK"), ok.stdout + ok.stderr


@pytest.mark.parametrize("numel", [1024, 256 * 1024], ids=["one-chunk", "four-chunks"])
def test_the_loser_of_two_writers_writes_nothing(cli: Cli, env: dict[str, str], bucket: Any, prefix: str,
                                                 tmp_path: Path, numel: int) -> None:
    bucket.blob(f"{prefix}/m.pt").upload_from_string(checkpoint(numel))
    theirs = checkpoint(numel, seed=1)
    (tmp_path / "theirs.pt").write_bytes(theirs)
    race = ("from google.cloud import storage; c = storage.Client.create_anonymous_client(); "
            "c._connection.API_BASE_URL = os.environ['STORAGE_EMULATOR_HOST']; "
            f"c.bucket('ckpts').blob('{prefix}/m.pt').upload_from_filename({str(tmp_path / 'theirs.pt')!r})")
    url = f"gs://ckpts/{prefix}/m.pt"
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path, race), "--json", env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{url}: the object changed since it was read (generation" in proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert (error["type"], error["found"]) == ("ObjectChanged", str(bucket.get_blob(f"{prefix}/m.pt").generation))
    assert bucket.blob(f"{prefix}/m.pt").download_as_bytes() == theirs  # their object stands
    assert names(bucket, prefix) == [f"{prefix}/m.pt"]  # the backup taken for the lost write is gone


def test_an_interrupted_run_changes_no_object(env: dict[str, str], bucket: Any, prefix: str, tmp_path: Path) -> None:
    original = checkpoint()
    bucket.blob(f"{prefix}/m.pt").upload_from_string(original)
    url = f"gs://ckpts/{prefix}/m.pt"
    # interrupted after the local command, before anything is uploaded
    with pytest.raises(KeyboardInterrupt), staged(url, backup=True) as stage:
        api.stamp(stage.source, tags={"mine": "1"})
        raise KeyboardInterrupt
    # interrupted mid-upload: two chunks sent, the rest never comes
    target = gcs_write.GcsObject.of(as_location(url), str(bucket.get_blob(f"{prefix}/m.pt").generation))

    def blocks() -> Iterator[bytes]:
        yield b"\0" * (3 * CHUNK)  # the last chunk waits for the check: two go
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gcs_write.upload_blocks(target, len(original), [blocks()])
    assert bucket.blob(f"{prefix}/m.pt").download_as_bytes() == original
    assert names(bucket, prefix) == [f"{prefix}/m.pt"]
    # and a run that is not interrupted still writes it
    assert api.stamp(url, tags={"mine": "2"}) == api.checkpoint_files([url])[0]
    assert api.inspect(url)["envelope"]["tags"] == {"mine": "2"}


def test_in_a_versioned_bucket_the_backup_is_the_generation_read(cli: Cli, env: dict[str, str], tmp_path: Path,
                                                                 emulator: tuple[dict[str, str], Any]) -> None:
    client = emulator[1].client
    versioned = client.create_bucket(f"v-{tmp_path.name.lower().replace('_', '-')[-40:]}")
    versioned.versioning_enabled = True
    versioned.patch()
    original = checkpoint()
    versioned.blob("m.pt").upload_from_string(original)
    generation = versioned.get_blob("m.pt").generation
    url = f"gs://{versioned.name}/m.pt"
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backup"] == f"{url}#{generation}"
    # no copy for the backup (the version is the backup): what is copied is the object composed
    assert result["transfer"]["bytes_copied_server_side"] == len(original)
    assert [b.name for b in client.list_blobs(versioned)] == ["m.pt"]


def test_a_safetensors_rename_streams_the_data_behind_a_new_header(cli: Cli, env: dict[str, str], bucket: Any,
                                                                    prefix: str, tmp_path: Path) -> None:
    from safetensors.torch import load, save

    tensors = {"body.weight": torch.randn(300_000), "head.bias": torch.arange(4.0)}
    original = save(tensors)
    bucket.blob(f"{prefix}/m.safetensors").upload_from_string(original)
    url = f"gs://ckpts/{prefix}/m.safetensors"
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    new = bucket.blob(f"{prefix}/m.safetensors").download_as_bytes()
    got = load(new)
    assert sorted(got) == ["body.weight", "out.bias"]
    assert torch.equal(got["body.weight"], tensors["body.weight"])
    assert torch.equal(got["out.bias"], tensors["head.bias"])
    # the data after the header is the old data, byte for byte
    old_head, new_head = (8 + int.from_bytes(b[:8], "little") for b in (original, new))
    assert new[new_head:] == original[old_head:]
    assert bucket.blob(f"{prefix}/m.safetensors.bak").download_as_bytes() == original
    assert json.loads(proc.stdout)["transfer"]["bytes_sent"] == len(new)
    assert cli("current", url, env=env).stdout.strip() == "c2"
