"""Benchmark fleets: 200 small checkpoints upgraded (a rename-only chain) by each executor.

Run it from the repository root with the project's virtualenv::

    .venv/bin/python scripts/bench_fleet.py                 # 200 files, 3 repeats, medians
    .venv/bin/python scripts/bench_fleet.py --files 50 --repeat 1 --json fleet.json

Cases: the local executor with ``-j 1`` (in this process) and ``-j 2`` (worker processes), and a
Ray cluster this script starts (``ray start --head`` on 127.0.0.1 with ``--num-cpus 4``, reached
through Ray Client, killed as a process group at the end) with 1, 2 and 4 tasks at once. Every
run upgrades fresh copies of the files (copied untimed) in place without backups, journalled.

Two figures per run: *wall*, the whole ``ckptmigrate upgrade`` process (start-up, connecting to
the cluster, planning, every file; what a user waits for), and *tasks*, the span from the first
task's start to the last result, read from the journal (each line has its arrival time and how long
its task ran): the throughput once connected. Files/s are the file count over each; medians over
the repeats. The machine has 2 cores shared with other work: 4 Ray workers on it measure the
scheduling overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
CHAIN = {
    "c1.py": 'revision = "c1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n',
    "c2.py": 'revision = "c2"\ndown_revision = "c1"\n\n\ndef upgrade(ckpt):\n'
             '    ckpt.rename_regex(r"^encoder\\.", "backbone.")\n',
}


def make_fleet(directory: Path, n: int) -> None:
    directory.mkdir(parents=True)
    for i in range(n):
        state = {f"encoder.layer{j}.weight": torch.randn(64, 64) for j in range(8)}
        state["head.weight"] = torch.randn(10, 64)
        torch.save(state, directory / f"ckpt{i:04d}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ray_cluster(temp: Path, cpus: int):
    gcs, client = free_port(), free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={gcs}", f"--ray-client-server-port={client}",
         f"--num-cpus={cpus}", "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **QUIET})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Ray runtime started" in line:
                break
        else:
            raise SystemExit("ray start failed")
        yield f"ray://127.0.0.1:{client}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tasks_span(journal: Path) -> float:
    """First task start to last result, from the journal's arrival times and task durations."""
    starts, ends = [], []
    for line in journal.read_text().splitlines():
        record = json.loads(line)
        end = datetime.fromisoformat(record["time"]).timestamp()
        ends.append(end)
        starts.append(end - record["seconds"])
    return max(ends) - min(starts)


def run_case(work: Path, source: Path, chain: Path, executor: str, jobs: int) -> tuple[float, float]:
    fleet = work / "fleet"
    shutil.rmtree(fleet, ignore_errors=True)
    shutil.copytree(source, fleet)
    journal = work / "journal.jsonl"
    journal.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ckptmigrate", "upgrade", str(fleet), "--from", "c1", "--migrations", str(chain),
           "--no-backup", "--executor", executor, "-j", str(jobs), "--journal", str(journal)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **QUIET})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return wall, tasks_span(journal)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        work = Path(tmp)
        chain = work / "chain"
        (chain / "versions").mkdir(parents=True)
        for name, text in CHAIN.items():
            (chain / "versions" / name).write_text(f'"""{name}"""\n' + text)
        source = work / "source"
        make_fleet(source, args.files)
        size = sum(p.stat().st_size for p in source.iterdir())
        print(f"{args.files} files, {size / args.files / 1024:.0f} KiB each; {os.cpu_count()} CPUs", flush=True)

        runs: dict[str, list[tuple[float, float]]] = {}
        cases = [("local -j 1", "local", 1), ("local -j 2", "local", 2)]
        for label, executor, jobs in cases:
            run_case(work, source, chain, executor, jobs)  # warm-up: bytecode and page cache
            runs[label] = [run_case(work, source, chain, executor, jobs) for _ in range(args.repeat)]
            print(f"  {label}: done", flush=True)
        (work / "ray").mkdir()
        with ray_cluster(work / "ray", 4) as address:
            run_case(work, source, chain, address, 4)  # warm-up: the workers' imports
            for jobs in (1, 2, 4):
                label = f"ray, {jobs} worker{'s' if jobs > 1 else ''}"
                runs[label] = [run_case(work, source, chain, address, jobs) for _ in range(args.repeat)]
                print(f"  {label}: done", flush=True)

    print()
    print("| executor | wall s | files/s (wall) | tasks s | files/s (tasks) |")
    print("|---|---:|---:|---:|---:|")
    table = {}
    for label, values in runs.items():
        wall = statistics.median(v[0] for v in values)
        span = statistics.median(v[1] for v in values)
        table[label] = {"wall_s": wall, "tasks_s": span, "files_per_s_wall": args.files / wall,
                        "files_per_s_tasks": args.files / span, "runs": values}
        print(f"| {label} | {wall:.2f} | {args.files / wall:.0f} | {span:.2f} | {args.files / span:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"files": args.files, "repeat": args.repeat, "cases": table}, indent=2))


if __name__ == "__main__":
    main()
