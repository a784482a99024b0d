"""User story: "Our torch checkpoints live in Google Cloud Storage and Azure: a rename-only upgrade
in place sends the new tail, not the checkpoint — as a local upgrade appends to the file."

A metadata-only rewrite of a torch zip keeps the whole old object and appends a new ``data.pkl``,
envelope and central directory (the bytes a local in-place append writes). GCS joins [the object,
a temporary tail object] with ``compose``; Azure commits the blob's own committed blocks and one
new block. Against gcp-storage-emulator and Azurite on 127.0.0.1, through a TCP proxy that counts
the bytes on the wire (neither server counts them), as subprocess CLI runs; the races,
interruptions and lost answers through the API, the other writer (or the fault) slipped in at the
moment it matters.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate import api
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import ObjectChanged
from ckptmigrate.formats import torchzip
from ckptmigrate.storage import azure_write, gcs_write
from tests.azurite import running
from tests.objectstores import CountingProxy, free_port

Cli = Callable[..., subprocess.CompletedProcess[str]]
#: Bytes on the wire beyond the tail: request and response headers, the directory read by range.
OVERHEAD = 256 << 10


def checkpoint(seed: int = 0) -> bytes:
    """A 4 MiB torch zip: the tail of a rename is a few KiB of it."""
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"body.weight": torch.randn(1 << 20), "head.bias": torch.arange(4.0)}, buf)
    return buf.getvalue()


def loads(data: bytes) -> dict[str, torch.Tensor]:
    return dict(torch.load(io.BytesIO(data), weights_only=True))


def renamed(state: dict[str, torch.Tensor], *pairs: tuple[str, str]) -> dict[str, torch.Tensor]:
    names = dict(pairs)
    return {names.get(k, k): v for k, v in state.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def chain(tmp_path: Path) -> Path:
    """c1 (base) -> c2: rename head.bias -> c3: rename body.weight."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    steps = [("c1", None, "pass"), ("c2", "c1", "ckpt.rename('head.bias', 'out.bias')"),
             ("c3", "c2", "ckpt.rename('body.weight', 'trunk.weight')")]
    for rev, down, body in steps:
        (versions / f"{rev}.py").write_text(f'"""{rev}."""\nrevision = "{rev}"\ndown_revision = {down!r}\n\n\n'
                                            f"def upgrade(ckpt):\n    {body}\n")
    return versions.parent


def upgrade(cli: Cli, url: str, migrations: Path, env: dict[str, str], *more: str) -> dict[str, Any]:
    proc = cli("upgrade", url, "--migrations", migrations, "--json", *more, env=env)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_the_bytes_appended_are_those_a_local_append_writes(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(checkpoint())
    before = path.read_bytes()
    with Checkpoint.open(path) as ckpt:
        ckpt.rename("head.bias", "out.bias")
        c = ckpt.container
        assert c.source is not None
        envelope = {"revision": "c2"}
        tail = torchzip.appended_tail(c.source, c.records, c.prefix, ckpt.payload(), envelope)
        assert torchzip.append_in_place(path, c.source, c.records, c.prefix, ckpt.payload(), envelope)
    assert tail is not None and path.read_bytes() == before + tail
    assert same(loads(path.read_bytes()), renamed(loads(before), ("head.bias", "out.bias")))


# --- Google Cloud Storage -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs() -> Iterator[tuple[dict[str, str], Any, CountingProxy]]:
    from gcp_storage_emulator.server import create_server
    from google.cloud import storage  # the tests' own look at the bucket, not through the proxy

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="ckpts")
    server.start()
    proxy = CountingProxy(port)
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxy.port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = storage.Client.create_anonymous_client()
        client._connection.API_BASE_URL = f"http://127.0.0.1:{port}"
        yield env, client.bucket("ckpts"), proxy
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proxy.stop()
        server.stop()


def gcs_names(bucket: Any, prefix: str) -> list[str]:
    return sorted(b.name for b in bucket.client.list_blobs(bucket, prefix=prefix + "/"))


