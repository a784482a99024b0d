"""Benchmark writes to Google Cloud Storage against a local GCS emulator (gcp-storage-emulator, on 127.0.0.1).

Run it from the repository root with the project's virtualenv::

    .venv/bin/python scripts/bench_remote_gcs.py --size-mb 64 --repeat 3

GCS cannot splice byte ranges server-side, so a rename-only ``upgrade`` of a ``gs://`` object reads
the object back and sends it up again through one resumable upload; this puts it beside the naive
route (download, ``torch.load``, rename, ``torch.save``, upload, with google-cloud-storage) and a
plain download + upload. Each case is a child process timed by wall clock (interpreter start-up
included), with its CPU time; the bytes are ckptmigrate's own count (``--json``'s ``transfer``; the
emulator counts nothing) and, for the other routes, what they must move (the object each way).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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

from tests.objectstores import free_port  # noqa: E402

BUCKET = "bench"
CLIENT = """
import os, sys
from google.cloud import storage
client = storage.Client.create_anonymous_client()
client._connection.API_BASE_URL = os.environ["STORAGE_EMULATOR_HOST"]
bucket = client.bucket(sys.argv[1])
"""
NAIVE = CLIENT + """
import torch
key, tmp = sys.argv[2:4]
bucket.blob(key).download_to_filename(tmp)
sd = torch.load(tmp, weights_only=True, mmap=True)
sd = {("stem.weight" if k == "blocks.0.weight" else k): v for k, v in sd.items()}
torch.save(sd, tmp + ".new")
bucket.blob(key).upload_from_filename(tmp + ".new")
"""
ROUNDTRIP = CLIENT + """
key, tmp = sys.argv[2:4]
bucket.blob(key).download_to_filename(tmp)
bucket.blob(key + ".copy").upload_from_filename(tmp)
"""


def timed(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    transfer = json.loads(proc.stdout).get("transfer") if proc.stdout.startswith("{") else None
    return {"seconds": seconds, "client_cpu": cpu, "transfer": transfer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tensor-mb", type=int, default=16)
    opts = parser.parse_args()

    from gcp_storage_emulator.server import create_server
    from google.cloud import storage

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    client = storage.Client.create_anonymous_client()
    client._connection.API_BASE_URL = env["STORAGE_EMULATOR_HOST"]
    bucket = client.bucket(BUCKET)
    with tempfile.TemporaryDirectory(prefix="bench-gcs-") as tmp_dir:
        tmp = Path(tmp_dir)
        local = tmp / "model.pt"
        tensors = build(local, opts.size_mb, opts.tensor_mb)
        size = local.stat().st_size
        bucket.blob("orig.pt").upload_from_filename(str(local))
        migrations = chain(tmp)
        url = f"gs://{BUCKET}/work.pt"
        cli = [sys.executable, "-m", "ckptmigrate"]
        upgrade = [*cli, "upgrade", url, "--from", "c1", "--migrations", str(migrations), "--json"]

        def restore() -> None:
            bucket.copy_blob(bucket.blob("orig.pt"), bucket, "work.pt")
            for key in ("work.pt.bak", "work.pt.copy"):
                if bucket.blob(key).exists():
                    bucket.blob(key).delete()

        cases: dict[str, list[dict[str, Any]]] = {}
        for _ in range(opts.repeat):
            restore()
            cases.setdefault("`inspect`", []).append(timed([*cli, "inspect", url, "--json"], env))
            restore()
            cases.setdefault("`upgrade` rename, `--no-backup`", []).append(timed([*upgrade, "--no-backup"], env))
            restore()
            cases.setdefault("`upgrade` rename, backup `KEY.bak`", []).append(timed(upgrade, env))
            restore()
            cases.setdefault("naive: download, `torch.load`, rename, `torch.save`, upload", []).append(timed(
                [sys.executable, "-c", NAIVE, BUCKET, "work.pt", str(tmp / "naive.pt")], env))
            for leftover in tmp.glob("naive.pt*"):
                leftover.unlink()
            restore()
            cases.setdefault("download + upload", []).append(timed(
                [sys.executable, "-c", ROUNDTRIP, BUCKET, "work.pt", str(tmp / "rt.pt")], env))
            (tmp / "rt.pt").unlink(missing_ok=True)
    server.stop()
    print(f"checkpoint: {size / 2**20:.0f} MiB torch zip, {tensors} tensors; gcp-storage-emulator on 127.0.0.1; "
          f"{opts.repeat} repeat(s), medians")
    print()
    print("| case | wall (s) | client CPU (s) | received | sent | copied server-side |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in cases.items():
        transfer = runs[-1]["transfer"]
        moved = ([_size(transfer[k]) for k in ("bytes_received", "bytes_sent", "bytes_copied_server_side")]
                 if transfer else [f"{_size(size)} (the object)"] * 2 + ["0 B"])
        print(f"| {name} | {statistics.median(r['seconds'] for r in runs):.2f} | "
              f"{statistics.median(r['client_cpu'] for r in runs):.2f} | {' | '.join(moved)} |")


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


if __name__ == "__main__":
    main()
