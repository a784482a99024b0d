"""User story: "I transpose one weight of a checkpoint that lives in a bucket, on a runner whose disk
could not hold it: the new object is sent as it is made, the unchanged tensors stay where they are,
and nothing is lost if the run fails or loses a race."

Against real servers on 127.0.0.1 (moto S3, the GCS emulator, Azurite), the CLI as a subprocess.
A migration that changes tensor values is streamed: the new torch zip goes up in order, a kept
tensor copied server-side on S3 (``UploadPartCopy``) or read through (GCS, Azure), each new tensor
computed in turn; no local file is written (the process runs under strace, which lists every file
opened for writing). The object is byte for byte what the same migration writes locally (but its
random serialization id), and loads in torch with the expected values. A run whose object is
replaced mid-stream exits 2 and writes nothing; a run that fails mid-stream leaves the object as it
was; neither leaves a multipart upload open or a backup behind.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import azurite
from tests.objectstores import S3Server, running_gcs, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]
MIB = 1 << 20
ID = ".data/serialization_id"
ENVELOPE = ".data/ckptmigrate.json"


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


def model() -> dict[str, torch.Tensor]:
    """Four 12 MiB weights and a bias. A kept weight after new bytes is copied server-side on S3 but
    for its first 5 MiB (S3's smallest part, which the new bytes before it must be sent in)."""
    torch.manual_seed(3)
    out = {f"blocks.{i}.weight": torch.randn(1536, 2048) for i in range(4)}
    out["head.bias"] = torch.arange(4.0)
    return out


def chain(tmp_path: Path, body: str, extra: str = "") -> Path:
    """c1 (base) -> c2 (``body``); ``extra``: lines at the top of the c2 script."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "c1.py").write_text('"""c1."""\nrevision = "c1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
                                    "    pass\n")
    (versions / "c2.py").write_text(f'"""c2."""\n{extra}\nrevision = "c2"\ndown_revision = "c1"\n\n\n'
                                    f"def upgrade(ckpt):\n    {body}\n")
    return versions.parent


def strace(tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None) -> tuple[Any, list[str]]:
    """The CLI under strace: its result, and the files it opened for writing (none expected)."""
    assert shutil.which("strace"), "scripts/setup.sh installs strace"
    log = tmp_path / "opens.log"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,creat", "-o", str(log),
                           sys.executable, "-m", "ckptmigrate", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=None if env is None else {**__import__("os").environ, **env})
    # an open that failed created nothing (the Azure SDK's uuid1 tries libuuid's clock file)
    writes = [line for line in log.read_text().splitlines()
              if re.search(r"O_CREAT|O_TMPFILE|\bcreat\(", line) and not re.search(r"= -1 E[A-Z]+", line)]
    return proc, writes


def record_ranges(data: bytes, suffix: str) -> list[tuple[int, int]]:
    """Where the bytes of the record whose name ends with ``suffix`` are, and its CRC (in its local
    header and its central directory entry)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        central = zf.start_dir
        while not data[central + 46 :].startswith(info.filename.encode()):
            n, m, k = struct.unpack("<HHH", data[central + 28 : central + 34])
            central += 46 + n + m + k
        return [(start, start + info.file_size), (info.header_offset + 14, info.header_offset + 18),
                (central + 16, central + 20)]


def same_archive(streamed: bytes, local: bytes) -> None:
    """The two archives are byte for byte the same but for what differs between two runs of one
    migration: the (random) serialization id and the envelope's timestamps (compared without them)."""
    def masked(data: bytes) -> bytes:
        out = bytearray(data)
        for a, b in record_ranges(data, ID) + record_ranges(data, ENVELOPE):
            out[a:b] = bytes(b - a)
        return bytes(out)

    def envelope(data: bytes) -> dict[str, Any]:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            env = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith(ENVELOPE))))
        for step in env["history"]:
            step.pop("at")
        env.pop("created_at")
        return dict(env)

    assert len(streamed) == len(local)
    assert masked(streamed) == masked(local)
    assert envelope(streamed) == envelope(local)


def migrated_locally(tmp_path: Path, cli: Cli, original: bytes, migrations: Path) -> bytes:
    local = tmp_path / "local" / "m.pt"
    local.parent.mkdir()
    local.write_bytes(original)
    cli("upgrade", local, "--from", "c1", "--migrations", migrations, check=True)
    return local.read_bytes()


