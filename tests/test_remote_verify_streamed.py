"""User story: "Our release job verifies and stamps checkpoints where they live, in the bucket, on a
runner whose disk could not hold them: each byte is read once, nothing is written to local disk,
and the verdict is the one a local copy would get."

Against a real moto S3 server on 127.0.0.1 (bytes counted by the server), the CLI as a subprocess.
``verify`` runs under strace, which records every file the process opens for writing: there must be
none. The digests (per tensor, payload, overall) are compared with those computed on a local copy
of the same bytes, so a streamed hash that skipped, repeated or reordered a byte cannot pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ckptmigrate import api
from tests.objectstores import S3Server, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]
BIG = 3 * 1024 * 1024 // 4  # float32 elements in 3 MiB: past what opening the object fetches around headers


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


def release_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Small tensors, two large ones, a tied weight and optimizer state (tensors outside the state dict)."""
    torch.manual_seed(11)
    model = {f"blocks.{i}.weight": torch.randn(300) for i in range(64)}
    model["embed.weight"] = torch.randn(BIG)
    model["lm_head.weight"] = model["embed.weight"]
    model["proj.weight"] = torch.randn(BIG)
    optim = {"state": {0: {"exp_avg": torch.randn(512), "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"model": model, "optimizer": optim}, path)
    return model


def upload(s3: S3Server, bucket: str, key: str, path: Path) -> str:
    s3.client().put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return f"s3://{bucket}/{key}"


def files_opened_for_writing(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if re.search(r"O_CREAT|O_TMPFILE|\bcreat\(", line)]


def test_verify_reads_each_byte_once_and_writes_nothing_to_disk(s3: S3Server, tmp_path: Path) -> None:
    assert shutil.which("strace"), "scripts/setup.sh installs strace"
    bucket = s3.new_bucket("verify", tmp_path)
    local = tmp_path / "m.pt"
    release_checkpoint(local)
    api.stamp(local, digest=True)
    url = upload(s3, bucket, "m.pt", local)
    s3.served.reset()

    log = tmp_path / "opens.log"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,creat", "-o", str(log),
                           sys.executable, "-m", "ckptmigrate", "verify", url, "--json"],
                          env={**os.environ, **s3.env}, capture_output=True, text=True, cwd=tmp_path, timeout=600)

    assert proc.returncode == 0, proc.stderr
    (verdict,) = json.loads(proc.stdout)["files"]
    assert verdict["ok"] and verdict["path"] == url
    assert verdict["digest"] == api.verify(local).digest
    assert files_opened_for_writing(log) == [], files_opened_for_writing(log)
    size = local.stat().st_size
    assert 2 * BIG * 4 < s3.served.body_bytes_sent <= size + (256 << 10), (s3.served.body_bytes_sent, size)


def test_a_changed_byte_is_found_and_named_as_on_a_local_copy(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket("tamper", tmp_path)
    local = tmp_path / "m.pt"
    model = release_checkpoint(local)
    api.stamp(local, digest=True)
    raw = bytearray(local.read_bytes())
    for key, at in (("proj.weight", BIG // 2), ("blocks.7.weight", 5)):  # a large tensor and a small one
        needle = model[key].numpy().tobytes()[at * 4:at * 4 + 16]
        raw[bytes(raw).index(needle)] ^= 0x01
    local.write_bytes(raw)
    url = upload(s3, bucket, "m.pt", local)

    proc = cli("verify", url, "--json", env=s3.env)

    assert proc.returncode == 1, proc.stdout + proc.stderr
    (verdict,) = json.loads(proc.stdout)["files"]
    here = api.verify(local)
    assert sorted(verdict["changed"]) == sorted(here.changed) == ["blocks.7.weight", "proj.weight"]
    assert verdict["digest"] == here.digest and not verdict["ok"]


def test_stamp_with_a_digest_in_place_hashes_the_object_as_it_streams(cli: Cli, s3: S3Server,
                                                                       tmp_path: Path) -> None:
    bucket = s3.new_bucket("stamp", tmp_path)
    local = tmp_path / "m.pt"
    release_checkpoint(local)
    url = upload(s3, bucket, "m.pt", local)
    s3.served.reset()

    proc = cli("stamp", url, "--digest", env=s3.env)

    assert proc.returncode == 0, proc.stderr
    # the object once, plus its metadata (directory, data.pkl) read again around the write: a
    # tensor read twice would be 3 MiB more
    assert s3.served.body_bytes_sent <= local.stat().st_size + (1 << 20), s3.served.body_bytes_sent
    stamped = tmp_path / "stamped.pt"
    stamped.write_bytes(s3.client().get_object(Bucket=bucket, Key="m.pt")["Body"].read())
    recorded = api.inspect(stamped)["envelope"]["digest"]
    api.stamp(local, digest=True)  # the same bytes stamped on disk record the same digests
    on_disk = api.inspect(local)["envelope"]["digest"]
    assert (recorded["tensors"], recorded["payload"], recorded["overall"]) == (
        on_disk["tensors"], on_disk["payload"], on_disk["overall"])
    assert api.verify(stamped).ok
