"""Benchmark multi-file checkpoints: a model as 4 Hugging Face safetensors shards and as a 2-rank DCP
directory (every tensor a DTensor sharded over the ranks, as FSDP2 saves it).

Cases, each a whole process (start-up included), medians of ``--repeat`` runs, each on a fresh copy:
rename-only ``upgrade`` in place (HF: headers rewritten in place; DCP: only ``.metadata``), the same
out of place (``-o``) beside ``cp -r``, ``convert`` DCP -> one safetensors file and HF shards -> DCP
beside ``cp -r`` of the same bytes, and the naive route (``dcp_to_torch_save``, which loads everything). Every write of
ckptmigrate is fsynced before it is switched in and ``cp`` is not, so each copy is also timed
followed by ``sync`` (the fair floor on a machine whose disk, not its CPU, bounds a copy). Wall
time and CPU time (user + sys of the process) are both reported: on a shared machine the CPU time
is the one that compares runs. Peak anonymous memory is sampled from ``/proc/PID/status`` (see
scripts/bench.py). Usage::

    python scripts/bench_multifile.py [--size-mb 2048] [--repeat 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import CHILD_ENV, Sampler, child_env  # noqa: E402

PY = sys.executable
#: case -> (kind of target, limit, the copy it is compared with)
TARGETS = {
    "upgrade in place, DCP (rename)": ("s", 0.2, None),
    "upgrade in place, HF shards (rename)": ("s", 0.3, None),
    "upgrade -o, DCP (rename)": ("x cp", 1.2, "cp -r DCP"),
    "upgrade -o, HF shards (rename)": ("x cp", 1.2, "cp -r HF"),
    "convert DCP -> safetensors": ("x cp", 1.3, "cp -r DCP"),
    "convert HF shards -> DCP": ("x cp", 1.3, "cp -r HF"),
}


@dataclass
class Run:
    """One run of one case: wall and CPU seconds, peak anonymous memory."""

    wall: float
    cpu: float
    peak_anon_mib: float
    returncode: int
    stderr: str


def run_child(cmd: list[str], cwd: Path) -> Run:
    """Run one command as its own process; its wall time, CPU time (user + sys) and peak RssAnon."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                env=CHILD_ENV)
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.done.set()
        sampler.join()
        err.seek(0)
        return Run(wall, usage.ru_utime + usage.ru_stime, sampler.anon_kib / 1024,
                   os.waitstatus_to_exitcode(status), err.read().decode(errors="replace"))

SAVE_DCP = """
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

def run(rank, out, port, layers, width):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(int(layers)):
        for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.out"):
            t = torch.randn(int(width), int(width), generator=gen)
            state[f"model.layers.{i}.{name}.weight"] = distribute_tensor(t, mesh, [Shard(0)])
    dcp.save({"model": state}, checkpoint_id=out)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=tuple(sys.argv[1:5]), nprocs=2)
"""

SAVE_HF = """
import sys, torch
from huggingface_hub import save_torch_state_dict
layers, width, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
gen = torch.Generator().manual_seed(0)
sd = {f"model.layers.{i}.{n}.weight": torch.randn(width, width, generator=gen)
      for i in range(layers) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.out")}
total = sum(t.numel() * 4 for t in sd.values())
save_torch_state_dict(sd, out, max_shard_size=total // 4 + 1)
"""

