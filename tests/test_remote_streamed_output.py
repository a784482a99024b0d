"""User story: "I upgrade a checkpoint from one bucket into another (``upgrade SRC -o DST``) on a
runner whose disk could not hold it: the new object is sent as it is made, the unchanged tensors are
copied bucket to bucket on the server, the source is never touched, and an object already at the
destination is not replaced unless I ask."

Against real servers on 127.0.0.1 (moto S3, the GCS emulator), the CLI as a subprocess under strace
(which lists every file opened for writing: none). The new object is byte for byte what the same
``-o`` writes locally (but its random serialization id and the envelope's timestamps), and loads in
torch with the expected values; from S3 to another S3 bucket the kept tensors cross no client
(``UploadPartCopy`` with the source bucket), from S3 to GCS and within GCS or Azure (neither copies
a byte range server-side) they are read through. An existing
output is one line, exit 2, and nothing written; a failure mid-stream leaves no output and no
multipart upload open.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import azurite
from tests.objectstores import S3Server, running_gcs, running_s3
from tests.test_remote_streamed_migration import TRANSPOSE, chain, get, model, open_uploads, same_archive, saved, strace

Cli = Callable[..., Any]
MIB = 1 << 20


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture(scope="module")
def gcs() -> Iterator[tuple[dict[str, str], Any]]:
    with running_gcs() as served:
        yield served


@pytest.fixture(scope="module")
def azure() -> Iterator[tuple[dict[str, str], Any]]:
    with azurite.running() as served:
        yield served


def keys(s3: S3Server, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def migrated_locally(tmp_path: Path, cli: Cli, original: bytes, migrations: Path) -> bytes:
    """The same ``-o``, from a local file into a local file."""
    (tmp_path / "local").mkdir()
    src, out = tmp_path / "local" / "m.pt", tmp_path / "local" / "out.pt"
    src.write_bytes(original)
    cli("upgrade", src, "-o", out, "--from", "c1", "--migrations", migrations, check=True)
    return out.read_bytes()


def test_s3_to_another_bucket_streams_and_copies_the_kept_tensors_server_side(
        cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    src_bucket, dst_bucket = s3.new_bucket("src", tmp_path), s3.new_bucket("dst", tmp_path)
    original_state = model()
    original = saved(original_state)
    s3.client().put_object(Bucket=src_bucket, Key="m.pt", Body=original)
    migrations = chain(tmp_path, TRANSPOSE)
    s3.served.reset()
    proc, writes = strace(tmp_path, "upgrade", f"s3://{src_bucket}/m.pt", "-o", f"s3://{dst_bucket}/out/m.pt",
                          "--from", "c1", "--migrations", migrations, "--json")
    assert proc.returncode == 0, proc.stderr
    sent, received = s3.served.body_bytes_sent, s3.served.body_bytes_received  # by the server, for the run
    assert writes == []  # no staged copy of the source, no local result
    result = json.loads(proc.stdout)
    assert (result["path"], result["output"]) == (f"s3://{src_bucket}/m.pt", f"s3://{dst_bucket}/out/m.pt")
    assert result["written"] and result["backup"] is None
    new = get(s3, dst_bucket, "out/m.pt")
    same_archive(new, migrated_locally(tmp_path, cli, original, migrations))
    loaded = torch.load(io.BytesIO(new), weights_only=True)
    assert torch.equal(loaded["blocks.1.weight"], original_state["blocks.1.weight"].T)
    assert all(torch.equal(loaded[k], original_state[k]) for k in ("blocks.0.weight", "blocks.3.weight"))
    assert torch.equal(loaded["head.bias"], original_state["head.bias"] + 1)
    # the source untouched, nothing else in either bucket (no backup: the source is not replaced)
    assert get(s3, src_bucket, "m.pt") == original
    assert keys(s3, src_bucket) == ["m.pt"] and keys(s3, dst_bucket) == ["out/m.pt"]
    # what crossed the client, counted by the server: up, the new tensor (12 MiB) and 5 MiB of each
    # of two kept weights (to fill a part); down, the weight transposed and those 5 MiB; the rest of
    # the 48 MiB (staged: all of it down, then up) copied from bucket to bucket
    assert received < 12 * MIB + 2 * 5 * MIB + MIB
    assert sent < 12 * MIB + 2 * 5 * MIB + MIB
    assert result["transfer"]["bytes_copied_server_side"] >= 12 * MIB + 2 * 7 * MIB
    assert open_uploads(s3, dst_bucket) == []


def test_s3_a_rename_into_another_bucket_copies_every_record_server_side(
        cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    src_bucket, dst_bucket = s3.new_bucket("rsrc", tmp_path), s3.new_bucket("rdst", tmp_path)
    original_state = model()
    original = saved(original_state)
    s3.client().put_object(Bucket=src_bucket, Key="m.pt", Body=original)
    migrations = chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')")
    s3.served.reset()
    proc = cli("upgrade", f"s3://{src_bucket}/m.pt", "-o", f"s3://{dst_bucket}/m.pt", "--from", "c1",
               "--migrations", migrations, "--json")
    assert proc.returncode == 0, proc.stderr
    sent, received = s3.served.body_bytes_sent, s3.served.body_bytes_received
    # the records stay where they are (copied from the source bucket), a new data.pkl, envelope and
    # directory after them: what crosses is the directory and data.pkl read, and the new tail sent
    assert sent < MIB and received < MIB, (sent, received)
    loaded = torch.load(io.BytesIO(get(s3, dst_bucket, "m.pt")), weights_only=True)
    assert torch.equal(loaded["stem.weight"], original_state["blocks.0.weight"]) and "blocks.0.weight" not in loaded
    assert cli("current", f"s3://{dst_bucket}/m.pt").stdout.strip() == "c2"
    assert get(s3, src_bucket, "m.pt") == original and keys(s3, src_bucket) == ["m.pt"]
    assert open_uploads(s3, dst_bucket) == []


def test_s3_a_staged_output_reports_what_crossed_the_network_as_a_streamed_one_does(
        cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    """A ``.safetensors`` output is not streamed (its header comes first): the object is downloaded,
    migrated and uploaded, and ``--json``'s ``transfer`` says so, as the server counted it."""
    src_bucket, dst_bucket = s3.new_bucket("ssrc", tmp_path), s3.new_bucket("sdst", tmp_path)
    original = saved(model())
    s3.client().put_object(Bucket=src_bucket, Key="m.pt", Body=original)
    migrations = chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')")
    s3.served.reset()
    proc = cli("upgrade", f"s3://{src_bucket}/m.pt", "-o", f"s3://{dst_bucket}/m.safetensors", "--from", "c1",
               "--migrations", migrations, "--json")
    assert proc.returncode == 0, proc.stderr
    transfer = json.loads(proc.stdout)["transfer"]
    down, up = s3.served.body_bytes_sent, s3.served.body_bytes_received
    # the whole source down, the whole result up (the server also counts its XML answers)
    assert len(original) <= transfer["bytes_received"] <= down < transfer["bytes_received"] + MIB
    assert len(get(s3, dst_bucket, "m.safetensors")) <= transfer["bytes_sent"] <= up < transfer["bytes_sent"] + MIB
    assert transfer["requests"] >= 2 and transfer["bytes_copied_server_side"] == 0