def test_a_gcs_rename_sends_only_the_tail_and_compose_keeps_the_rest(
        cli: Cli, gcs: tuple[dict[str, str], Any, CountingProxy], tmp_path: Path) -> None:
    env, bucket, proxy = gcs
    prefix = tmp_path.name
    original = checkpoint()
    bucket.blob(f"{prefix}/m.pt").upload_from_string(original)
    url = f"gs://ckpts/{prefix}/m.pt"
    migrations = chain(tmp_path)

    crc32c = bucket.get_blob(f"{prefix}/m.pt").crc32c
    proxy.reset()
    result = upgrade(cli, url, migrations, env, "--from", "c1", "--to", "c2")
    new = bucket.blob(f"{prefix}/m.pt").download_as_bytes()
    tail = len(new) - len(original)
    assert new[:len(original)] == original  # the old object, whole, then the tail
    # what a compose whose answer was lost is recognised by: the server's checksum of the result
    assert gcs_write.extended_crc32c(crc32c, new[len(original):]) == bucket.get_blob(f"{prefix}/m.pt").crc32c
    assert same(loads(new), renamed(loads(original), ("head.bias", "out.bias")))
    assert result["backup"] == f"{url}.bak"
    assert bucket.blob(f"{prefix}/m.pt.bak").download_as_bytes() == original
    transfer = result["transfer"]
    assert transfer["bytes_sent"] == tail < 64 << 10
    assert transfer["bytes_copied_server_side"] == 2 * len(original)  # the backup's rewrite, the compose
    # on the wire: the tail and requests up; the directory and data.pkl down — not the 4 MiB
    assert tail <= proxy.up < tail + OVERHEAD and proxy.down < OVERHEAD
    assert gcs_names(bucket, prefix) == [f"{prefix}/m.pt", f"{prefix}/m.pt.bak"]  # the tail object is gone

    # a second rename appends again; the object grows by a tail each time, as a local file does
    proxy.reset()
    again = upgrade(cli, url, migrations, env, "--no-backup")
    newer = bucket.blob(f"{prefix}/m.pt").download_as_bytes()
    assert newer[:len(new)] == new and again["transfer"]["bytes_sent"] == len(newer) - len(new)
    assert proxy.up < len(newer) - len(new) + OVERHEAD and proxy.down < OVERHEAD
    expected = renamed(loads(original), ("head.bias", "out.bias"), ("body.weight", "trunk.weight"))
    assert same(loads(newer), expected)
    assert cli("current", url, env=env).stdout.strip() == "c3"

    # compact reclaims the orphaned bytes (staged: the object down, the compacted one up)
    done = cli("compact", url, env=env)
    assert done.returncode == 0, done.stderr
    compacted = bucket.blob(f"{prefix}/m.pt").download_as_bytes()
    assert len(compacted) < len(newer) and same(loads(compacted), expected)
    assert gcs_names(bucket, prefix) == [f"{prefix}/m.pt", f"{prefix}/m.pt.bak"]


def test_a_gcs_object_whose_last_append_was_cut_short_is_rewritten_whole(
        cli: Cli, gcs: tuple[dict[str, str], Any, CountingProxy], tmp_path: Path) -> None:
    from ckptmigrate.formats.zipio import APPEND_END

    env, bucket, _proxy = gcs
    prefix = tmp_path.name
    original = checkpoint()
    # what a local append killed mid-way leaves (then uploaded as is): the archive, part of the new
    # bytes, and the old end records copied to the end — torch reads the old archive
    cut = original + bytes(5000) + original[-APPEND_END:]
    assert same(loads(cut), loads(original))
    bucket.blob(f"{prefix}/m.pt").upload_from_string(cut)
    url = f"gs://ckpts/{prefix}/m.pt"
    result = upgrade(cli, url, chain(tmp_path), env, "--from", "c1", "--to", "c2", "--no-backup")
    new = bucket.blob(f"{prefix}/m.pt").download_as_bytes()
    assert same(loads(new), renamed(loads(original), ("head.bias", "out.bias")))
    assert result["transfer"]["bytes_sent"] == len(new) < len(cut)  # the records and a new tail, streamed
    assert gcs_names(bucket, prefix) == [f"{prefix}/m.pt"]


