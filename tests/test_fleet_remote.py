"""User story: "Our checkpoints live in a bucket. After a refactor I upgrade every one of them,
several at a time, and when the batch is interrupted I re-run it without redoing what is done."

Real moto S3 server on 127.0.0.1, real subprocess CLI, local worker processes (``-j 2``): every
object under the prefix is upgraded in its own worker (its backup beside it), the journal records
the URLs, and a re-run with the journal skips each object only after reading its envelope from the
bucket — an object put back at the old revision behind the journal's back is upgraded again. A
verified bucket is skipped on a re-run by each object's size and ETag, until an object's bytes change.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.objectstores import S3Server, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


def saved(i: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"blocks.0.weight": torch.full((8,), float(i)), "head.bias": torch.arange(2.0)}, buf)
    return buf.getvalue()


def test_a_bucket_upgraded_by_a_fleet_and_rerun_from_its_journal(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", "ckpt.rename('head.bias', 'out.bias')")):
        (versions / f"{rev}.py").write_text(f"revision = {rev!r}\ndown_revision = {down!r}\n\n\n"
                                            f"def upgrade(ckpt):\n    {code}\n")
    client = s3.client()
    client.create_bucket(Bucket="fleet")
    originals = {f"runs/{i}.pt": saved(i) for i in range(4)}
    for key, body in originals.items():
        client.put_object(Bucket="fleet", Key=key, Body=body)
    journal = tmp_path / "upgrade.jsonl"
    args = ("upgrade", "s3://fleet/runs/", "--from", "c1", "--migrations", tmp_path / "chain",
            "--journal", journal, "-j", "2")

    first = cli(*args, check=True)

    assert "4 files: 4 written" in first.stdout, first.stdout
    for key, body in originals.items():
        assert client.get_object(Bucket="fleet", Key=f"{key}.bak")["Body"].read() == body
        upgraded = torch.load(io.BytesIO(client.get_object(Bucket="fleet", Key=key)["Body"].read()))
        assert set(upgraded) == {"blocks.0.weight", "out.bias"}
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert sorted(r["path"] for r in records) == [f"s3://fleet/{k}" for k in sorted(originals)]
    assert {(r["result"], r["before"], r["after"]) for r in records} == {("written", "c1", "c2")}

    client.put_object(Bucket="fleet", Key="runs/2.pt", Body=originals["runs/2.pt"])  # restored behind its back
    second = cli(*args, check=True)

    assert "3 skipped (journal)" in second.stdout and "1 written" in second.stdout, second.stdout
    assert "s3://fleet/runs/2.pt: upgrade c1 -> c2" in second.stdout, second.stdout
    again = torch.load(io.BytesIO(client.get_object(Bucket="fleet", Key="runs/2.pt")["Body"].read()))
    assert set(again) == {"blocks.0.weight", "out.bias"}


def test_a_verified_bucket_is_skipped_on_re_run_until_an_object_changes(cli: Cli, s3: S3Server,
                                                                       tmp_path: Path) -> None:
    client = s3.client()
    client.create_bucket(Bucket="verified")
    for i in range(3):
        client.put_object(Bucket="verified", Key=f"runs/{i}.pt", Body=saved(i))
    stamped = cli("stamp", "s3://verified/runs/", "--digest", "-j", "1", check=True)
    assert stamped.stdout.endswith("3 stamped, 0 failed\n")
    journal = tmp_path / "verify.jsonl"
    first = cli("verify", "s3://verified/runs/", "-j", "1", "--journal", journal, check=True)
    assert first.stdout.splitlines()[-1] == "3 files: 3 ok, 0 failed"
    second = cli("verify", "s3://verified/runs/", "-j", "1", "--journal", journal, check=True)
    assert second.stdout.splitlines()[-1] == "3 files: 0 ok, 3 skipped (journal), 0 failed"
    # one object's tensor bytes changed behind the journal's back, its size the same: verified again
    body = bytearray(client.get_object(Bucket="verified", Key="runs/1.pt")["Body"].read())
    at = bytes(body).find(torch.full((8,), 1.0).numpy().tobytes())
    body[at] ^= 0xFF
    client.put_object(Bucket="verified", Key="runs/1.pt", Body=bytes(body))
    third = cli("verify", "s3://verified/runs/", "-j", "1", "--journal", journal)
    assert third.returncode == 1
    assert third.stdout.splitlines()[-1] == "3 files: 0 ok, 2 skipped (journal), 1 failed", third.stdout
    assert third.stderr.startswith("s3://verified/runs/1.pt: FAILED"), third.stderr