MIGRATION = '''revision = "0001"
down_revision = None


def upgrade(ckpt):
    ckpt.rename_regex(r"(.*)layers\\.(\\d+)\\.(.*)", r"\\1blocks.\\2.\\3")
'''


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def fresh(src: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    shutil.copytree(src, dest)
    subprocess.run(["sync"], check=True)
    return dest


def distcp_state(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("*.distcp")}


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def row(name: str, runs: list[Run], cases: dict[str, list[Run]], largest: int) -> dict[str, Any]:
    """One line of the table: medians, the ratios to the copy it is compared with, target and status."""
    wall = statistics.median(r.wall for r in runs)
    cpu = statistics.median(r.cpu for r in runs)
    anon = max(r.peak_anon_mib for r in runs)
    unit, limit, base = TARGETS.get(name, (None, None, None))
    x_cp = wall / statistics.median(r.wall for r in cases[base]) if base else None
    x_sync = wall / statistics.median(r.wall for r in cases[f"{base} + sync"]) if base else None
    target, status = "—", "—"
    if unit == "s" and limit is not None:
        target = f"≤ {limit} s"
        status = "met" if wall <= limit else "missed (CPU time met)" if cpu <= limit else "missed"
    elif x_cp is not None and x_sync is not None and limit is not None:
        target = f"≤ {limit}× {base}"
        status = "met" if x_cp <= limit else f"missed; met × {base} + sync" if x_sync <= limit else "missed"
    if name.startswith("convert"):
        bound = 300 + largest / 2**20
        target += f", anon ≤ {bound:.0f} MiB"
        status = status if anon <= bound else "missed (memory)"
    return {"case": name, "wall_s": wall, "cpu_s": cpu, "x_cp": x_cp, "x_cp_sync": x_sync, "peak_anon_mib": anon,
            "target": target, "status": status, "runs": [vars(r) | {"stderr": None} for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    width = 2048
    layers = max(1, args.size_mb * (1 << 20) // (4 * width * width * 4))
    work = Path(tempfile.mkdtemp(prefix="bench-multifile-", dir=os.environ.get("BENCH_DIR")))
    child_env(work)
    ckm = [PY, "-m", "ckptmigrate"]
    try:
        (work / "save_dcp.py").write_text(SAVE_DCP)
        (work / "save_hf.py").write_text(SAVE_HF)
        dcp_src, hf_src = work / "dcp-src", work / "hf-src"
        hf_src.mkdir()
        subprocess.run([PY, str(work / "save_dcp.py"), str(dcp_src), free_port(), str(layers), str(width)],
                       check=True, capture_output=True)
        subprocess.run([PY, str(work / "save_hf.py"), str(layers), str(width), str(hf_src)], check=True)
        mig = work / "mig"
        (mig / "versions").mkdir(parents=True)
        (mig / "versions" / "0001_rename.py").write_text(MIGRATION)
        size = sum(p.stat().st_size for p in hf_src.iterdir())
        largest = width * width * 4
        print(f"{size / 2**20:.0f} MiB, {layers * 4} tensors of {largest / 2**20:.0f} MiB; "
              f"HF: {len(list(hf_src.glob('*.safetensors')))} shards; DCP: 2 ranks", flush=True)
        up = [*ckm, "upgrade", "--migrations", str(mig), "--from", "base"]
        cases: dict[str, list[Run]] = {}

        subprocess.run([PY, "-c", "import torch.distributed.checkpoint.format_utils, ckptmigrate.cli.main"],
                       cwd=work, check=True, env=CHILD_ENV)  # the children's bytecode cache, filled untimed

        def case(name: str, cmd: list[str], setup: Any = None, check: Any = None, warm: bool = True) -> None:
            """``repeat`` timed runs, after one untimed run (bytecode of the modules the command imports)."""
            runs = []
            for i in range(args.repeat + warm):
                if setup is not None:
                    setup()
                sample = run_child(cmd, work)
                if sample.returncode != 0:
                    raise SystemExit(f"{name}: {sample.stderr}")
                if check is not None:
                    check()
                if i >= warm:
                    runs.append(sample)
            cases[name] = runs
            print(f"  {name}: {statistics.median(r.wall for r in runs):.3f} s wall, "
                  f"{statistics.median(r.cpu for r in runs):.3f} s CPU, "
                  f"peak anon {max(r.peak_anon_mib for r in runs):.0f} MiB", flush=True)

        dcp_w, hf_w, out = work / "dcp", work / "hf", work / "out"

        def clear_out() -> None:
            for p in (out, work / "out.safetensors"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            subprocess.run(["sync"], check=True)

        copy_sync = 'cp -r "$1" "$2" && find "$2" -exec sync {} +'  # each file and the directory fsynced
        for label, src in (("DCP", dcp_src), ("HF", hf_src)):
            case(f"cp -r {label}", ["cp", "-r", str(src), str(out)], clear_out)
            case(f"cp -r {label} + sync", ["sh", "-c", copy_sync, "sh", str(src), str(out)], clear_out)
        before: dict[str, tuple[int, int]] = {}

        def fresh_dcp() -> None:
            fresh(dcp_src, dcp_w)
            before.clear()
            before.update(distcp_state(dcp_w))

        def no_distcp_written() -> None:
            assert distcp_state(dcp_w) == before, "a .distcp file was written"

        case("upgrade in place, DCP (rename)", [*up, str(dcp_w), "--no-backup"], fresh_dcp, no_distcp_written)
        case("upgrade in place, HF shards (rename)", [*up, str(hf_w), "--no-backup"], lambda: fresh(hf_src, hf_w))
        case("upgrade -o, DCP (rename)", [*up, str(dcp_src), "-o", str(out)], clear_out)
        case("upgrade -o, HF shards (rename)", [*up, str(hf_src), "-o", str(out)], clear_out)
        case("convert DCP -> safetensors",
             [*ckm, "convert", str(dcp_src), str(work / "out.safetensors"), "--to", "safetensors",
              "--state-dict-only"], clear_out)
        case("convert HF shards -> DCP", [*ckm, "convert", str(hf_src), str(out), "--to", "dcp"], clear_out)
        case("naive: dcp_to_torch_save", [PY, "-c", "import sys; from torch.distributed.checkpoint.format_utils "
                                          "import dcp_to_torch_save; dcp_to_torch_save(sys.argv[1], sys.argv[2])",
                                          str(dcp_src), str(work / "out.safetensors")], clear_out, warm=False)
        rows = [row(name, runs, cases, largest) for name, runs in cases.items()]
        print("\n| case | wall s | CPU s | × cp | × cp + sync | peak anon MiB | target | status |\n"
              "|---|---:|---:|---:|---:|---:|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {_ratio(r['x_cp'])} | "
                  f"{_ratio(r['x_cp_sync'])} | {r['peak_anon_mib']:.0f} | {r['target']} | {r['status']} |")
        if args.json:
            args.json.write_text(json.dumps({"size_mib": size / 2**20, "repeat": args.repeat, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
