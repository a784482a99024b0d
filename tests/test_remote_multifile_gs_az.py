"""User story: "Our sharded models and DCP checkpoints live under prefixes in Google Cloud Storage and
Azure Blob Storage: I rename their keys in place there as on S3, a run that loses a race to another
writer leaves nothing behind, and a run killed halfway is put right by the next one."

Against gcp-storage-emulator and Azurite on 127.0.0.1 (the fixtures of tests/test_remote_gcs_write.py
and tests/azurite.py), through the CLI as a subprocess; the tests look at the bucket through the
backends' own clients. The same small conditional writes as on S3 (create-only, replace-if-unchanged
on the generation or ETag read, delete), each backend's own: a DCP rename puts ``.metadata`` and its
envelope and nothing else; a shard whose header changes is streamed through (neither service splices
ranges server-side the way S3's UploadPartCopy does) behind the placeholder index and its journal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load as load_safetensors

from ckptmigrate.errors import ObjectChanged
from ckptmigrate.storage import azure_write, writers
from ckptmigrate.util.urls import ObjectURL
from tests import azurite
from tests.objectstores import running_gcs

Cli = Callable[..., subprocess.CompletedProcess[str]]
CHUNK = 256 << 10  # the least GCS chunk, and the Azure block size here: a 1 MiB shard goes in four
INDEX = "model.safetensors.index.json"


@dataclass
class Store:
    """One bucket on one backend, as the tests see it (not through ckptmigrate)."""

    scheme: str
    env: dict[str, str]
    client: Any  # a google.cloud.storage Bucket, or an azure ContainerClient

    def url(self, prefix: str) -> str:
        return f"{self.scheme}://ckpts/{prefix}"

    def upload(self, local: Path, prefix: str) -> None:
        for path in local.iterdir():
            self.put(f"{prefix}/{path.name}", path.read_bytes())

    def put(self, name: str, data: bytes) -> None:
        if self.scheme == "gs":
            self.client.blob(name).upload_from_string(data)
        else:
            self.client.upload_blob(name, data, overwrite=True)

    def get(self, name: str) -> bytes:
        if self.scheme == "gs":
            return bytes(self.client.blob(name).download_as_bytes())
        return bytes(self.client.download_blob(name).readall())

    def objects(self, prefix: str) -> dict[str, str]:
        """Every object under the prefix and its generation (GCS) or ETag (Azure): what changes when it is written."""
        if self.scheme == "gs":
            return {b.name: str(b.generation) for b in self.client.client.list_blobs(self.client, prefix=prefix + "/")}
        return {b.name: str(b.etag) for b in self.client.list_blobs(name_starts_with=prefix + "/")}


@pytest.fixture(scope="module", params=["gs", "az"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    if request.param == "az":
        with azurite.running() as (env, container):
            yield Store("az", {**env, "CKPTMIGRATE_AZ_BLOCK_SIZE": str(CHUNK)}, container)
        return
    with running_gcs(CKPTMIGRATE_GCS_CHUNK_SIZE=str(CHUNK)) as (env, bucket):
        yield Store("gs", env, bucket)


@pytest.fixture
def run(cli: Cli, store: Store) -> Cli:
    """The CLI, pointed at the store."""
    return lambda *args, **kw: cli(*args, env=store.env, **kw)


def chain(tmp_path: Path, code: str, extra: str = "") -> Path:
    """c1 (base) -> c2 (``code``)."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, body in (("c1", None, "pass"), ("c2", "c1", code)):
        (versions / f"{rev}.py").write_text(f'"""{rev}."""\n{extra}\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
                                            f"def upgrade(ckpt):\n    {body}\n")
    return versions.parent


def dcp_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {f"layers.{i}.weight": torch.randn(16 * 1024) for i in range(4)}


def hf_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(4)
    return {f"layers.{i}.weight": torch.randn(256 * 1024) for i in range(3)}  # 1 MiB each, a shard each


@pytest.fixture
def prefix(store: Store, tmp_path: Path) -> str:
    """A DCP directory (``<test>/dcp``) and a sharded model (``<test>/hf``) under the test's own prefix."""
    for kind, save in (("dcp", lambda d: dcp.save(dcp_state(), checkpoint_id=str(d))),
                       ("hf", lambda d: save_torch_state_dict(hf_state(), str(d), max_shard_size="1MB"))):
        local = tmp_path / kind
        local.mkdir()
        save(local)
        store.upload(local, f"{tmp_path.name}/{kind}")
    return tmp_path.name


