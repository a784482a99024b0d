"""The sweep of ``scripts/bench.py --sweep``: time against tensor count and against file size.

Two series of torch zip files, each a state dict under ``module.`` (as saved from
``nn.DataParallel``): by **count**, 100, 1,000, 10,000 and 100,000 tensors of 64 float32 each (bytes
do not matter, metadata does); by **size**, 64 MiB to 4 GiB (``--sweep-max-mb``) in 200 tensors
(bytes matter, metadata does not). On each file, as whole child processes (start-up included), a
rename-only chain (``unwrap("module.")``) is timed: ``upgrade --no-backup`` in place, ``upgrade -o``,
``inspect``, the naive ``torch.load`` → rename → ``torch.save`` script, and ``cp``. Medians of
``--repeat`` runs — wall seconds and CPU seconds (user + system, what a machine shared with other
jobs changes least) — and the peak RSS are written to ``--json`` (default ``bench-sweep.json``), and
the CPU seconds plotted, log-log, to a PNG next to it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bench import MiB, Sample, child_env, cli_command, remove, run_child, warm

COUNTS = [100, 1_000, 10_000, 100_000]
SIZES_MB = [64, 256, 1024, 4096]
SIZE_TENSORS = 200
#: "ckptmigrate's file": the same tensors after ``ckptmigrate stamp`` (untimed), as every file is once
#: ckptmigrate has written it: its own ``data.pkl`` and an envelope with a schema entry per key.
CASES = ["inspect", "rename in place", "rename -o", "inspect ckptmigrate's file", "rename in place ckptmigrate's file",
         "naive torch.load→rename→torch.save", "cp"]

CHAIN = '''
revision = "s1"
down_revision = None


def upgrade(ckpt):
    ckpt.unwrap("module.")
'''

NAIVE = '''
import sys, torch
sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
torch.save({k.removeprefix("module."): v for k, v in sd.items()}, sys.argv[2])
'''


def by_count(path: Path, n: int) -> None:
    torch.save({f"module.blocks.{i // 16}.w{i % 16}": torch.full((64,), float(i)) for i in range(n)}, path)


def by_size(path: Path, mib: int) -> None:
    per = mib * MiB // 4 // SIZE_TENSORS
    torch.save({f"module.blocks.{i}.weight": torch.full((per,), float(i)) for i in range(SIZE_TENSORS)}, path)


def run_cases(src: Path, work: Path, repeat: int) -> dict[str, dict[str, Any]]:
    """Each case ``repeat`` times on ``src``; the input of an in-place run is a fresh, untimed copy."""
    cli = cli_command()
    chain = work / "chain"
    naive = work / "naive.py"
    victim, out, stamped = work / "victim.pt", work / "out.pt", work / "stamped.pt"
    shutil.copyfile(src, stamped)
    subprocess.run([*cli, "stamp", str(stamped)], cwd=work, check=True, capture_output=True)
    rename = [*cli, "upgrade", str(victim), "--no-backup", "--from", "base", "--migrations", str(chain)]
    commands = {
        "inspect": [*cli, "inspect", str(src)],
        "rename in place": rename,
        "rename -o": [*cli, "upgrade", str(src), "-o", str(out), "--from", "base", "--migrations", str(chain)],
        "inspect ckptmigrate's file": [*cli, "inspect", str(stamped)],
        "rename in place ckptmigrate's file": rename,
        "naive torch.load→rename→torch.save": [sys.executable, str(naive), str(src), str(out)],
        "cp": ["cp", str(src), str(out)],
    }
    samples: dict[str, list[Sample]] = {case: [] for case in CASES}
    for _ in range(repeat):
        for case in CASES:
            remove(victim, out)
            if case.startswith("rename in place"):
                shutil.copyfile(stamped if case.endswith("ckptmigrate's file") else src, victim)
            warm(src)
            sample = run_child(commands[case], work)
            if sample.returncode != 0:
                raise SystemExit(f"{case} on {src.name} failed: {sample.stderr.strip()[-400:]}")
            samples[case].append(sample)
    remove(victim, out, stamped)
    return {case: {"median_s": statistics.median(s.seconds for s in runs), "runs_s": [s.seconds for s in runs],
                   "median_cpu_s": statistics.median(s.cpu_seconds for s in runs),
                   "peak_rss_mib": max(s.peak_rss_mib for s in runs)} for case, runs in samples.items()}


def sweep(work: Path, repeat: int, max_mb: int, counts: Sequence[int], out_json: Path) -> int:
    work.mkdir(parents=True, exist_ok=True)
    child_env(work)
    (work / "chain" / "versions").mkdir(parents=True, exist_ok=True)
    (work / "chain" / "versions" / "s1_unwrap.py").write_text(CHAIN)
    (work / "naive.py").write_text(NAIVE)
    sizes = [m for m in SIZES_MB if m <= max_mb]
    need = 3 * max(sizes, default=64) * MiB
    if shutil.disk_usage(work).free < need:
        print(f"{work}: the size sweep needs about {need / MiB:.0f} MiB free", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"repeat": repeat, "counts": {}, "sizes_mb": {}}
    for kind, points, build in (("counts", counts, by_count), ("sizes_mb", sizes, by_size)):
        for point in points:
            src = work / f"{kind}-{point}.pt"
            build(src, point)
            row: dict[str, Any] = run_cases(src, work, repeat)
            results[kind][str(point)] = row
            row["file_mib"] = src.stat().st_size / MiB
            print(f"{kind} {point}: " + ", ".join(f"{c} {row[c]['median_s']:.3f} s ({row[c]['median_cpu_s']:.2f} CPU s)"
                                                  for c in CASES), flush=True)
            remove(src)
    out_json.write_text(json.dumps(results, indent=1))
    plot(results, out_json.with_suffix(".png"))
    print(table(results))
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")
    return 0


def table(results: dict[str, Any]) -> str:
    """Markdown tables of the medians, wall seconds and (in brackets) CPU seconds, user + system, and
    the peak RSS of ckptmigrate's cases."""
    lines: list[str] = []
    for kind, label in (("counts", "tensors"), ("sizes_mb", "MiB")):
        lines += ["", f"| {label} | " + " | ".join(CASES) + " | peak RSS inspect / in place MiB |",
                  "|---:|" + "---:|" * (len(CASES) + 1)]
        for point, row in results[kind].items():
            cells = [f"{row[c]['median_s']:.3f} ({row[c].get('median_cpu_s', 0):.2f})" for c in CASES]
            rss = f"{row['inspect']['peak_rss_mib']:.0f} / {row['rename in place']['peak_rss_mib']:.0f}"
            lines.append(f"| {int(point):,} | " + " | ".join(cells) + f" | {rss} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, kind, xlabel in ((axes[0], "counts", "tensors (64 float32 each)"),
                             (axes[1], "sizes_mb", f"file size, MiB ({SIZE_TENSORS} tensors)")):
        xs = [int(p) for p in results[kind]]
        if not xs:  # a sweep without this series (--sweep-max-mb below 64)
            ax.set_visible(False)
            continue
        for case in CASES:
            # cp's CPU time is the kernel's copy, under the clock's resolution for small files: not drawn
            cpu = [results[kind][p][case]["median_cpu_s"] or float("nan") for p in results[kind]]
            ax.plot(xs, cpu, marker="o", label=case)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"CPU seconds, user + system (median of {results['repeat']}, whole process)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("rename-only migration vs tensor count")
    axes[1].set_title("rename-only migration vs file size")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
