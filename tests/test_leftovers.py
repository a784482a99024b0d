"""User story: "A run of ckptmigrate was killed (SIGKILL, a lost machine, a preempted worker). I ask
`ckptmigrate leftovers` what it left in my directory or bucket; a CI job fails while something is
left; `--delete` removes exactly that, and never what a running job still uses."

Each leftover is made the way a killed run makes it: a real CLI subprocess whose function at the
fatal point is replaced by ``os._exit`` (no clean-up runs), against local directories, a moto S3
server and the GCS emulator on 127.0.0.1. What was there before the run is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from huggingface_hub import save_torch_state_dict

from ckptmigrate import api
from ckptmigrate.storage.locking import file_lock
from tests import azurite
from tests.objectstores import S3Server, running_gcs, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]

#: Run the CLI with ``PATCH`` (code that replaces a function by one calling os._exit) applied first.
KILLED = """
import os, sys
{patch}
from ckptmigrate.cli import main
main(sys.argv[1:], prog_name="ckptmigrate")
"""


def killed(patch: str, *args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED.format(patch=patch), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 9, proc.stdout + proc.stderr


def chain(tmp_path: Path, body: str) -> Path:
    """c1 (base) -> c2 (``body``)."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", body)):
        (versions / f"{rev}.py").write_text(f'"""{rev}."""\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
                                            f"def upgrade(ckpt):\n    {code}\n")
    return versions.parent


def report(cli: Cli, *args: str | Path, env: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """``leftovers --json``: its exit code and {location: status}."""
    proc = cli("leftovers", *args, "--json", env=env)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc.returncode, {i["location"]: i["status"] for i in json.loads(proc.stdout)["leftovers"]}


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- local directories ------------------------------------------------------------------------------------

DIE_AT_THE_RENAME = """
real = os.replace
def die(src, dst, *a, **k):
    if str(dst).endswith("a.pt"):
        os._exit(9)  # the new file is written, not yet renamed over a.pt
    return real(src, dst, *a, **k)
os.replace = die
"""


def test_a_killed_local_write_leaves_a_temporary_file_and_a_dead_lock(cli: Cli, tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"w": torch.randn(64), "b": torch.zeros(4)}, ckpts / "a.pt")
    torch.save({"w": torch.ones(8)}, ckpts / "b.pt")
    (ckpts / ".hidden").write_text("not ours")
    before = tree(ckpts)
    killed(DIE_AT_THE_RENAME, "upgrade", ckpts / "a.pt", "--from", "c1", "--no-backup", "--migrations",
           chain(tmp_path, "ckpt.cast('w', 'float16')"), cwd=tmp_path)
    left = set(tree(ckpts)) - set(before)
    assert len(left) == 2 and ".a.pt.ckptmigrate-lock" in left, left  # and a temporary sibling of a.pt
    expected = {str(ckpts / name) for name in left}

    # just now: a run could be at work, so nothing counts yet, and --delete keeps it
    code, found = report(cli, ckpts, "--delete")
    assert code == 0 and found == dict.fromkeys(expected, "young")
    assert set(tree(ckpts)) - set(before) == left

    # a live run beside them (its lock held): everything there is in use, even with --older-than 0
    with file_lock(ckpts / "b.pt"):
        code, found = report(cli, ckpts, "--older-than", "0", "--delete")
        assert code == 0 and set(found.values()) == {"in use"}, found
        assert str(ckpts / ".b.pt.ckptmigrate-lock") in found
        assert set(tree(ckpts)) - set(before) == left | {".b.pt.ckptmigrate-lock"}

    # a check (no run at work): exactly what the killed run left, exit 1
    code, found = report(cli, ckpts, "--older-than", "0")
    assert code == 1 and found == dict.fromkeys(expected, "leftover")
    twin = api.leftovers([ckpts], older_than=0)  # the same as a function
    assert twin["failing"] == 2 and {i["location"]: i["status"] for i in twin["leftovers"]} == found
    # asked about b.pt alone: nothing of a.pt's
    assert report(cli, ckpts / "b.pt", "--older-than", "0") == (0, {})

    code, found = report(cli, ckpts, "--older-than", "0", "--delete")
    assert code == 0 and found == dict.fromkeys(expected, "removed")
    assert tree(ckpts) == before
    assert cli("upgrade", ckpts / "a.pt", "--from", "c1", "--migrations", tmp_path / "chain").returncode == 0
    for bad in (["https://example.org/a.pt"], [ckpts / "missing.pt"], [ckpts, "--older-than", "soon"]):
        proc = cli("leftovers", *bad)
        assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith("ckptmigrate: error: "), proc.stderr


