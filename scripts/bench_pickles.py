"""What the pickle-level commands cost: ``sanitize`` of a Lightning-style checkpoint (an
``argparse.Namespace`` of hyper-parameters beside the weights and Adam's state) against doing it by
hand (``torch.load(weights_only=False)``, convert, ``torch.save``), and a ``rename_global``-only
upgrade of a ``torch.save(model)`` file against ``stamp``.

Each run is a fresh process measuring itself (CPU time user+sys, peak RSS); medians of ``--runs``.

    python scripts/bench_pickles.py [--tensors 400] [--kib 1024] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import json, resource, sys
{body}
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"cpu": r.ru_utime + r.ru_stime, "rss_mib": r.ru_maxrss / 1024}}))
"""

CLI = "from ckptmigrate.cli.main import main\nmain({args!r}, standalone_mode=False)"

BY_HAND = """
import argparse, pathlib, torch
import numpy as np
c = torch.load({path!r}, weights_only=False, mmap=True)
def plain(o):
    if isinstance(o, argparse.Namespace): return {{k: plain(v) for k, v in vars(o).items()}}
    if isinstance(o, np.generic): return o.item()
    if isinstance(o, pathlib.PurePath): return str(o)
    if isinstance(o, dict): return {{k: plain(v) for k, v in o.items()}}
    return o
c["hyper_parameters"] = plain(c["hyper_parameters"])
torch.save(c, {out!r})
"""


def run(body: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", MEASURE.format(body=body)], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_files(root: Path, tensors: int, kib: int) -> None:
    code = f"""
import argparse, pathlib, torch, numpy as np
from torch import nn
n = {kib} * 256
sd = {{f"layers.{{i}}.weight": torch.randn(n) for i in range({tensors})}}
opt = {{"state": {{i: {{"step": torch.tensor(1.), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)}}
                 for i in range({tensors})}}, "param_groups": [{{"lr": 1e-3, "params": list(range({tensors}))}}]}}
hp = {{"args": argparse.Namespace(lr=np.float32(1e-3), out=pathlib.Path("/runs/1"), seed=np.int64(0))}}
torch.save({{"state_dict": sd, "optimizer_states": [opt], "hyper_parameters": hp, "epoch": 3}},
           {str(root / "lightning.ckpt")!r})
net = nn.Sequential(*[nn.Linear(256, 256) for _ in range({tensors} // 2)])
torch.save(net, {str(root / "module.pt")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    versions = root / "mig" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1.py").write_text('revision = "r1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n')
    rename = 'ckpt.rename_global("torch.nn.modules.linear.", "torch.nn.modules.linear_v2.")'
    (versions / "r2.py").write_text(f'revision = "r2"\ndown_revision = "r1"\n\n\ndef upgrade(ckpt):\n    {rename}\n')


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=400)
    parser.add_argument("--kib", type=int, default=1024, help="KiB per weight tensor (Adam adds two more)")
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_files(root, opts.tensors, opts.kib)
        ckpt, module = root / "lightning.ckpt", root / "module.pt"
        size = ckpt.stat().st_size
        cases: dict[str, list[dict[str, float]]] = {"sanitize": [], "by hand": [], "upgrade": [], "stamp": []}
        for i in range(opts.runs):
            src = root / f"s{i}.ckpt"
            shutil.copyfile(ckpt, src)  # not through this process: a child starts with its peak RSS
            cases["sanitize"].append(run(CLI.format(args=["sanitize", str(src), "--no-backup"])))
            cases["by hand"].append(run(BY_HAND.format(path=str(ckpt), out=str(root / f"h{i}.ckpt"))))
            mod = root / f"m{i}.pt"
            shutil.copyfile(module, mod)
            cases["upgrade"].append(run(CLI.format(args=["upgrade", str(mod), "--from", "r1", "--no-backup",
                                                         "--migrations", str(root / "mig")])))
            shutil.copyfile(module, mod)
            cases["stamp"].append(run(CLI.format(args=["stamp", str(mod)])))
        print(f"checkpoint {size / 2**20:.0f} MiB ({opts.tensors} weights + Adam state), module "
              f"{module.stat().st_size / 2**20:.0f} MiB; medians of {opts.runs}")
        for name, rows in cases.items():
            print(f"  {name:<9} cpu {median(rows, 'cpu'):6.2f} s   peak rss {median(rows, 'rss_mib'):7.0f} MiB")


if __name__ == "__main__":
    main()