def test_s3_an_existing_output_is_kept_unless_overwrite(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket("exists", tmp_path)
    original = saved(model())
    theirs = saved({"other": torch.randn(64)})
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=original)
    s3.client().put_object(Bucket=bucket, Key="out.pt", Body=theirs)
    migrations = chain(tmp_path, TRANSPOSE)
    args = ("upgrade", f"s3://{bucket}/m.pt", "-o", f"s3://{bucket}/out.pt", "--from", "c1", "--migrations", migrations)
    s3.served.reset()
    proc = cli(*args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"s3://{bucket}/out.pt: the output exists" in proc.stderr
    assert not any("uploads" in line or "partNumber=" in line for line in s3.served.log)  # checked before any work
    assert get(s3, bucket, "out.pt") == theirs and get(s3, bucket, "m.pt") == original

    proc = cli(*args, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    loaded = torch.load(io.BytesIO(get(s3, bucket, "out.pt")), weights_only=True)
    assert torch.equal(loaded["blocks.1.weight"], model()["blocks.1.weight"].T)
    assert get(s3, bucket, "m.pt") == original
    assert keys(s3, bucket) == ["m.pt", "out.pt"] and open_uploads(s3, bucket) == []


def test_s3_a_failure_mid_stream_leaves_no_output(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    src_bucket, dst_bucket = s3.new_bucket("fsrc", tmp_path), s3.new_bucket("fdst", tmp_path)
    original = saved(model())
    s3.client().put_object(Bucket=src_bucket, Key="m.pt", Body=original)
    failing = ("from ckptmigrate.tensors.refs import Deferred\n\n\ndef late():\n"
               "    raise RuntimeError('out of memory computing late')\n")
    migrations = chain(tmp_path, f"{TRANSPOSE}; ckpt.add('late', Deferred((1024,), 'float32', late))", failing)
    s3.served.reset()
    proc = cli("upgrade", f"s3://{src_bucket}/m.pt", "-o", f"s3://{dst_bucket}/m.pt", "--from", "c1",
               "--migrations", migrations)
    assert proc.returncode != 0 and "out of memory computing late" in proc.stderr, proc.stderr
    assert any("partNumber=" in line for line in s3.served.log)  # parts had gone up
    assert keys(s3, dst_bucket) == [] and open_uploads(s3, dst_bucket) == []
    assert get(s3, src_bucket, "m.pt") == original and keys(s3, src_bucket) == ["m.pt"]


def test_s3_to_gcs_is_read_through_into_one_resumable_upload(
        cli: Cli, s3: S3Server, gcs: tuple[dict[str, str], Any], tmp_path: Path) -> None:
    env, place = gcs
    src_bucket = s3.new_bucket("togcs", tmp_path)
    original_state = model()
    original = saved(original_state)
    s3.client().put_object(Bucket=src_bucket, Key="m.pt", Body=original)
    migrations = chain(tmp_path, TRANSPOSE)
    key = f"{tmp_path.name}/out.pt"
    proc, writes = strace(tmp_path, "upgrade", f"s3://{src_bucket}/m.pt", "-o", f"gs://ckpts/{key}", "--from", "c1",
                          "--migrations", migrations, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert writes == []
    new = place.blob(key).download_as_bytes()
    same_archive(new, migrated_locally(tmp_path, cli, original, migrations))
    loaded = torch.load(io.BytesIO(new), weights_only=True)
    assert torch.equal(loaded["blocks.1.weight"], original_state["blocks.1.weight"].T)
    assert json.loads(proc.stdout)["transfer"]["bytes_sent"] == len(new)  # every byte goes up once
    assert get(s3, src_bucket, "m.pt") == original


def test_s3_a_source_replaced_mid_stream_writes_no_output(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    src_bucket, dst_bucket = s3.new_bucket("rsrc", tmp_path), s3.new_bucket("rdst", tmp_path)
    original = saved(model())
    theirs = saved({"other": torch.randn(1024, 1024)})
    (tmp_path / "theirs.pt").write_bytes(theirs)
    s3.client().put_object(Bucket=src_bucket, Key="m.pt", Body=original)
    # the new tensor after the kept ones is computed (their parts copied) by a function that first
    # replaces the source, as another writer would
    race = (f"import boto3\nfrom ckptmigrate.tensors.refs import Deferred\nimport torch\n\n\ndef late():\n"
            f"    boto3.client('s3').put_object(Bucket={src_bucket!r}, Key='m.pt', "
            f"Body=open({str(tmp_path / 'theirs.pt')!r}, 'rb').read())\n    return torch.zeros(1024)\n")
    migrations = chain(tmp_path, f"{TRANSPOSE}; ckpt.add('late', Deferred((1024,), 'float32', late))", race)
    proc = cli("upgrade", f"s3://{src_bucket}/m.pt", "-o", f"s3://{dst_bucket}/m.pt", "--from", "c1",
               "--migrations", migrations, "--json")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"s3://{src_bucket}/m.pt" in proc.stderr and "changed" in proc.stderr, proc.stderr
    assert keys(s3, dst_bucket) == [] and open_uploads(s3, dst_bucket) == []
    assert get(s3, src_bucket, "m.pt") == theirs


@pytest.mark.parametrize("store", ["gs", "az"])
def test_gcs_and_azure_to_another_object_of_the_store_stream_and_leave_the_source(
    cli: Cli, gcs: tuple[dict[str, str], Any], azure: tuple[dict[str, str], Any], tmp_path: Path, store: str,
) -> None:
    env, place = gcs if store == "gs" else azure
    original_state = model()
    original = saved(original_state)
    src, dst = f"{tmp_path.name}/m.pt", f"{tmp_path.name}/out/m.pt"
    if store == "gs":
        place.blob(src).upload_from_string(original)
    else:
        place.upload_blob(src, original)

    def read(key: str) -> bytes:
        return place.blob(key).download_as_bytes() if store == "gs" else place.download_blob(key).readall()

    migrations = chain(tmp_path, TRANSPOSE)
    proc, writes = strace(tmp_path, "upgrade", f"{store}://ckpts/{src}", "-o", f"{store}://ckpts/{dst}", "--from",
                          "c1", "--migrations", migrations, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert writes == []
    new = read(dst)
    same_archive(new, migrated_locally(tmp_path, cli, original, migrations))
    loaded = torch.load(io.BytesIO(new), weights_only=True)
    assert torch.equal(loaded["blocks.1.weight"], original_state["blocks.1.weight"].T)
    assert json.loads(proc.stdout)["transfer"]["bytes_sent"] == len(new)
    assert read(src) == original  # the source untouched, and no backup taken of it
    backup = place.blob(src + ".bak") if store == "gs" else place.get_blob_client(src + ".bak")
    assert not backup.exists()
    again = cli("upgrade", f"{store}://ckpts/{src}", "-o", f"{store}://ckpts/{dst}", "--from", "c1",
                "--migrations", migrations, env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert read(dst) == new