DIE_BETWEEN_SHARDS = """
from ckptmigrate.storage import shardset
real = shardset._overwrite
done = []
def die(path, offset, data):
    if done:
        os._exit(9)  # the first shard's header is rewritten, the second's not
    done.append(path)
    real(path, offset, data)
shardset._overwrite = die
"""


def test_a_journal_an_interrupted_switch_needs_is_never_deleted(cli: Cli, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(4)
    save_torch_state_dict({f"layers.{i}.weight": torch.randn(64 * 1024) for i in range(3)}, str(model),
                          max_shard_size="256KB")
    migrations = chain(tmp_path, "ckpt.rename_regex(r'^layers\\.', 'blocks.')")
    killed(DIE_BETWEEN_SHARDS, "upgrade", model, "--from", "c1", "--no-backup", "--migrations", migrations,
           cwd=tmp_path)
    journal = str(model / ".model.safetensors.index.json.ckptmigrate-headers")
    lock = model / ".model.safetensors.index.json.ckptmigrate-lock"  # the lock of its index, dead
    proc = cli("leftovers", model, "--older-than", "0", "--delete")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{journal}: journal" in proc.stdout and "run `ckptmigrate upgrade`" in proc.stdout, proc.stdout
    assert f"{lock}: lock file" in proc.stdout and not lock.exists(), proc.stdout
    assert Path(journal).exists()
    # the next upgrade replays it, and then nothing is left
    assert cli("upgrade", model, "--from", "c1", "--no-backup", "--migrations", migrations).returncode == 0
    assert report(cli, model, "--older-than", "0") == (0, {})


# --- S3 --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


def s3_objects(s3: S3Server, bucket: str) -> dict[str, str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def uploads(s3: S3Server, bucket: str) -> set[tuple[str, str]]:
    return {(u["Key"], u["UploadId"]) for u in s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])}


DIE_AT_THE_COMPLETE = """
from ckptmigrate.storage import s3_compose
real = s3_compose.S3Object.call
def call(self, op, **kwargs):
    if op == "complete_multipart_upload":
        os._exit(9)  # every part is uploaded or copied: the upload is open
    return real(self, op, **kwargs)
s3_compose.S3Object.call = call
"""


