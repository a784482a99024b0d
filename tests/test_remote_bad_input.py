"""User story: "When a bucket, an object or a server is wrong, I get one line naming the URL, exit 2,
and nothing in the bucket changes" — and when two runs race on one object, one of them loses cleanly.

Real servers on 127.0.0.1 (moto S3, an HTTP server), the CLI as a subprocess. A missing bucket or
object, no credentials, a forbidden object, a server that ignores ``Range`` (refused at its first
answer, not downloaded), a truncated object, a URL scheme with no backend or whose backend is not
installed: one line, no traceback, no credentials. An object deleted mid-run, or overwritten by
another writer between the read and the write (a migration script does it, so the race is
deterministic): exit 2, the other writer's object stands, no backup is left, and no multipart
upload stays open.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.objectstores import HttpServer, S3Server, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server, tmp_path: Path) -> str:
    return s3.new_bucket("bad", tmp_path)


def one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr


def checkpoint(path: Path, numel: int = 1024, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    torch.save({"a": torch.randn(numel), "b": torch.randn(numel), "head.bias": torch.zeros(3)}, path)
    return path.read_bytes()


def objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_missing_bucket_object_scheme_and_backend(cli: Cli, bucket: str) -> None:
    one_line(cli("inspect", "s3://no-such-bucket-here/m.pt"), "s3://no-such-bucket-here/m.pt",
             "the bucket does not exist")
    one_line(cli("current", f"s3://{bucket}/missing.pt"), f"s3://{bucket}/missing.pt", "no such object")
    one_line(cli("inspect", "foo://host/m.pt"), "foo://host/m.pt", "no backend reads foo:// URLs")
    # every backend is installed here (the dev extra): adlfs is made unimportable in the child
    without = subprocess.run([sys.executable, "-c", "import sys; sys.modules['adlfs'] = None; "
                              "from ckptmigrate.cli import main; sys.argv[0] = 'ckptmigrate'; main()",
                              "inspect", "az://container/m.pt"], capture_output=True, text=True)
    err = one_line(without, "az://container/m.pt", "pip install 'ckptmigrate[azure]'")
    assert "adlfs" in err


def test_no_credentials_is_one_line_without_trying_forever(cli: Cli, s3: S3Server, bucket: str,
                                                          tmp_path: Path) -> None:
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=checkpoint(tmp_path / "m.pt"))
    bare = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "HOME": str(tmp_path)}
    one_line(cli("inspect", f"s3://{bucket}/m.pt", env=bare), f"s3://{bucket}/m.pt", "no credentials found")


def test_a_truncated_object_names_the_url(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    data = checkpoint(tmp_path / "m.pt", 64 * 1024)
    s3.client().put_object(Bucket=bucket, Key="cut.pt", Body=data[: len(data) // 2])
    one_line(cli("inspect", f"s3://{bucket}/cut.pt"), f"s3://{bucket}/cut.pt", "truncated")
    one_line(cli("upgrade", f"s3://{bucket}/cut.pt", "--from", "c1"), f"s3://{bucket}/cut.pt")
    assert list(objects(s3, bucket)) == ["cut.pt"]


def test_forbidden_missing_and_range_ignoring_http_servers(cli: Cli, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    torch.save({"w": torch.zeros(8 * 1024 * 1024)}, www / "big.pt")  # 32 MiB
    (www / "forbidden").mkdir()
    (www / "forbidden" / "m.pt").write_bytes(b"never served")
    ranged = HttpServer(www, forbidden="forbidden/").start()
    whole = HttpServer(www, honour_range=False).start()
    try:
        one_line(cli("inspect", ranged.url + "/forbidden/m.pt"), "/forbidden/m.pt", "HTTP 403")
        one_line(cli("inspect", ranged.url.replace("//", "//bob:pw@") + "/nope.pt"), "HTTP 404")
        err = one_line(cli("inspect", whole.url + "/big.pt"), whole.url + "/big.pt", "ignores Range")
        assert "bob" not in err
        # refused at the first answer: the client closed the connection, the 32 MiB were not all sent
        assert whole.served.body_bytes_sent < (www / "big.pt").stat().st_size
    finally:
        ranged.stop()
        whole.stop()


def test_output_to_a_read_only_scheme_is_refused(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=checkpoint(tmp_path / "m.pt"))
    one_line(cli("upgrade", f"s3://{bucket}/m.pt", "-o", "https://127.0.0.1:9/out.pt", "--from", "c1"),
             "https://127.0.0.1:9/out.pt: writing to https:// is not supported")
    assert list(objects(s3, bucket)) == ["m.pt"]


def test_commands_that_read_every_byte_name_a_missing_object(cli: Cli, bucket: str) -> None:
    url = f"s3://{bucket}/m.pt"
    for args in (["stamp", url], ["compact", url], ["convert", url, "out.pt", "--to", "torch"], ["sanitize", url]):
        one_line(cli(*args), f"{url}: cannot read: no such object")
    verify = cli("verify", url)  # a file that could not be verified is a failed check, as a bad digest is
    assert verify.returncode == 1 and verify.stderr == f"{url}: FAILED: {url}: cannot read: no such object\n"


def racing_chain(tmp_path: Path, bucket: str, key: str, action: str,
                 then: str = "ckpt.rename('a', 'renamed')") -> Path:
    """c1 -> c2, whose migration does ``action`` to the object behind ckptmigrate's back (another
    writer, at the worst moment: after the read, before the write), then ``then``."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "c1.py").write_text('"""c1."""\nrevision = "c1"\ndown_revision = None\n\n\n'
                                    "def upgrade(ckpt):\n    pass\n")
    (versions / "c2.py").write_text(
        f'"""c2."""\nimport boto3\n\nrevision = "c2"\ndown_revision = "c1"\n\n\n'
        f"def upgrade(ckpt):\n    s3 = boto3.client('s3')\n    {action.format(bucket=bucket, key=key)}\n"
        f"    {then}\n")
    return versions.parent


@pytest.mark.parametrize("numel", [1024, 2 * 1024 * 1024], ids=["one-put", "multipart"])
def test_the_loser_of_two_writers_writes_nothing(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path,
                                                 numel: int) -> None:
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=checkpoint(tmp_path / "m.pt", numel))
    theirs = checkpoint(tmp_path / "theirs.pt", numel, seed=1)  # as long as ours: no read comes back short
    body = f"open({str(tmp_path / 'theirs.pt')!r}, 'rb').read()"
    migrations = racing_chain(tmp_path, bucket, "m.pt",
                              f"s3.put_object(Bucket='{{bucket}}', Key='{{key}}', Body={body})")
    proc = cli("upgrade", f"s3://{bucket}/m.pt", "--from", "c1", "--migrations", migrations, "--json")
    one_line(proc, f"s3://{bucket}/m.pt", "changed since it was read", "nothing was written")
    error = json.loads(proc.stdout)["error"]
    head = s3.client().head_object(Bucket=bucket, Key="m.pt")
    assert (error["type"], error["url"], error["found"]) == ("ObjectChanged", f"s3://{bucket}/m.pt", head["ETag"])
    assert error["expected"] != error["found"]
    assert objects(s3, bucket) == {"m.pt": theirs}  # their object stands, no backup is left over
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert list(torch.load(io.BytesIO(theirs), weights_only=True)) == ["a", "b", "head.bias"]


def test_an_object_deleted_mid_run(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=checkpoint(tmp_path / "m.pt", 64 * 1024))
    migrations = racing_chain(tmp_path, bucket, "m.pt", "s3.delete_object(Bucket='{bucket}', Key='{key}')",
                              "ckpt.map('b', lambda t: t * 2)")  # computed: the tensors are read after the delete
    one_line(cli("upgrade", f"s3://{bucket}/m.pt", "--from", "c1", "--migrations", migrations),
             f"s3://{bucket}/m.pt")
    assert objects(s3, bucket) == {}
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