def one(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    [row] = out if isinstance(out, list) else [out]
    return dict(row)


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in after.keys() | before.keys() if after.get(k) != before.get(k)}


def load_dcp(store: Store, prefix: str, tmp_path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The prefix copied down and read by torch's own ``dcp.load`` under ``names``."""
    local = tmp_path / "down"
    local.mkdir()
    for name in store.objects(prefix):
        (local / name.rsplit("/", 1)[1]).write_bytes(store.get(name))
    state = {n: torch.empty(16 * 1024) for n in names}
    dcp.load(state, checkpoint_id=str(local))
    return state


def load_shards(store: Store, prefix: str) -> dict[str, torch.Tensor]:
    """What a reader through the index gets: every tensor it names, from the shard it names."""
    index = json.loads(store.get(f"{prefix}/{INDEX}"))
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_safetensors(store.get(f"{prefix}/{shard}"))  # a missing shard raises here
        out.update((k, tensors[k]) for k, s in index["weight_map"].items() if s == shard)
    return out


def test_a_dcp_rename_in_place_puts_only_metadata_and_envelope_then_a_stamp_only_the_envelope(
        run: Cli, store: Store, prefix: str, tmp_path: Path) -> None:
    at = f"{prefix}/dcp"
    before = store.objects(at)
    original_md = store.get(f"{at}/.metadata")
    row = one(run("upgrade", store.url(at) + "/", "--from", "c1", "--json", "--migrations",
                  chain(tmp_path, "ckpt.rename('layers.0.weight', 'embed.weight')")))
    assert row["written"] is True and row["backup"] == store.url(at) + "/.metadata.bak", row
    after = store.objects(at)
    [envelope] = [k for k in after if k.startswith(f"{at}/.ckptmigrate-")]
    assert changed(before, after) == {f"{at}/.metadata", f"{at}/.metadata.bak", envelope}  # no .distcp written
    new_md = store.get(f"{at}/.metadata")
    # sent: the new .metadata and its envelope, nothing else; the backup a copy inside the service
    assert row["transfer"]["bytes_sent"] == len(new_md) + len(store.get(envelope)), row["transfer"]
    assert row["transfer"]["bytes_copied_server_side"] == len(original_md)
    assert store.get(f"{at}/.metadata.bak") == original_md
    expected = dcp_state()
    expected["embed.weight"] = expected.pop("layers.0.weight")
    loaded = load_dcp(store, at, tmp_path, list(expected))
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert run("current", store.url(at)).stdout.strip() == "c2"
    # a stamp replaces the envelope alone, conditionally on what was read
    stamped = store.objects(at)
    proc = run("stamp", store.url(at), "--tag", "run=7")
    assert proc.returncode == 0, proc.stderr
    assert changed(stamped, store.objects(at)) == {envelope}
    info = one(run("inspect", store.url(at), "--json"))
    assert info["stamped"] is True and '"run": "7"' in json.dumps(info), info


def test_a_sharded_rename_in_place_rewrites_only_the_shard_that_changed(
        run: Cli, store: Store, prefix: str, tmp_path: Path) -> None:
    at = f"{prefix}/hf"
    before = store.objects(at)
    shard1 = f"{at}/model-00001-of-00003.safetensors"
    old_shard1 = store.get(shard1)
    row = one(run("upgrade", store.url(at) + "/", "--from", "c1", "--no-backup", "--json", "--migrations",
                  chain(tmp_path, "ckpt.rename('layers.0.weight', 'embed.weight')")))
    assert row["written"] is True and row["backup"] is None, row
    after = store.objects(at)
    assert changed(before, after) == {f"{at}/{INDEX}", shard1}  # the journal came and went
    expected = hf_state()
    expected["embed.weight"] = expected.pop("layers.0.weight")
    loaded = load_shards(store, at)
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], v) for k, v in expected.items())
    # the changed shard streamed through (its data down and up again), the small objects besides
    sent = row["transfer"]["bytes_sent"]
    assert len(old_shard1) <= sent < len(old_shard1) + 32 * 1024 < 2 * len(old_shard1), row["transfer"]
    assert run("current", store.url(at)).stdout.strip() == "c2"
    # back down, with a backup: the index and the changed shard kept as KEY.bak, copies made by the service
    upgraded = {k: store.get(k) for k in (f"{at}/{INDEX}", shard1)}
    down = one(run("downgrade", store.url(at) + "/", "--to", "c1", "--json", "--migrations", tmp_path / "chain"))
    assert down["backup"] == f"{store.url(at)}/{INDEX}.bak", down
    assert {k: store.get(k + ".bak") for k in upgraded} == upgraded
    assert store.get(shard1) == old_shard1 and set(load_shards(store, at)) == set(hf_state())