def test_a_killed_s3_rename_leaves_an_open_multipart_upload(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket("left", tmp_path)
    client = s3.client()
    torch.manual_seed(1)
    torch.save({f"blocks.{i}.weight": torch.randn(1 << 20) for i in range(2)}, tmp_path / "big.pt")  # 8 MiB
    client.upload_file(str(tmp_path / "big.pt"), bucket, "run/k.pt")
    client.put_object(Bucket=bucket, Key="run/other.pt", Body=b"x")
    theirs = client.create_multipart_upload(Bucket=bucket, Key="run/other.pt")["UploadId"]  # not ours
    objects = s3_objects(s3, bucket)
    killed(DIE_AT_THE_COMPLETE, "upgrade", f"s3://{bucket}/run/k.pt", "--from", "c1", "--no-backup",
           "--migrations", chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')"), cwd=tmp_path,
           env=s3.env)
    [ours] = uploads(s3, bucket) - {("run/other.pt", theirs)}
    where = f"s3://{bucket}/run/k.pt?uploadId={ours[1]}"
    url = f"s3://{bucket}/run/k.pt"

    # S3 does not say who began an upload: listed, never aborted, unless the user says none is another tool's
    assert report(cli, url, "--older-than", "0", "--delete", env=s3.env) == (0, {where: "unproven"})
    assert ours in uploads(s3, bucket)
    take = "--abort-uploads"
    # moto dates every upload 2010-11-10 (real S3 gives the hour it began): "young" is younger than a century
    assert report(cli, url, take, "--older-than", "36500d", "--delete", env=s3.env) == (0, {where: "young"})
    assert report(cli, url, take, "--older-than", "0", env=s3.env) == (1, {where: "leftover"})
    assert report(cli, url, take, "--older-than", "0", "--delete", env=s3.env) == (0, {where: "removed"})
    assert uploads(s3, bucket) == {("run/other.pt", theirs)}  # only the key asked about
    assert s3_objects(s3, bucket) == objects
    missing = cli("leftovers", f"s3://{bucket}/nothing/", env=s3.env)  # a typo is not "nothing left"
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert f"s3://{bucket}/nothing: no such object or prefix" in missing.stderr, missing.stderr


DIE_AT_THE_UPLOAD = """
from ckptmigrate.storage import s3_compose
real = s3_compose.S3Object.call
def call(self, op, **kwargs):
    if op == "put_object":
        os._exit(9)  # the compacted copy is staged on local disk, not yet sent
    return real(self, op, **kwargs)
s3_compose.S3Object.call = call
"""


def test_a_killed_staged_run_leaves_its_local_copy_in_the_temporary_directory(
        cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket("stage", tmp_path)
    torch.save({"w": torch.randn(1024)}, tmp_path / "k.pt")
    assert cli("stamp", str(tmp_path / "k.pt"), "--tag", "run=1").returncode == 0  # appended: bytes to reclaim
    s3.client().upload_file(str(tmp_path / "k.pt"), bucket, "k.pt")
    tmp = tmp_path / "tmp"
    (tmp / "someone-elses").mkdir(parents=True)
    env = {**s3.env, "TMPDIR": str(tmp)}
    killed(DIE_AT_THE_UPLOAD, "compact", f"s3://{bucket}/k.pt", cwd=tmp_path, env=env)  # compact runs staged
    [stage] = [p for p in tmp.iterdir() if p.name != "someone-elses"]
    busy = tmp / "ckptmigrate-busy0000"  # a run at work: a file open in it
    busy.mkdir()
    with open(busy / "in.pt", "wb"):
        assert report(cli, tmp, "--delete", env=env) == (0, {str(stage): "young", str(busy): "in use"})
        assert report(cli, tmp, "--older-than", "0", env=env) == (1, {str(stage): "leftover", str(busy): "in use"})
        assert report(cli, tmp, "--older-than", "0", "--delete", env=env) == (
            0, {str(stage): "removed", str(busy): "in use"})
    assert sorted(p.name for p in tmp.iterdir()) == ["ckptmigrate-busy0000", "someone-elses"]


DIE_BEFORE_THE_SWITCH = """
from ckptmigrate.storage import writers
real = writers.put
def put(obj, body):
    if obj.key.endswith("/.metadata"):
        os._exit(9)  # the new envelope is put, .metadata not yet
    return real(obj, body)
writers.put = put
"""

DIE_BEFORE_THE_JOURNAL_GOES = """
from ckptmigrate.storage import prefix_write
real = prefix_write.writers.delete
def delete(obj):
    if ".ckptmigrate-headers." in obj.key:
        os._exit(9)  # the new index is in place: only the journal is left
    return real(obj)
prefix_write.writers.delete = delete
"""

DIE_BETWEEN_REMOTE_SHARDS = """
from ckptmigrate.storage import prefix_write
real = prefix_write._replace_header
done = []
def die(shard, head):
    if done:
        os._exit(9)
    done.append(shard)
    real(shard, head)
prefix_write._replace_header = die
"""


def upload_dir(s3: S3Server, bucket: str, local: Path, prefix: str) -> None:
    for path in local.iterdir():
        s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())


def test_killed_prefix_writes_leave_journals_and_envelopes(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket("pre", tmp_path)
    torch.manual_seed(3)
    dcp.save({f"layers.{i}.weight": torch.randn(4096) for i in range(3)}, checkpoint_id=str(tmp_path / "dcp"))
    upload_dir(s3, bucket, tmp_path / "dcp", "dcp")
    for name in ("hf", "hf2"):
        (tmp_path / name).mkdir()
        save_torch_state_dict({f"layers.{i}.weight": torch.randn(64 * 1024) for i in range(3)},
                              str(tmp_path / name), max_shard_size="256KB")
        upload_dir(s3, bucket, tmp_path / name, name)
    renames = chain(tmp_path, "ckpt.rename_regex(r'^layers\\.', 'blocks.')")
    for patch, prefix in ((DIE_BEFORE_THE_SWITCH, "dcp"), (DIE_BEFORE_THE_JOURNAL_GOES, "hf"),
                          (DIE_BETWEEN_REMOTE_SHARDS, "hf2")):
        before = s3_objects(s3, bucket)
        killed(patch, "upgrade", f"s3://{bucket}/{prefix}/", "--from", "c1", "--no-backup", "--migrations", renames,
               cwd=tmp_path, env=s3.env)
        if prefix == "dcp":
            [envelope] = set(s3_objects(s3, bucket)) - set(before)
        elif prefix == "hf":
            [orphan] = set(s3_objects(s3, bucket)) - set(before)
        else:
            [named] = set(s3_objects(s3, bucket)) - set(before)
    objects = s3_objects(s3, bucket)
    expected = {f"s3://{bucket}/{envelope}": "leftover", f"s3://{bucket}/{orphan}": "leftover",
                f"s3://{bucket}/{named}": "recovery"}

    assert report(cli, f"s3://{bucket}/", "--older-than", "0", env=s3.env) == (1, expected)
    # the journal the placeholder names stays: a recovery in waiting, which the check still reports
    code, found = report(cli, f"s3://{bucket}/", "--older-than", "0", "--delete", env=s3.env)
    assert code == 1 and found == {**expected, f"s3://{bucket}/{envelope}": "removed",
                                   f"s3://{bucket}/{orphan}": "removed"}
    assert set(objects) - set(s3_objects(s3, bucket)) == {envelope, orphan}
    assert {k: v for k, v in s3_objects(s3, bucket).items()} == {k: v for k, v in objects.items()
                                                                  if k not in (envelope, orphan)}
    assert cli("upgrade", f"s3://{bucket}/hf2/", "--from", "c1", "--no-backup", "--migrations", renames,
               env=s3.env).returncode == 0
    assert report(cli, f"s3://{bucket}/", "--older-than", "0", env=s3.env) == (0, {})


# --- GCS -------------------------------------------------------------------------------------------------

DIE_AT_THE_COMPOSE = """
from ckptmigrate.storage import gcs_write
real = gcs_write.GcsObject.call
def call(self, method, path, *args, **kwargs):
    if path.endswith("/compose"):
        os._exit(9)  # the tail is uploaded beside the object, not yet composed into it
    return real(self, method, path, *args, **kwargs)
gcs_write.GcsObject.call = call
"""


def test_a_gcs_append_killed_before_its_compose_leaves_its_tail(cli: Cli, tmp_path: Path) -> None:
    with running_gcs() as (env, bucket):
        torch.save({"blocks.0.weight": torch.randn(4096)}, tmp_path / "k.pt")
        bucket.blob("run/k.pt").upload_from_filename(str(tmp_path / "k.pt"))
        bucket.blob("run/notes.txt").upload_from_string(b"not ours")

        def objects() -> dict[str, Any]:
            return {b.name: b.generation for b in bucket.client.list_blobs(bucket)}

        before = objects()
        killed(DIE_AT_THE_COMPOSE, "upgrade", "gs://ckpts/run/k.pt", "--from", "c1", "--no-backup",
               "--migrations", chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')"), cwd=tmp_path,
               env=env)
        [tail] = set(objects()) - set(before)
        assert tail.startswith("run/k.pt.ckptmigrate-tail-")
        where = f"gs://ckpts/{tail}"
        for target in ("gs://ckpts/run/k.pt", "gs://ckpts/run/"):
            assert report(cli, target, "--delete", env=env) == (0, {where: "young"})
            assert report(cli, target, "--older-than", "0", env=env) == (1, {where: "leftover"})
        assert report(cli, "gs://ckpts/run/notes.txt", "--older-than", "0", env=env) == (0, {})
        assert report(cli, "gs://ckpts/run/", "--older-than", "0", "--delete", env=env) == (0, {where: "removed"})
        assert objects() == before


# --- Azure -----------------------------------------------------------------------------------------------

def test_an_azure_header_rewrite_killed_before_its_journal_goes(cli: Cli, tmp_path: Path) -> None:
    with azurite.running() as (env, container):
        (tmp_path / "hf").mkdir()
        torch.manual_seed(5)
        save_torch_state_dict({f"layers.{i}.weight": torch.randn(64 * 1024) for i in range(3)},
                              str(tmp_path / "hf"), max_shard_size="256KB")
        for path in (tmp_path / "hf").iterdir():
            container.upload_blob(f"hf/{path.name}", path.read_bytes())

        def blobs() -> dict[str, str]:
            return {b.name: str(b.etag) for b in container.list_blobs()}

        before = blobs()
        killed(DIE_BEFORE_THE_JOURNAL_GOES, "upgrade", "az://ckpts/hf/", "--from", "c1", "--no-backup",
               "--migrations", chain(tmp_path, "ckpt.rename_regex(r'^layers\\.', 'blocks.')"), cwd=tmp_path, env=env)
        [journal] = set(blobs()) - set(before)
        written = blobs()
        where = f"az://ckpts/{journal}"
        assert report(cli, "az://ckpts/hf/", "--delete", env=env) == (0, {where: "young"})
        assert report(cli, "az://ckpts/hf/", "--older-than", "0", "--delete", env=env) == (0, {where: "removed"})
        assert blobs() == {k: v for k, v in written.items() if k != journal}