@pytest.mark.parametrize("what", ["another writer", "an interruption"])
def test_a_gcs_append_that_loses_or_is_interrupted_changes_nothing_and_leaves_no_tail(
        gcs: tuple[dict[str, str], Any, CountingProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        what: str) -> None:
    _env, bucket, _proxy = gcs
    prefix = tmp_path.name
    bucket.blob(f"{prefix}/m.pt").upload_from_string(checkpoint())
    theirs = checkpoint(seed=1)
    url = f"gs://ckpts/{prefix}/m.pt"
    real = gcs_write.upload_blocks
    uploaded: list[str] = []

    def then(obj: gcs_write.GcsObject, total: int, sources: Any) -> None:
        """The tail object goes up; then, before the compose, the other writer or a Ctrl-C."""
        real(obj, total, sources)
        uploaded.append(obj.key)
        assert gcs_names(bucket, prefix) == sorted([f"{prefix}/m.pt", f"{prefix}/m.pt.bak", obj.key])
        if what == "another writer":
            bucket.blob(f"{prefix}/m.pt").upload_from_string(theirs)
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(gcs_write, "upload_blocks", then)
    before = bucket.blob(f"{prefix}/m.pt").download_as_bytes()
    if what == "another writer":
        with pytest.raises(ObjectChanged) as lost:
            api.upgrade(url, from_rev="c1", to="c2", migrations=chain(tmp_path))
        message = str(lost.value)
        assert "\n" not in message and message.startswith(f"{url}: the object changed since it was read")
        assert bucket.blob(f"{prefix}/m.pt").download_as_bytes() == theirs  # their object stands
    else:
        with pytest.raises(KeyboardInterrupt):
            api.upgrade(url, from_rev="c1", to="c2", migrations=chain(tmp_path))
        assert bucket.blob(f"{prefix}/m.pt").download_as_bytes() == before
    assert len(uploaded) == 1 and gcs_write.TAIL_MARK in uploaded[0]
    assert gcs_names(bucket, prefix) == [f"{prefix}/m.pt"]  # no tail object, no backup of the lost write


def test_a_gcs_compose_whose_answer_was_lost_is_known_as_ours(
        gcs: tuple[dict[str, str], Any, CountingProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _env, bucket, _proxy = gcs
    prefix = tmp_path.name
    original = checkpoint()
    bucket.blob(f"{prefix}/m.pt").upload_from_string(original)
    url = f"gs://ckpts/{prefix}/m.pt"
    real = gcs_write.GcsObject.call

    def answer_lost(self: gcs_write.GcsObject, method: str, path: str, *args: str, **kwargs: Any) -> Any:
        """The compose is done, its answer lost; the retry finds the generation moved (412)."""
        out = real(self, method, path, *args, **kwargs)
        if path.endswith("/compose"):
            raise self.changed(self.head_etag())
        return out

    monkeypatch.setattr(gcs_write.GcsObject, "call", answer_lost)
    outcome = api.upgrade(url, from_rev="c1", to="c2", migrations=chain(tmp_path))
    assert outcome.written and str(outcome.backup) == f"{url}.bak"
    new = bucket.blob(f"{prefix}/m.pt").download_as_bytes()
    assert new[:len(original)] == original and same(loads(new), renamed(loads(original), ("head.bias", "out.bias")))
    assert bucket.blob(f"{prefix}/m.pt.bak").download_as_bytes() == original  # the backup stays
    assert gcs_names(bucket, prefix) == [f"{prefix}/m.pt", f"{prefix}/m.pt.bak"]


# --- Azure Blob Storage ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def azure() -> Iterator[tuple[dict[str, str], Any, CountingProxy]]:
    """Azurite behind a counting proxy; the tests' own container client goes direct, and uploads
    as the SDK (and adlfs, azcopy) upload a large blob: 1 MiB blocks and one commit."""
    from azure.storage.blob import ContainerClient

    with running() as (env, _container):
        connection = env["AZURE_STORAGE_CONNECTION_STRING"]
        port = int(connection.split("BlobEndpoint=http://127.0.0.1:")[1].split("/")[0])
        proxy = CountingProxy(port)
        through = {"AZURE_STORAGE_CONNECTION_STRING": connection.replace(f":{port}/", f":{proxy.port}/")}
        container = ContainerClient.from_connection_string(connection, "ckpts", max_single_put_size=1 << 20,
                                                           max_block_size=1 << 20)
        try:
            yield through, container, proxy
        finally:
            proxy.stop()


def az_names(container: Any, prefix: str) -> list[str]:
    return sorted(b.name for b in container.list_blobs(name_starts_with=prefix + "/"))


def az_read(container: Any, name: str) -> bytes:
    return bytes(container.download_blob(name).readall())


def put_in_blocks(container: Any, name: str, data: bytes) -> list[tuple[str, int]]:
    """Upload ``data`` as the SDK does a large blob (blocks, one commit); the committed (ID, size) pairs."""
    container.upload_blob(name, data)
    blocks = committed(container, name)
    assert len(blocks) == -(-len(data) // (1 << 20))
    return blocks


def committed(container: Any, name: str) -> list[tuple[str, int]]:
    blocks, _ = container.get_blob_client(name).get_block_list("committed")
    return [(str(b.id), int(b.size)) for b in blocks]


def test_an_azure_rename_commits_the_blobs_own_blocks_and_one_more(
        cli: Cli, azure: tuple[dict[str, str], Any, CountingProxy], tmp_path: Path) -> None:
    env, container, proxy = azure
    prefix = tmp_path.name
    name = f"{prefix}/m.pt"
    original = checkpoint()
    blocks = put_in_blocks(container, name, original)
    url = f"az://ckpts/{name}"
    migrations = chain(tmp_path)

    proxy.reset()
    result = upgrade(cli, url, migrations, env, "--from", "c1", "--to", "c2")
    new = az_read(container, name)
    tail = len(new) - len(original)
    assert new[:len(original)] == original
    assert same(loads(new), renamed(loads(original), ("head.bias", "out.bias")))
    assert az_read(container, f"{name}.bak") == original
    # the server's own account: the old blocks, as they were, and one block holding the tail
    after = committed(container, name)
    assert after[:-1] == blocks and after[-1][1] == tail
    assert len(after[-1][0]) == len(blocks[0][0])  # one ID length per blob, as Azure requires
    transfer = result["transfer"]
    assert transfer["bytes_sent"] == tail < 64 << 10 and transfer["bytes_copied_server_side"] == 2 * len(original)
    assert tail <= proxy.up < tail + OVERHEAD and proxy.down < OVERHEAD

    proxy.reset()
    again = upgrade(cli, url, migrations, env, "--no-backup")
    newer = az_read(container, name)
    assert newer[:len(new)] == new and again["transfer"]["bytes_sent"] == len(newer) - len(new)
    assert proxy.up < len(newer) - len(new) + OVERHEAD and proxy.down < OVERHEAD
    expected = renamed(loads(original), ("head.bias", "out.bias"), ("body.weight", "trunk.weight"))
    assert same(loads(newer), expected)
    assert committed(container, name)[:-1] == after

    done = cli("compact", url, env=env)
    assert done.returncode == 0, done.stderr
    compacted = az_read(container, name)
    assert len(compacted) < len(newer) and same(loads(compacted), expected)
    assert az_names(container, prefix) == [name, f"{name}.bak"]


def test_a_blob_of_one_put_is_streamed_once_then_appended_to(
        cli: Cli, azure: tuple[dict[str, str], Any, CountingProxy], tmp_path: Path) -> None:
    env, container, proxy = azure
    prefix = tmp_path.name
    name = f"{prefix}/m.pt"
    original = checkpoint()
    from azure.storage.blob import BlobClient

    # one Put Blob (the SDK's default up to 64 MiB): no committed blocks to keep
    BlobClient.from_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"], "ckpts", name).upload_blob(original)
    assert committed(container, name) == []
    url = f"az://ckpts/{name}"
    migrations = chain(tmp_path)

    proxy.reset()
    first = upgrade(cli, url, migrations, env, "--from", "c1", "--to", "c2", "--no-backup")
    new = az_read(container, name)
    assert same(loads(new), renamed(loads(original), ("head.bias", "out.bias")))
    assert first["transfer"]["bytes_sent"] == len(new)  # the records streamed down and up again
    assert proxy.up > len(original) and proxy.down > len(original) - (64 << 10)
    # ckptmigrate wrote it in blocks: the next rename appends
    proxy.reset()
    second = upgrade(cli, url, migrations, env, "--no-backup")
    newer = az_read(container, name)
    assert newer[:len(new)] == new and second["transfer"]["bytes_sent"] == len(newer) - len(new)
    assert proxy.up < len(newer) - len(new) + OVERHEAD and proxy.down < OVERHEAD
    assert same(loads(newer), renamed(loads(original), ("head.bias", "out.bias"), ("body.weight", "trunk.weight")))


def test_the_loser_of_an_azure_append_commits_nothing(
        azure: tuple[dict[str, str], Any, CountingProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, container, _proxy = azure
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    prefix = tmp_path.name
    name = f"{prefix}/m.pt"
    blocks = put_in_blocks(container, name, checkpoint())
    theirs = checkpoint(seed=1)
    url = f"az://ckpts/{name}"

    def their_write_first(self: azure_write.AzureObject) -> None:
        """Their blob lands between our staged tail and our commit, and our own check is skipped:
        Azure's If-Match on the commit is what refuses it."""
        kept, staged = container.get_blob_client(name).get_block_list("all")
        assert [(str(b.id), b.size) for b in kept] == blocks and len(staged) == 1 and staged[0].size < 64 << 10
        container.upload_blob(name, theirs, overwrite=True)

    monkeypatch.setattr(azure_write.AzureObject, "check_unchanged", their_write_first)
    with pytest.raises(ObjectChanged) as lost:
        api.upgrade(url, from_rev="c1", to="c2", migrations=chain(tmp_path))
    message = str(lost.value)
    assert "\n" not in message and message.startswith(f"{url}: the object changed since it was read")
    assert az_read(container, name) == theirs  # their blob stands
    assert az_names(container, prefix) == [name]  # the backup of the lost write is gone


@pytest.mark.parametrize("blob", ["of blocks (appended)", "of one Put Blob (streamed)"])
def test_an_azure_commit_whose_answer_was_lost_is_known_as_ours(
        azure: tuple[dict[str, str], Any, CountingProxy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        blob: str) -> None:
    from azure.storage.blob import BlobClient

    env, container, _proxy = azure
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    prefix = tmp_path.name
    name = f"{prefix}/m.pt"
    original = checkpoint()
    if blob.startswith("of blocks"):
        put_in_blocks(container, name, original)
    else:
        BlobClient.from_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"], "ckpts", name).upload_blob(original)
    url = f"az://ckpts/{name}"
    real = azure_write.AzureObject.call

    def answer_lost(self: azure_write.AzureObject, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """The commit is done, its answer lost; the SDK's retry finds the ETag moved (412)."""
        out = real(self, what, fn, *args, **kwargs)
        if getattr(fn, "__name__", "") == "commit_block_list":
            raise self.changed(self.head_etag())
        return out

    monkeypatch.setattr(azure_write.AzureObject, "call", answer_lost)
    outcome = api.upgrade(url, from_rev="c1", to="c2", migrations=chain(tmp_path))
    assert outcome.written and str(outcome.backup) == f"{url}.bak"
    new = az_read(container, name)
    assert same(loads(new), renamed(loads(original), ("head.bias", "out.bias")))
    assert (new[:len(original)] == original) == blob.startswith("of blocks")
    assert az_read(container, f"{name}.bak") == original  # the backup stays