@pytest.mark.parametrize("kind", ["dcp", "hf"])
def test_a_rename_that_loses_a_race_writes_nothing(run: Cli, store: Store, prefix: str, tmp_path: Path,
                                                   kind: str) -> None:
    """The migration script is the other writer: it replaces ``.metadata`` (the index), through
    fsspec, after this run read it."""
    at = f"{prefix}/{kind}"
    commit = ".metadata" if kind == "dcp" else INDEX
    theirs = store.get(f"{at}/{commit}").replace(b"layers.2", b"layers.8")
    (tmp_path / "theirs.bin").write_bytes(theirs)
    extra = ("import fsspec\n\n\ndef _put(url, path):\n    with fsspec.open(url, 'wb') as f, open(path, 'rb') as src:\n"
             "        f.write(src.read())\n")
    code = (f"_put({store.url(at) + '/' + commit!r}, {str(tmp_path / 'theirs.bin')!r}); "
            "ckpt.rename('layers.0.weight', 'embed.weight')")
    before = store.objects(at)
    proc = run("upgrade", store.url(at) + "/", "--from", "c1", "--migrations", chain(tmp_path, code, extra))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "the object changed since it was read" in proc.stderr, proc.stderr
    assert f"{store.url(at)}/{commit}" in proc.stderr
    after = store.objects(at)
    assert store.get(f"{at}/{commit}") == theirs  # the other writer's object stands
    assert changed(before, after) == {f"{at}/{commit}"}, after  # no backup, envelope or journal left


RACE_AT_THE_SWITCH = """
import sys, fsspec
from ckptmigrate.storage import writers
theirs = open(sys.argv.pop(1), "rb").read()
real = writers.backup
def another_writer_first(obj):
    with fsspec.open(obj.url.full, "wb") as f:  # after this run checked .metadata, before its switch
        f.write(theirs)
    return real(obj)
writers.backup = another_writer_first
from ckptmigrate.cli import main
main(sys.argv[1:], prog_name="ckptmigrate")
"""


def test_a_dcp_run_that_loses_at_its_switch_removes_what_it_put(run: Cli, store: Store, prefix: str,
                                                               tmp_path: Path) -> None:
    """Another writer replaces ``.metadata`` after this run checked it and put its new envelope:
    the switch (or, on Azure, the backup's copy conditional on the source ETag) is refused, and the
    envelope and backup this run made are removed."""
    at = f"{prefix}/dcp"
    theirs = store.get(f"{at}/.metadata").replace(b"layers.2", b"layers.8")
    (tmp_path / "theirs.bin").write_bytes(theirs)
    before = store.objects(at)
    proc = subprocess.run([sys.executable, "-c", RACE_AT_THE_SWITCH, str(tmp_path / "theirs.bin"), "upgrade",
                           store.url(at) + "/", "--from", "c1", "--migrations",
                           str(chain(tmp_path, "ckpt.rename('layers.0.weight', 'embed.weight')"))],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **store.env})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "the object changed since it was read" in proc.stderr, proc.stderr
    assert f"{store.url(at)}/.metadata" in proc.stderr
    assert store.get(f"{at}/.metadata") == theirs
    assert changed(before, store.objects(at)) == {f"{at}/.metadata"}  # no envelope, no .metadata.bak left


CRASH = """
import os, sys
from ckptmigrate.storage import prefix_write
rewritten = []
real = prefix_write._replace_header
def once_then_die(shard, head):
    if rewritten:
        os._exit(9)  # killed between two shards: no clean-up runs
    rewritten.append(shard.key)
    real(shard, head)
prefix_write._replace_header = once_then_die
from ckptmigrate.cli import main
main(sys.argv[1:], prog_name="ckptmigrate")
"""


