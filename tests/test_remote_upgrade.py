"""User story: "I upgrade the checkpoints in my bucket; a rename moves kilobytes, not the checkpoint."

Against a real moto S3 server on 127.0.0.1 (through s3fs/botocore, as a user's machine talks to S3),
``ckptmigrate upgrade s3://...`` of a rename-only chain assembles the new object server-side from
the old one's records (UploadPartCopy) and a new tail: the server counts a few KiB received and
sent for a 12 MiB checkpoint. The new object loads in torch with the new keys and the same
tensors; the backup ``KEY.bak`` is the old object byte for byte; no multipart upload stays open.
An object under S3's 5 MiB part minimum is rewritten whole by one conditional put; a migration
that computes tensors is streamed (tests/test_remote_streamed_migration.py); safetensors stay
safetensors; downgrade walks back.
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
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from tests.objectstores import S3Server, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server, tmp_path: Path) -> str:
    return s3.new_bucket("up", tmp_path)


def chain(tmp_path: Path, body: str) -> Path:
    """c1 (base) -> c2 (``body``) -> c3 (a rename back and forth: still metadata only)."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", body),
                            ("c3", "c2", "ckpt.rename('head.bias', 'out.bias')")):
        (versions / f"{rev}.py").write_text(f'"""{rev}."""\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
                                            f"def upgrade(ckpt):\n    {code}\n")
    return versions.parent


