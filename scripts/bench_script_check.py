"""What holding each step to its revision's schema snapshot costs: ``python scripts/bench_script_check.py``.

A torch zip file of ``--tensors`` small tensors under ``module.`` and a two-revision chain (a baseline,
then ``unwrap("module.")``), each revision with its snapshot. An in-process upgrade
(``api.upgrade(dry_run=True)``: plan, open, run the scripts, check; nothing written) is run
``--repeat`` times; printed are the medians of its CPU time (user + sys of this process) and of the
CPU time spent in the check (``snapshot_check.SnapshotCheck.step``, timed by a wrapper). The check reads keys,
shapes and dtypes only: its cost grows with the number of tensors, not their bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ckptmigrate import api
from ckptmigrate.chain import snapshot_check

CHAIN = {
    "r1": "revision = 'r1'\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n",
    "r2": "revision = 'r2'\ndown_revision = 'r1'\n\n\ndef upgrade(ckpt):\n    ckpt.unwrap('module.')\n",
}


def build(work: Path, tensors: int) -> tuple[Path, Path]:
    versions = work / "migrations" / "versions"
    versions.mkdir(parents=True)
    for rev, text in CHAIN.items():
        (versions / f"{rev}.py").write_text(text)
    sd = OrderedDict((f"module.layers.{i}.weight", torch.zeros(4, 4)) for i in range(tensors))
    path = work / "run.pt"
    torch.save(sd, path)
    schema = {k: {"shape": [4, 4], "dtype": "float32"} for k in sd}
    (versions / "r1.schema.json").write_text(json.dumps(schema))
    unwrapped = {k.removeprefix("module."): v for k, v in schema.items()}
    (versions / "r2.schema.json").write_text(json.dumps(unwrapped))
    return path, versions.parent


def cpu_seconds(path: Path, migrations: Path) -> float:
    start = time.process_time()
    api.upgrade(path, from_rev="r1", dry_run=True, migrations=migrations)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    in_check: list[float] = []
    check = snapshot_check.SnapshotCheck.step

    def timed(*a: Any, **k: Any) -> None:
        start = time.process_time()
        try:
            check(*a, **k)
        finally:
            in_check[-1] += time.process_time() - start

    snapshot_check.SnapshotCheck.step = timed  # type: ignore[method-assign]
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        path, migrations = build(Path(tmp), args.tensors)
        in_check.append(0.0)
        cpu_seconds(path, migrations)  # warm: imports, page cache
        for _ in range(args.repeat):
            in_check.append(0.0)
            totals.append(cpu_seconds(path, migrations))
    print(f"{args.tensors} tensors, upgrade r1 -> r2 in memory, median CPU s of {args.repeat} runs")
    print(f"  whole upgrade (dry run)  {statistics.median(totals):.3f}")
    print(f"  of which the check       {statistics.median(in_check[1:]):.3f}")


if __name__ == "__main__":
    main()