def test_a_run_killed_between_shards_is_refused_by_readers_then_recovered(
        run: Cli, store: Store, prefix: str, tmp_path: Path) -> None:
    at = f"{prefix}/hf"
    original = {k: store.get(k) for k in store.objects(at)}
    migrations = chain(tmp_path, "ckpt.rename_regex(r'^layers\\.', 'blocks.')")
    url = store.url(at) + "/"
    killed = subprocess.run([sys.executable, "-c", CRASH, "upgrade", url, "--from", "c1", "--migrations",
                             str(migrations), "--no-backup"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, **store.env})
    assert killed.returncode == 9, killed.stderr
    # the first shard has its new header, the others the old; the index is the placeholder, which
    # names only a shard that does not exist, so no reader loads the mix
    shard1, shard2 = (f"{at}/model-0000{i}-of-00003.safetensors" for i in (1, 2))
    assert store.get(shard1) != original[shard1] and store.get(shard2) == original[shard2]
    refused = run("inspect", store.url(at))
    assert refused.returncode == 2 and "ckptmigrate-header-rewrite-in-progress" in refused.stderr, refused.stderr
    assert [k for k in store.objects(at) if ".ckptmigrate-headers." in k]  # its journal
    # the next run puts the old headers and index back, then migrates: the result, whole
    again = run("upgrade", url, "--from", "c1", "--migrations", migrations, "--no-backup")
    assert again.returncode == 0, again.stderr
    state = hf_state()
    loaded = load_shards(store, at)
    assert set(loaded) == {f"blocks.{i}.weight" for i in range(3)}
    assert all(torch.equal(loaded[f"blocks.{i}.weight"], state[f"layers.{i}.weight"]) for i in range(3))
    assert set(store.objects(at)) == set(original)  # the journal is gone


def test_a_migration_that_changes_tensor_bytes_is_refused_in_one_line(run: Cli, store: Store, prefix: str,
                                                                      tmp_path: Path) -> None:
    """Neither DCP's ``.distcp`` objects nor a shard's data are rewritten under a prefix: the
    refusal names the prefix and the tool that copies it down."""
    before = store.objects(prefix)
    casts = chain(tmp_path, "ckpt.cast('layers.1.weight', 'float16')")
    tool = {"gs": "gcloud storage rsync", "az": "azcopy sync"}[store.scheme]
    for kind in ("dcp", "hf"):
        proc = run("upgrade", store.url(f"{prefix}/{kind}") + "/", "--from", "c1", "--migrations", casts)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
        assert store.url(f"{prefix}/{kind}") in proc.stderr and "changes tensor bytes" in proc.stderr, proc.stderr
        assert tool in proc.stderr, proc.stderr
    assert store.objects(prefix) == before


@pytest.fixture
def in_process(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process pointed at the store by its environment (a filesystem fsspec cached for another
    test's server is not reused: util/urls.filesystem names the endpoint among its options)."""
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    yield


@pytest.mark.usefixtures("in_process")
def test_each_small_write_is_conditional_on_what_was_read(store: Store, prefix: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The writes the prefix protocols are made of: a put on a stale generation / ETag, a create
    where an object is, a delete on a stale one are each refused and change nothing; on Azure by
    Azurite itself too (our check before each turned off), the GCS emulator enforcing none."""
    url = ObjectURL(store.url(f"{prefix}/small.json"))
    first = writers.put(writers.object_target(url, None, create_only=True), b"{}")
    assert writers.found(writers.object_target(url, None)) == first  # the token put() returns is the one read
    second = writers.put(writers.object_target(url, first, first), b'{"a": 1}')
    assert second != first
    stale = {"put": lambda o: writers.put(o, b"lost"), "delete": writers.delete}
    checks = [True, False] if store.scheme == "az" else [True]
    for checked in checks:
        if not checked:
            monkeypatch.setattr(azure_write.AzureObject, "check_unchanged", lambda self: None)
        for what, write in stale.items():
            with pytest.raises(ObjectChanged, match="changed since it was read"):
                write(writers.object_target(url, first, first))
            assert store.get(f"{prefix}/small.json") == b'{"a": 1}', (what, checked)
        with pytest.raises(ObjectChanged, match="an object appeared there"):
            writers.put(writers.object_target(url, None, create_only=True), b"lost")
        assert store.get(f"{prefix}/small.json") == b'{"a": 1}'
    writers.delete(writers.object_target(url, second, second))
    assert writers.found(writers.object_target(url, None)) is None
