"""User story: "Our model was refactored and every checkpoint of every run must follow: I point
ckptmigrate at our Ray cluster and it upgrades them all, even when a worker dies."

One real Ray cluster for the module (``ray start --head`` on 127.0.0.1 with 2 CPUs, in its own
session, killed as a process group at the end, whatever happened), driven through the real CLI as
a subprocess by its Ray Client address (``--executor ray://127.0.0.1:PORT``) or by RAY_ADDRESS
(``--executor ray``). A worker SIGKILLed mid-migration is retried and every file lands at the
target exactly once, whole; a bad file fails alone without retries; a re-run with the journal
skips what is done; stamping and verifying a fleet run on the cluster too.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.fleet_chain import applications, arm_kill, make_chain, make_fleet, revision_of
from tests.raycluster import QUIET, Cluster, ray_head

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with ray_head() as head:
        yield head


def journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_fleet_upgraded_on_the_cluster_lands_once_although_a_worker_is_killed(tmp_path: Path, cli: Cli,
                                                                               cluster: Cluster) -> None:
    chain = make_chain(tmp_path)
    fleet = make_fleet(tmp_path / "runs", 8)
    marker = arm_kill(chain)

    proc = cli("upgrade", "runs", "--from", "c1", "--migrations", chain, "--executor", cluster.executor,
               "--journal", "j.jsonl", env=QUIET)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()  # a Ray worker claimed the marker and killed itself
    assert proc.stdout.splitlines()[-1] == "8 files: 8 written, 0 unchanged, 0 failed"
    for path, a in fleet.items():
        assert revision_of(path) == "c3"
        assert applications(path, "c2") == 1 and applications(path, "c3") == 1  # exactly once
        loaded = torch.load(path, weights_only=True)  # whole: torch reads it
        assert set(loaded) == {"c", "other"} and torch.equal(loaded["c"], a)
        assert torch.equal(torch.load(path.with_name(path.name + ".bak"), weights_only=True)["a"], a)

    records = journal_lines(tmp_path / "j.jsonl")
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in fleet)
    [retried] = [r for r in records if r["retried"]]
    assert retried["attempt"] == 2 and retried["result"] == "written"
    assert retried["retried"][0].startswith("WorkerCrashedError: The worker died")
    assert {r["executor"] for r in records} == {cluster.executor}
    assert os.getpid() not in {r["pid"] for r in records} and all(r["host"] for r in records)


def test_a_bad_file_fails_alone_and_the_re_run_does_only_what_is_left(tmp_path: Path, cli: Cli,
                                                                        cluster: Cluster) -> None:
    chain = make_chain(tmp_path)
    fleet = sorted(make_fleet(tmp_path / "runs", 4))
    broken = tmp_path / "runs" / "run002.pt"
    broken.write_bytes(b"not a checkpoint at all")
    run = ("upgrade", "runs", "--from", "c1", "--migrations", chain, "--executor", cluster.executor,
           "--retries", "3", "--journal", "j.jsonl")

    first = cli(*run, env=QUIET)
    assert first.returncode == 2
    assert first.stdout.splitlines()[-1] == "4 files: 3 written, 0 unchanged, 1 failed"
    [line] = [x for x in first.stderr.splitlines() if "FAILED" in x]
    assert line.startswith(f"{broken}: FAILED: ") and "Traceback" not in first.stderr
    [bad] = [r for r in journal_lines(tmp_path / "j.jsonl") if r["result"] == "failed"]
    assert bad["attempt"] == 1 and bad["retried"] == []  # bad input is deterministic: not retried

    torch.save({"a": torch.zeros(2, 3), "other": torch.zeros(2)}, broken)  # the user fixes the file
    second = cli(*run, env=QUIET)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == "4 files: 1 written, 0 unchanged, 3 skipped (journal), 0 failed"
    assert all(revision_of(p) == "c3" and applications(p, "c2") == 1 for p in fleet)

    down = cli("downgrade", "runs", "--to", "c1", "--migrations", chain, "--executor", "ray", "-j", "1",
               "--journal", "j.jsonl", env=cluster.env)
    assert down.returncode == 0, down.stderr
    assert all(revision_of(p) == "c1" for p in fleet)
    assert [r["command"] for r in journal_lines(tmp_path / "j.jsonl")[-4:]] == ["downgrade"] * 4


def test_a_fleet_stamped_and_verified_on_the_cluster_names_the_one_file_tampered_with(
        tmp_path: Path, cli: Cli, cluster: Cluster) -> None:
    fleet = sorted(make_fleet(tmp_path / "runs", 4))
    stamp = cli("stamp", "runs", "--digest", "--tag", "team=vision", "--executor", "ray", env=cluster.env)
    assert stamp.returncode == 0, stamp.stderr
    assert stamp.stdout.splitlines()[-1] == "4 files: 4 stamped, 0 failed"

    ok = cli("verify", "runs", "--executor", cluster.executor, env=QUIET)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "4 files: 4 ok, 0 failed"

    victim = fleet[1]
    data = bytearray(victim.read_bytes())
    offset = data.find(torch.arange(6.0).add(1).numpy().tobytes())  # run001's tensor `a`, in the file
    assert offset > 0
    data[offset] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = cli("verify", "runs", "--executor", cluster.executor, "--json", env=QUIET)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert [Path(f["path"]).name for f in report["files"] if not f["ok"]] == [victim.name]
    assert report["checked"] == 4 and report["failed"] == 1