def saved(obj: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def open_uploads(s3: S3Server, bucket: str) -> list[Any]:
    return list(s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def get(s3: S3Server, bucket: str, key: str) -> bytes:
    return bytes(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


#: A transpose (computed as the archive is sent) and a map (computed when the script runs): both
#: read their tensor by range, neither stages the object.
TRANSPOSE = "ckpt.transpose('blocks.1.weight', 0, 1); ckpt.map('head.bias', lambda t: t + 1)"


def test_s3_a_transpose_streams_the_new_tensor_and_copies_the_rest(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket("stream", tmp_path)
    original_state = model()
    original = saved(original_state)
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=original)
    migrations = chain(tmp_path, TRANSPOSE)
    s3.served.reset()
    proc, writes = strace(tmp_path, "upgrade", f"s3://{bucket}/m.pt", "--from", "c1", "--migrations", migrations,
                          "--json")
    assert proc.returncode == 0, proc.stderr
    assert writes == []  # no temporary file, no staged copy of the object
    new = get(s3, bucket, "m.pt")
    same_archive(new, migrated_locally(tmp_path, cli, original, migrations))
    loaded = torch.load(io.BytesIO(new), weights_only=True)
    assert torch.equal(loaded["blocks.1.weight"], original_state["blocks.1.weight"].T)
    assert all(torch.equal(loaded[k], original_state[k]) for k in ("blocks.0.weight", "blocks.3.weight"))
    assert torch.equal(loaded["head.bias"], original_state["head.bias"] + 1)
    transfer = json.loads(proc.stdout)["transfer"]
    # the new tensor (12 MiB) goes up, and 5 MiB of each of two kept weights (to fill a part); the
    # rest of them is copied server-side (after the backup, a copy of the whole object)
    assert s3.served.body_bytes_received < 12 * MIB + 2 * 5 * MIB + MIB
    assert transfer["bytes_copied_server_side"] - len(original) >= 12 * MIB + 2 * 7 * MIB
    assert get(s3, bucket, "m.pt.bak") == original
    assert open_uploads(s3, bucket) == []


def test_s3_an_object_replaced_mid_stream_is_not_overwritten(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket("race", tmp_path)
    original = saved(model())
    theirs = saved({"other": torch.randn(1024, 1024)})
    (tmp_path / "theirs.pt").write_bytes(theirs)
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=original)
    # the new tensor after the kept ones is computed (mid-stream, parts already sent) by a function
    # that first replaces the object, as another writer would
    race = (f"import boto3\nfrom ckptmigrate.tensors.refs import Deferred\nimport torch\n\n\ndef late():\n"
            f"    boto3.client('s3').put_object(Bucket={bucket!r}, Key='m.pt', "
            f"Body=open({str(tmp_path / 'theirs.pt')!r}, 'rb').read())\n    return torch.zeros(1024)\n")
    migrations = chain(tmp_path, f"{TRANSPOSE}; ckpt.add('late', Deferred((1024,), 'float32', late))", race)
    proc = cli("upgrade", f"s3://{bucket}/m.pt", "--from", "c1", "--migrations", migrations, "--json",
               env={"AWS_DEFAULT_REGION": "us-east-1"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "the object changed since it was read" in proc.stderr
    assert json.loads(proc.stdout)["error"]["type"] == "ObjectChanged"
    assert get(s3, bucket, "m.pt") == theirs
    assert open_uploads(s3, bucket) == []
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["m.pt"]  # the backup taken for the lost write is gone


FAILURES = {
    "an op that raises": ("def late():\n    raise RuntimeError('out of memory computing late')\n",
                          "out of memory computing late"),
    "ctrl-c": ("import os, signal\n\n\ndef late():\n    os.kill(os.getpid(), signal.SIGINT)\n"
               "    return torch.zeros(1024)\n", "aborted"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_s3_a_failure_mid_stream_leaves_the_object_as_it_was(cli: Cli, s3: S3Server, tmp_path: Path,
                                                              failure: str) -> None:
    bucket = s3.new_bucket("fail", tmp_path)
    original = saved(model())
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=original)
    code, said = FAILURES[failure]
    failing = f"import torch\nfrom ckptmigrate.tensors.refs import Deferred\n{code}"
    migrations = chain(tmp_path, f"{TRANSPOSE}; ckpt.add('late', Deferred((1024,), 'float32', late))", failing)
    s3.served.reset()
    proc = cli("upgrade", f"s3://{bucket}/m.pt", "--from", "c1", "--migrations", migrations)
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr
    assert any("partNumber=" in line for line in s3.served.log)  # parts had gone up
    assert get(s3, bucket, "m.pt") == original
    assert open_uploads(s3, bucket) == []
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["m.pt"]


def test_gcs_a_transpose_is_streamed_through_one_resumable_upload(cli: Cli, gcs: tuple[dict[str, str], Any],
                                                                   tmp_path: Path) -> None:
    env, bucket = gcs
    original_state = model()
    original = saved(original_state)
    migrations = chain(tmp_path, TRANSPOSE)
    bucket.blob("stream/m.pt").upload_from_string(original)
    proc, writes = strace(tmp_path, "upgrade", "gs://ckpts/stream/m.pt", "--from", "c1", "--migrations",
                          migrations, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    new = bucket.blob("stream/m.pt").download_as_bytes()
    assert bucket.blob("stream/m.pt.bak").download_as_bytes() == original
    assert writes == []
    same_archive(new, migrated_locally(tmp_path, cli, original, migrations))
    loaded = torch.load(io.BytesIO(new), weights_only=True)
    assert torch.equal(loaded["blocks.1.weight"], original_state["blocks.1.weight"].T)
    transfer = json.loads(proc.stdout)["transfer"]
    assert transfer["bytes_sent"] == len(new)  # GCS has no range copy: every byte goes up once


def test_azure_a_transpose_is_staged_in_blocks_and_committed_once(cli: Cli, azure: tuple[dict[str, str], Any],
                                                                   tmp_path: Path) -> None:
    env, container = azure
    original_state = model()
    original = saved(original_state)
    migrations = chain(tmp_path, TRANSPOSE)
    container.upload_blob("stream/m.pt", original)
    proc, writes = strace(tmp_path, "upgrade", "az://ckpts/stream/m.pt", "--from", "c1", "--migrations",
                          migrations, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    new = container.download_blob("stream/m.pt").readall()
    assert container.download_blob("stream/m.pt.bak").readall() == original
    assert writes == []
    same_archive(new, migrated_locally(tmp_path, cli, original, migrations))
    loaded = torch.load(io.BytesIO(new), weights_only=True)
    assert torch.equal(loaded["blocks.1.weight"], original_state["blocks.1.weight"].T)
    assert json.loads(proc.stdout)["transfer"]["bytes_sent"] == len(new)


@pytest.mark.parametrize("store", ["gs", "az"])
def test_gcs_and_azure_a_replaced_object_stands_and_a_failure_changes_nothing(
    cli: Cli, gcs: tuple[dict[str, str], Any], azure: tuple[dict[str, str], Any], tmp_path: Path, store: str,
) -> None:
    env, place = gcs if store == "gs" else azure
    original = saved(model())
    theirs = saved({"other": torch.randn(1024)})
    (tmp_path / "theirs.pt").write_bytes(theirs)

    def put(key: str, body: bytes) -> None:
        if store == "gs":
            place.blob(key).upload_from_string(body)
        else:
            place.upload_blob(key, body, overwrite=True)

    def get(key: str) -> bytes:
        return bytes(place.blob(key).download_as_bytes() if store == "gs" else place.download_blob(key).readall())

    def names() -> list[str]:
        if store == "gs":
            return sorted(b.name for b in place.client.list_blobs(place, prefix=f"{tmp_path.name}/"))
        return sorted(b.name for b in place.list_blobs(name_starts_with=f"{tmp_path.name}/"))

    key = f"{tmp_path.name}/m.pt"
    put(key, original)
    url = f"{store}://ckpts/{key}"
    # another writer replaces the object while the new tensor after the kept ones is computed
    replace = (f"from tests.streamed_race import put\n\n\ndef late():\n"
               f"    put({store!r}, {key!r}, {str(tmp_path / 'theirs.pt')!r})\n    return torch.zeros(1024)\n")
    race = chain(tmp_path / "race", f"{TRANSPOSE}; ckpt.add('late', Deferred((1024,), 'float32', late))",
                 "import torch\nfrom ckptmigrate.tensors.refs import Deferred\n" + replace)
    proc = cli("upgrade", url, "--from", "c1", "--migrations", race, "--json",
               env={**env, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 2 and "the object changed since it was read" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["error"]["type"] == "ObjectChanged"
    assert get(key) == theirs and names() == [key]  # theirs stands; the backup taken is gone

    put(key, original)
    failing = chain(tmp_path / "fail", f"{TRANSPOSE}; ckpt.add('late', Deferred((1024,), 'float32', late))",
                    "from ckptmigrate.tensors.refs import Deferred\n\n\ndef late():\n"
                    "    raise RuntimeError('out of memory computing late')\n")
    proc = cli("upgrade", url, "--from", "c1", "--migrations", failing, env=env)
    assert proc.returncode != 0 and "out of memory computing late" in proc.stderr, proc.stderr
    assert get(key) == original and names() == [key]


def test_s3_a_cast_of_many_small_tensors_reads_them_in_few_requests(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket("many", tmp_path)
    torch.manual_seed(4)
    original_state = {f"blocks.{i}.weight": torch.randn(256) for i in range(2000)}
    original = saved(original_state)
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=original)
    s3.served.reset()
    proc = cli("upgrade", f"s3://{bucket}/m.pt", "--from", "c1", "--migrations",
               chain(tmp_path, r"ckpt.cast('blocks\\..*', 'float64')"), "--no-backup")
    assert proc.returncode == 0, proc.stderr
    # each tensor is read by range, in file order: from a few windows, not a request each
    gets = [line for line in s3.served.log if line.startswith("GET")]
    assert len(gets) < 20 and s3.served.body_bytes_sent < 2 * len(original), s3.served.log
    loaded = torch.load(io.BytesIO(get(s3, bucket, "m.pt")), weights_only=True)
    assert all(torch.equal(loaded[k], v.double()) for k, v in original_state.items())
