"""Benchmark multi-file checkpoints: a model as 4 Hugging Face safetensors shards and as a 2-rank DCP
directory (every tensor a DTensor sharded over the ranks, as FSDP2 saves it).

Cases, each a whole process (start-up included), medians of ``--repeat`` runs, each on a fresh copy:
rename-only ``upgrade`` in place (HF: headers rewritten in place; DCP: only ``.metadata``), the same
out of place (``-o``) beside ``cp -r``, ``convert`` DCP -> one safetensors file beside ``cp``, and
the naive route (``dcp_to_torch_save``, which loads everything). Peak anonymous memory is sampled
from ``/proc/PID/status`` (see scripts/bench.py). Usage::

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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Sample, child_env, run_child  # noqa: E402

PY = sys.executable
TARGETS = {
    "upgrade in place, DCP (rename)": ("s", 0.2, None),
    "upgrade in place, HF shards (rename)": ("s", 0.3, None),
    "upgrade -o, DCP (rename)": ("x cp", 1.2, "cp -r DCP"),
    "upgrade -o, HF shards (rename)": ("x cp", 1.2, "cp -r HF"),
    "convert DCP -> safetensors": ("x cp", 1.3, "cp DCP data"),
}

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
        cases: dict[str, list[Sample]] = {}

        def case(name: str, cmd: list[str], setup: Any = None, check: Any = None) -> None:
            runs = []
            for _ in range(args.repeat):
                if setup is not None:
                    setup()
                sample = run_child(cmd, work)
                if sample.returncode != 0:
                    raise SystemExit(f"{name}: {sample.stderr}")
                if check is not None:
                    check()
                runs.append(sample)
            cases[name] = runs
            med = statistics.median(s.seconds for s in runs)
            print(f"  {name}: {med:.3f} s, peak anon {max(s.peak_anon_mib for s in runs):.0f} MiB", flush=True)

        dcp_w, hf_w, out = work / "dcp", work / "hf", work / "out"

        def clear_out() -> None:
            for p in (out, work / "out.safetensors"):
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            subprocess.run(["sync"], check=True)

        case("cp -r DCP", ["cp", "-r", str(dcp_src), str(out)], clear_out)
        case("cp -r HF", ["cp", "-r", str(hf_src), str(out)], clear_out)
        case("cp DCP data", ["cp", str(dcp_src / "__0_0.distcp"), str(out)], clear_out)
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
        case("naive: dcp_to_torch_save", [PY, "-c", "import sys; from torch.distributed.checkpoint.format_utils "
                                          "import dcp_to_torch_save; dcp_to_torch_save(sys.argv[1], sys.argv[2])",
                                          str(dcp_src), str(work / "out.safetensors")], clear_out)
        rows = []
        med = {k: statistics.median(s.seconds for s in v) for k, v in cases.items()}
        print("\n| case | median s | × cp | peak anon MiB | target | status |\n|---|---:|---:|---:|---|---|")
        for name, runs in cases.items():
            unit, limit, base = TARGETS.get(name, (None, None, None))
            ratio = med[name] / med[base] if base else None
            anon = max(s.peak_anon_mib for s in runs)
            status = "—"
            target = "—"
            if unit == "s":
                target, status = f"≤ {limit} s", "met" if med[name] <= limit else "missed"
            elif unit == "x cp" and ratio is not None:
                target, status = f"≤ {limit}× {base}", "met" if ratio <= limit else "missed"
            if name.startswith("convert"):
                target += f", anon ≤ {300 + largest / 2**20:.0f} MiB"
                status = status if anon <= 300 + largest / 2**20 else "missed (memory)"
            print(f"| {name} | {med[name]:.3f} | {'' if ratio is None else f'{ratio:.2f}'} | {anon:.0f} | "
                  f"{target} | {status} |")
            rows.append({"case": name, "median_s": med[name], "ratio": ratio, "peak_anon_mib": anon,
                         "target": target, "status": status})
        if args.json:
            args.json.write_text(json.dumps({"size_mib": size / 2**20, "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
