"""User story: "I upgrade a few hundred checkpoints on my workstation, several at a time, and can
stop and re-run the batch without redoing what is done."

As subprocesses on real files, with local worker processes (``-j 2``): a worker that dies
mid-migration is re-run and every file ends at the target exactly once; a file with bad input is
that file's failure (exit 2, the others done, not retried); the journal records one line per file
and a re-run skips what it proves done, but not a file whose envelope contradicts its line; and
``--executor ray`` without Ray installed is one line naming the extra.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from tests.fleet_chain import applications, arm_kill, make_chain, make_fleet, revision_of

Cli = Callable[..., subprocess.CompletedProcess[str]]


def journal_lines(path: Path) -> list[dict]:
    """The journal's records; a torn last line (as a crash leaves it) is no record."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_a_worker_killed_mid_migration_is_re_run_and_every_file_ends_at_head_once(tmp_path: Path, cli: Cli) -> None:
    chain = make_chain(tmp_path)
    fleet = make_fleet(tmp_path / "runs", 6)
    marker = arm_kill(chain)

    proc = cli("upgrade", "runs", "--from", "c1", "--migrations", chain, "-j", "2", "--journal", "j.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists() and (chain / "kill-once.taken").exists()  # a worker really died
    assert proc.stdout.splitlines()[-1] == "6 files: 6 written, 0 unchanged, 0 failed"
    for path, a in fleet.items():
        assert revision_of(path) == "c3"
        assert applications(path, "c2") == 1 and applications(path, "c3") == 1
        loaded = torch.load(path, weights_only=True)
        assert set(loaded) == {"c", "other"} and torch.equal(loaded["c"], a)

    records = journal_lines(tmp_path / "j.jsonl")
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in fleet)
    retried = [r for r in records if r["retried"]]
    assert retried and all(r["attempt"] == len(r["retried"]) + 1 for r in retried)
    assert all("worker process died" in reason for r in retried for reason in r["retried"])
    assert {r["result"] for r in records} == {"written"}


def test_a_bad_file_fails_alone_and_is_not_retried(tmp_path: Path, cli: Cli) -> None:
    chain = make_chain(tmp_path)
    fleet = make_fleet(tmp_path / "runs", 3)
    (tmp_path / "runs" / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")

    proc = cli("upgrade", "runs", "--from", "c1", "--migrations", chain, "-j", "2", "--retries", "3",
               "--journal", "j.jsonl")
    assert proc.returncode == 2
    assert proc.stdout.splitlines()[-1] == "4 files: 3 written, 0 unchanged, 1 failed"
    [line] = [x for x in proc.stderr.splitlines() if "FAILED" in x]
    assert line.startswith(f"{Path('runs') / 'broken.pt'}: FAILED: ") and "Traceback" not in proc.stderr
    assert all(revision_of(p) == "c3" for p in fleet)
    [bad] = [r for r in journal_lines(tmp_path / "j.jsonl") if r["result"] == "failed"]
    assert bad["path"] == str(tmp_path / "runs" / "broken.pt")
    assert bad["attempt"] == 1 and bad["retried"] == [] and bad["error"]["exit_code"] == 2


def test_a_re_run_skips_what_the_journal_proves_done_and_redoes_what_it_only_claims(tmp_path: Path,
                                                                                     cli: Cli) -> None:
    chain = make_chain(tmp_path)
    fleet = sorted(make_fleet(tmp_path / "runs", 4))
    journal = tmp_path / "j.jsonl"
    first = cli("upgrade", *fleet[:3], "--from", "c1", "--migrations", chain, "-j", "2", "--journal", journal)
    assert first.returncode == 0, first.stderr
    assert len(journal_lines(journal)) == 3

    # The journal lies about the fourth file (never upgraded) and about the third (put back at c1 since).
    lie = {**journal_lines(journal)[0], "path": str(fleet[3])}
    with journal.open("a") as fh:
        fh.write(json.dumps(lie) + "\n" + '{"path": "torn')
    cli("downgrade", fleet[2], "--to", "c1", "--migrations", chain, "--no-backup", check=True)

    again = cli("upgrade", *fleet, "--from", "c1", "--migrations", chain, "-j", "2", "--journal", journal)
    assert again.returncode == 0, again.stderr
    out = again.stdout.splitlines()
    assert out[-1] == "4 files: 2 written, 0 unchanged, 2 skipped (journal), 0 failed"
    assert [line.split(":")[0] for line in out if "skipped" in line and "files" not in line] == \
        [str(fleet[0]), str(fleet[1])]
    assert all(revision_of(p) == "c3" for p in fleet)
    assert applications(fleet[0], "c2") == 1  # not re-applied
    assert {r["path"] for r in journal_lines(journal)[-2:]} == {str(fleet[2]), str(fleet[3])}


def test_the_ray_executor_without_ray_installed_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    make_fleet(tmp_path, 2)
    code = ("import sys; sys.modules['ray'] = None; from ckptmigrate.cli import main; "
            "sys.argv = ['ckptmigrate', 'verify', '.', '--executor', 'ray']; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ckptmigrate: error: --executor ray needs Ray: pip install 'ckptmigrate[ray]'"


def test_a_verify_re_run_skips_files_unchanged_since_and_checks_one_edited_since(tmp_path: Path, cli: Cli) -> None:
    fleet = sorted(make_fleet(tmp_path / "runs", 3))
    cli("stamp", "runs", "--digest", "-j", "2", check=True)
    first = cli("verify", "runs", "-j", "2", "--journal", "v.jsonl")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-1] == "3 files: 3 ok, 0 failed"

    victim = fleet[2]
    data = bytearray(victim.read_bytes())
    offset = data.find(torch.arange(6.0).add(2).numpy().tobytes())  # run002's tensor `a`
    data[offset] ^= 0xFF
    victim.write_bytes(bytes(data))  # same size, same revision: only its mtime tells the journal

    again = cli("verify", "runs", "-j", "2", "--journal", "v.jsonl", "--json")
    assert again.returncode == 1
    report = json.loads(again.stdout)
    assert [(Path(f["path"]).name, f["ok"], f.get("skipped", False)) for f in report["files"]] == [
        (fleet[0].name, True, True), (fleet[1].name, True, True), (victim.name, False, False)]
    assert journal_lines(tmp_path / "v.jsonl")[-1]["result"] == "failed"
