"""User story: "Our training pipeline is Python: it migrates a fleet of checkpoints — files on disk or
objects in a bucket — on local processes or our Ray cluster, and acts on each file's result."

``run_fleet`` is the CLI's fleet as a function: one result per file in the order named, a file's
failure its result (never raised), an input broken before any file (no such chain) raised. In
process on real files with local worker processes, one of them killed mid-migration; on a real Ray
cluster (``ray start --head`` on 127.0.0.1) joined through Ray Client from this process; and a
fleet of objects in a real moto bucket, and one in a real GCS emulator, upgraded by Ray workers through
the CLI: the cluster's nodes have their own credentials, and the driver's endpoint reaches them
through the task's runtime_env.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ckptmigrate.errors import BadInput
from ckptmigrate.fleet import run_fleet
from tests.fleet_chain import applications, arm_kill, make_chain, make_fleet, revision_of
from tests.objectstores import DUMMY_CREDENTIALS, running_gcs, running_s3
from tests.raycluster import QUIET, Cluster, ray_head

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The nodes' own credentials (a role, on a real cluster) but not where the bucket is."""
    with ray_head(env=DUMMY_CREDENTIALS) as head:
        yield head


def journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_fleet_run_from_python_returns_each_files_result(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    fleet = make_fleet(tmp_path / "runs", 5)
    broken = tmp_path / "runs" / "run003.pt"
    broken.write_bytes(b"not a checkpoint")
    arm_kill(chain)
    journal = tmp_path / "j.jsonl"

    results = run_fleet("upgrade", tmp_path / "runs", executor="local", jobs=2, retries=3, journal=journal,
                        migrations=str(chain), from_rev="c1")

    assert [r.path for r in results] == [str(p) for p in sorted(fleet)]
    by_path = {r.path: r for r in results}
    failed = by_path.pop(str(broken))
    assert failed.result == "failed" and failed.error is not None
    assert failed.error["message"].startswith(f"{broken}: not a checkpoint")
    assert {(r.result, r.before, r.after) for r in by_path.values()} == {("written", "c1", "c3")}
    assert max(r.attempt for r in results) > 1  # the killed worker's task ran again
    for path in by_path:
        assert revision_of(Path(path)) == "c3" and applications(Path(path), "c2") == 1  # exactly once
    assert {r.pid for r in results} - {os.getpid()}  # workers, not this process
    assert {(line["path"], line["result"]) for line in journal_lines(journal)} == {(r.path, r.result) for r in results}

    again = run_fleet("upgrade", tmp_path / "runs", journal=journal, migrations=str(chain), from_rev="c1")
    assert [r.result for r in again] == ["skipped", "skipped", "skipped", "failed", "skipped"]
    with pytest.raises(BadInput, match="no-such-chain"):  # before any file: one error, not one per file
        run_fleet("upgrade", tmp_path / "runs", migrations=str(tmp_path / "no-such-chain"))


def test_a_fleet_on_ray_from_python_upgrades_and_verifies(tmp_path: Path, cluster: Cluster) -> None:
    chain = make_chain(tmp_path)
    fleet = sorted(make_fleet(tmp_path / "runs", 4))
    upgraded = run_fleet("upgrade", [str(p) for p in fleet], executor=cluster.executor, migrations=str(chain),
                         from_rev="c1", backup=False)
    assert [(r.result, r.after) for r in upgraded] == [("written", "c3")] * 4
    assert os.getpid() not in {r.pid for r in upgraded}
    assert [r.detail["row"]["to"] for r in upgraded] == ["c3"] * 4
    stamped = run_fleet("stamp", tmp_path / "runs", jobs=2, digest=True, tags={"fleet": "ray"})  # local processes
    assert [r.result for r in stamped] == ["stamped"] * 4
    verified = run_fleet("verify", tmp_path / "runs", executor=cluster.executor)
    assert [r.result for r in verified] == ["ok"] * 4
    assert all(r.detail.ok and r.detail.envelope["tags"] == {"fleet": "ray"} for r in verified)


def test_a_bucket_upgraded_by_ray_workers(tmp_path: Path, cli: Cli, cluster: Cluster) -> None:
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", "ckpt.rename('head.bias', 'out.bias')")):
        (versions / f"{rev}.py").write_text(f"revision = {rev!r}\ndown_revision = {down!r}\n\n\n"
                                            f"def upgrade(ckpt):\n    {code}\n")
    with running_s3() as s3:  # started after the cluster: its nodes do not know the endpoint
        client = s3.client()
        client.create_bucket(Bucket="ray-fleet")
        originals = {}
        for i in range(4):
            buf = io.BytesIO()
            torch.save({"w": torch.full((4,), float(i)), "head.bias": torch.zeros(2)}, buf)
            originals[f"runs/{i}.pt"] = buf.getvalue()
            client.put_object(Bucket="ray-fleet", Key=f"runs/{i}.pt", Body=buf.getvalue())
        proc = cli("upgrade", "s3://ray-fleet/runs/", "--from", "c1", "--migrations", tmp_path / "chain",
                   "--executor", cluster.executor, "--journal", tmp_path / "j.jsonl", "--json", env=QUIET)
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        assert [(r["path"], r["written"], r["backup"]) for r in rows] == [
            (f"s3://ray-fleet/{k}", True, f"s3://ray-fleet/{k}.bak") for k in sorted(originals)]
        for key, body in originals.items():
            new = torch.load(io.BytesIO(client.get_object(Bucket="ray-fleet", Key=key)["Body"].read()))
            assert set(new) == {"w", "out.bias"}
            assert client.get_object(Bucket="ray-fleet", Key=f"{key}.bak")["Body"].read() == body
        records = journal_lines(tmp_path / "j.jsonl")
        assert {r["executor"] for r in records} == {cluster.executor} and len(records) == 4
        assert all(r["pid"] != os.getpid() for r in records)


def test_a_gcs_bucket_upgraded_by_ray_workers(tmp_path: Path, cli: Cli, cluster: Cluster) -> None:
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", "ckpt.rename('head.bias', 'out.bias')")):
        (versions / f"{rev}.py").write_text(f"revision = {rev!r}\ndown_revision = {down!r}\n\n\n"
                                            f"def upgrade(ckpt):\n    {code}\n")
    with running_gcs("ray-gcs") as (env, bucket):  # started after the cluster: its nodes do not know the emulator
        originals = {}
        for i in range(3):
            buf = io.BytesIO()
            torch.save({"w": torch.full((4,), float(i)), "head.bias": torch.zeros(2)}, buf)
            originals[f"runs/{i}.pt"] = buf.getvalue()
            bucket.blob(f"runs/{i}.pt").upload_from_string(buf.getvalue())
        proc = cli("upgrade", "gs://ray-gcs/runs/", "--from", "c1", "--migrations", tmp_path / "chain",
                   "--executor", cluster.executor, "--json", env={**QUIET, **env})
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        assert [(r["path"], r["written"]) for r in rows] == [(f"gs://ray-gcs/{k}", True) for k in sorted(originals)]
        for key, body in originals.items():
            assert set(torch.load(io.BytesIO(bucket.blob(key).download_as_bytes()))) == {"w", "out.bias"}
            assert bucket.blob(f"{key}.bak").download_as_bytes() == body