def state(tensors: int, numel: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    out = {f"blocks.{i}.weight": torch.randn(numel) for i in range(tensors)}
    out["head.bias"] = torch.arange(4.0)
    return out


def put(s3: S3Server, bucket: str, key: str, obj: dict[str, torch.Tensor], tmp_path: Path) -> bytes:
    local = tmp_path / "upload.pt"
    torch.save(obj, local)
    s3.client().upload_file(str(local), bucket, key)
    return local.read_bytes()


def get(s3: S3Server, bucket: str, key: str) -> bytes:
    return bytes(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def open_uploads(s3: S3Server, bucket: str) -> list[Any]:
    return list(s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_a_rename_of_a_12_mib_object_moves_kilobytes(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    original = state(12, 256 * 1024)  # 12 tensors of 1 MiB
    old_bytes = put(s3, bucket, "runs/model.pt", original, tmp_path)
    migrations = chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')")
    s3.served.reset()
    proc = cli("upgrade", f"s3://{bucket}/runs/model.pt", "--from", "c1", "--migrations", migrations, "--json")
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    served_out, served_in = s3.served.body_bytes_sent, s3.served.body_bytes_received
    assert outcome["written"] and outcome["to"] == "c3"
    assert outcome["backup"] == f"s3://{bucket}/runs/model.pt.bak"
    # what crossed the wire, counted by the server: directory, headers, data.pkl, the new tail
    assert served_out + served_in < 512 * 1024 < len(old_bytes) / 20, (served_out, served_in)
    # the new tail, and the XML of the requests (CompleteMultipartUpload lists the parts)
    assert outcome["transfer"]["bytes_sent"] <= served_in < outcome["transfer"]["bytes_sent"] + 4096
    assert outcome["transfer"]["bytes_copied_server_side"] >= len(old_bytes) - 64 * 1024
    new = torch.load(io.BytesIO(get(s3, bucket, "runs/model.pt")), weights_only=True)
    want = dict(original)
    want["stem.weight"] = want.pop("blocks.0.weight")
    want["out.bias"] = want.pop("head.bias")
    assert set(new) == set(want)
    assert all(torch.equal(new[k], want[k]) for k in want)
    assert get(s3, bucket, "runs/model.pt.bak") == old_bytes
    assert open_uploads(s3, bucket) == []
    current = cli("current", f"s3://{bucket}/runs/model.pt")
    assert current.stdout.strip() == "c3", current.stderr
    # and back down: the original keys again, still without moving the tensors
    s3.served.reset()
    down = cli("downgrade", f"s3://{bucket}/runs/model.pt", "--to", "c1", "--migrations", migrations, "--no-backup")
    assert down.returncode == 0, down.stderr
    assert s3.served.body_bytes_sent + s3.served.body_bytes_received < 512 * 1024
    back = torch.load(io.BytesIO(get(s3, bucket, "runs/model.pt")), weights_only=True)
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


def test_a_small_object_is_rewritten_whole_in_one_put(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    original = state(4, 1024)
    put(s3, bucket, "small.pt", original, tmp_path)
    migrations = chain(tmp_path, "ckpt.rename('blocks.1.weight', 'b1.weight')")
    proc = cli("upgrade", f"s3://{bucket}/small.pt", "--from", "c1", "--migrations", migrations)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"s3://{bucket}/small.pt: upgrade c1 -> c2 -> c3 "
                                   f"(backup: s3://{bucket}/small.pt.bak)")
    new = torch.load(io.BytesIO(get(s3, bucket, "small.pt")), weights_only=True)
    assert torch.equal(new["b1.weight"], original["blocks.1.weight"]) and "blocks.1.weight" not in new
    assert open_uploads(s3, bucket) == []


def test_a_migration_that_computes_tensors_goes_in_parts(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    original = state(3, 1024 * 1024)  # 3 tensors of 4 MiB: uploaded in 5 MiB parts
    put(s3, bucket, "big.pt", original, tmp_path)
    migrations = chain(tmp_path, "ckpt.map('blocks.2.weight', lambda t: t * 2)")
    s3.served.reset()
    proc = cli("upgrade", f"s3://{bucket}/big.pt", "--from", "c1", "--migrations", migrations, "--json",
               env={"CKPTMIGRATE_S3_PART_SIZE": str(5 << 20)})
    assert proc.returncode == 0, proc.stderr
    parts = [line for line in s3.served.log if line.startswith("PUT") and "partNumber=" in line]
    assert len(parts) == 3, s3.served.log
    new = torch.load(io.BytesIO(get(s3, bucket, "big.pt")), weights_only=True)
    assert torch.equal(new["blocks.2.weight"], original["blocks.2.weight"] * 2)
    assert torch.equal(new["blocks.0.weight"], original["blocks.0.weight"])
    assert "out.bias" in new
    assert open_uploads(s3, bucket) == []


def test_safetensors_in_a_bucket_stay_safetensors(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    original = state(3, 1024)
    save_file(original, str(tmp_path / "m.safetensors"))
    s3.client().upload_file(str(tmp_path / "m.safetensors"), bucket, "m.safetensors")
    migrations = chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')")
    proc = cli("upgrade", f"s3://{bucket}/m.safetensors", "--from", "c1", "--migrations", migrations)
    assert proc.returncode == 0, proc.stderr
    new = load_safetensors(get(s3, bucket, "m.safetensors"))
    assert torch.equal(new["stem.weight"], original["blocks.0.weight"]) and "out.bias" in new
    assert cli("current", f"s3://{bucket}/m.safetensors").stdout.strip() == "c3"


def test_dry_run_writes_nothing(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    old_bytes = put(s3, bucket, "m.pt", state(2, 1024), tmp_path)
    migrations = chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')")
    proc = cli("upgrade", f"s3://{bucket}/m.pt", "--from", "c1", "--migrations", migrations, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would upgrade c1 -> c2 -> c3" in proc.stdout
    assert get(s3, bucket, "m.pt") == old_bytes
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["m.pt"]


def test_in_a_versioned_bucket_the_backup_is_the_previous_version(cli: Cli, s3: S3Server, bucket: str,
                                                                   tmp_path: Path) -> None:
    s3.client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    old_bytes = put(s3, bucket, "m.pt", state(6, 256 * 1024), tmp_path)  # 6 MiB: assembled by parts
    version = s3.client().head_object(Bucket=bucket, Key="m.pt")["VersionId"]
    migrations = chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')")
    proc = cli("upgrade", f"s3://{bucket}/m.pt", "--from", "c1", "--migrations", migrations, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backup"] == f"s3://{bucket}/m.pt?versionId={version}"
    kept = s3.client().get_object(Bucket=bucket, Key="m.pt", VersionId=version)["Body"].read()
    assert kept == old_bytes
    assert [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]] == ["m.pt"]
    assert "stem.weight" in torch.load(io.BytesIO(get(s3, bucket, "m.pt")), weights_only=True)
