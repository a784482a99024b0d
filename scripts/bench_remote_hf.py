"""Benchmark writes to a Hugging Face Hub repository against the test Hub (tests/hubserver.py, on 127.0.0.1).

Run it from the repository root with the project's virtualenv::

    .venv/bin/python scripts/bench_remote_hf.py --size-mb 64 --repeat 3

A rename-only ``upgrade`` of an ``hf://`` file is one commit: the file staged locally (its kept
bytes read down by range, the new tail after them) and sent whole through LFS (Xet off: the test Hub
has none). This puts it beside the naive route (``hf_hub_download``, ``torch.load``, rename,
``torch.save``, ``upload_file``) and a plain download + upload. Each case is a child process timed by
wall clock (interpreter start-up included), with its CPU time; the bytes are what the *server*
counted (response and request bodies), and ckptmigrate's own count (``--json``'s ``transfer``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_remote import build, chain  # noqa: E402

from tests.hubserver import HubServer  # noqa: E402

NAIVE = """
import sys, torch
from huggingface_hub import HfApi, hf_hub_download, utils
utils.disable_progress_bars()
repo, tmp = sys.argv[1:3]
path = hf_hub_download(repo, "model.pt", cache_dir=tmp)
sd = torch.load(path, weights_only=True, mmap=True)
sd = {("stem.weight" if k == "blocks.0.weight" else k): v for k, v in sd.items()}
torch.save(sd, tmp + "/new.pt")
HfApi().upload_file(path_or_fileobj=tmp + "/new.pt", path_in_repo="model.pt", repo_id=repo)
"""
ROUNDTRIP = """
import sys
from huggingface_hub import HfApi, hf_hub_download, utils
utils.disable_progress_bars()
repo, tmp = sys.argv[1:3]
path = hf_hub_download(repo, "model.pt", cache_dir=tmp)
HfApi().upload_file(path_or_fileobj=path, path_in_repo="copy.pt", repo_id=repo)
"""


def timed(hub: HubServer, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    hub.served.reset()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    transfer = json.loads(proc.stdout).get("transfer") if proc.stdout.startswith("{") else None
    return {"seconds": seconds, "client_cpu": cpu, "transfer": transfer,
            "server_sent": hub.served.body_bytes_sent, "server_received": hub.served.body_bytes_received}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tensor-mb", type=int, default=16)
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp_dir:
        tmp = Path(tmp_dir)
        local = tmp / "model.pt"
        tensors = build(local, opts.size_mb, opts.tensor_mb)
        size = local.stat().st_size
        migrations = chain(tmp)
        hub = HubServer(tmp / "hub").start()
        env = {**os.environ, **hub.env, "HF_TOKEN": "hf_bench", "HF_HOME": str(tmp / "hf-home")}
        cli = [sys.executable, "-m", "ckptmigrate"]
        made = iter(range(1000))

        def fresh() -> str:
            """A new repository holding the checkpoint (the last one dropped: the Hub keeps commits in memory)."""
            for repo_id in list(hub.store.repos):
                hub.store.repos.pop(repo_id)
                shutil.rmtree(hub.root / repo_id)
            hub.store.lfs.clear()
            repo_id = f"bench/r{next(made)}"
            (hub.root / repo_id).mkdir(parents=True)
            shutil.copyfile(local, hub.root / repo_id / "model.pt")
            return repo_id

        cases: dict[str, list[dict[str, Any]]] = {}
        for _ in range(opts.repeat):
            url = f"hf://{fresh()}/model.pt"
            cases.setdefault("`inspect`", []).append(timed(hub, [*cli, "inspect", url, "--json"], env))
            url = f"hf://{fresh()}/model.pt"
            cases.setdefault("`upgrade` rename: one commit", []).append(timed(
                hub, [*cli, "upgrade", url, "--from", "c1", "--migrations", str(migrations), "--json"], env))
            scratch = tmp / "scratch"
            cases.setdefault("naive: download, `torch.load`, rename, `torch.save`, upload", []).append(timed(
                hub, [sys.executable, "-c", NAIVE, fresh(), str(scratch)], env))
            shutil.rmtree(scratch, ignore_errors=True)
            cases.setdefault("download + upload", []).append(timed(
                hub, [sys.executable, "-c", ROUNDTRIP, fresh(), str(scratch)], env))
            shutil.rmtree(scratch, ignore_errors=True)
        hub.stop()
    print(f"checkpoint: {size / 2**20:.0f} MiB torch zip, {tensors} tensors; tests/hubserver.py on 127.0.0.1 "
          f"(LFS, no Xet); {opts.repeat} repeat(s), medians")
    print()
    print("| case | wall (s) | client CPU (s) | server sent | server received | ckptmigrate: received / sent |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in cases.items():
        transfer = runs[-1]["transfer"]
        own = f"{_size(transfer['bytes_received'])} / {_size(transfer['bytes_sent'])}" if transfer else "-"
        print(f"| {name} | {statistics.median(r['seconds'] for r in runs):.2f} | "
              f"{statistics.median(r['client_cpu'] for r in runs):.2f} | {_size(runs[-1]['server_sent'])} | "
              f"{_size(runs[-1]['server_received'])} | {own} |")


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


if __name__ == "__main__":
    main()
