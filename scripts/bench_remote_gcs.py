"""Benchmark writes to Google Cloud Storage (gcp-storage-emulator) or Azure (Azurite) on 127.0.0.1.

Run it from the repository root with the project's virtualenv::

    .venv/bin/python scripts/bench_remote_gcs.py --size-mb 64 --repeat 3
    .venv/bin/python scripts/bench_remote_gcs.py --store az --size-mb 64 --repeat 3
    .venv/bin/python scripts/bench_remote_gcs.py --store az --ckptmigrate /tmp/main-tree  # another build

A rename-only ``upgrade`` of a torch zip appends a tail server-side (GCS ``compose``; an Azure
blob of committed blocks: the blob's blocks and one more), a second rename appends again; this
puts them beside the naive route (download, ``torch.load``, rename, ``torch.save``, upload, with
the store's own SDK) and a plain download + upload, and, on Azure, a rename of a blob written by
one ``Put Blob`` (streamed), and an upgrade that changes one 16 MiB tensor's values (streamed: the
kept bytes read through; with its peak RSS and bytes written to local disk; ``--ckptmigrate DIR``
runs the ckptmigrate of another source tree, e.g. a checkout of ``main``). Each case is a child
process timed by wall clock (interpreter start-up included), with its CPU time; every client talks
to the server through a TCP proxy that counts the bytes on the wire each way (neither server counts
them); "copied server-side" is ckptmigrate's own count (``--json``'s ``transfer``).
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench_remote import MAP_ONE, MEASURED, build, chain  # noqa: E402

from tests.objectstores import CountingProxy, free_port  # noqa: E402

BUCKET = "bench"
CLIENTS = {"gs": """
import os, sys
from google.cloud import storage
client = storage.Client.create_anonymous_client()
client._connection.API_BASE_URL = os.environ["STORAGE_EMULATOR_HOST"]
bucket = client.bucket(sys.argv[1])
def get(key, path): bucket.blob(key).download_to_filename(path)
def put(key, path): bucket.blob(key).upload_from_filename(path)
""", "az": """
import os, sys
from azure.storage.blob import ContainerClient
bucket = ContainerClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"], sys.argv[1])
def get(key, path): open(path, "wb").write(bucket.download_blob(key).readall())
def put(key, path): bucket.upload_blob(key, open(path, "rb"), overwrite=True)
"""}
NAIVE = """
import torch
key, tmp = sys.argv[2:4]
get(key, tmp)
sd = torch.load(tmp, weights_only=True, mmap=True)
sd = {("stem.weight" if k == "blocks.0.weight" else k): v for k, v in sd.items()}
torch.save(sd, tmp + ".new")
put(key, tmp + ".new")
"""
ROUNDTRIP = """
key, tmp = sys.argv[2:4]
get(key, tmp)
put(key + ".copy", tmp)
"""


def timed(args: list[str], env: dict[str, str], proxy: CountingProxy) -> dict[str, Any]:
    proxy.reset()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # run outside the repository: its working tree would come first on the child's path
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    transfer = json.loads(proc.stdout).get("transfer") if proc.stdout.startswith("{") else None
    measured = [line.split() for line in proc.stderr.splitlines() if line.startswith("BENCH ")]
    return {"seconds": seconds, "client_cpu": cpu, "transfer": transfer, "up": proxy.up, "down": proxy.down,
            **({"peak_rss_kib": int(measured[-1][1]), "disk_written": int(measured[-1][2])} if measured else {})}


class Store:
    """The emulator, a proxy before it, the environment that points clients at the proxy, and the
    benchmark's own (direct) uploads."""

    def __init__(self, kind: str, stack: contextlib.ExitStack) -> None:
        self.kind = kind
        if kind == "gs":
            from gcp_storage_emulator.server import create_server
            from google.cloud import storage

            port = free_port()
            server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
            server.start()
            stack.callback(server.stop)
            self.proxy = CountingProxy(port)
            self.env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.proxy.port}",
                        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
            client = storage.Client.create_anonymous_client()
            client._connection.API_BASE_URL = f"http://127.0.0.1:{port}"
            self.bucket = client.bucket(BUCKET)
        else:
            from azure.storage.blob import ContainerClient

            from tests.azurite import running

            served, _container = stack.enter_context(running(BUCKET))
            connection = served["AZURE_STORAGE_CONNECTION_STRING"]
            port = int(connection.split("BlobEndpoint=http://127.0.0.1:")[1].split("/")[0])
            self.proxy = CountingProxy(port)
            self.env = {**os.environ,
                        "AZURE_STORAGE_CONNECTION_STRING": connection.replace(f":{port}/", f":{self.proxy.port}/")}
            # uploads of 4 MiB blocks (as azcopy and adlfs write), or one Put Blob up to 256 MiB
            self.blocks = ContainerClient.from_connection_string(connection, BUCKET, max_single_put_size=4 << 20,
                                                                 max_block_size=4 << 20)
            self.single = ContainerClient.from_connection_string(connection, BUCKET, max_single_put_size=256 << 20)
        stack.callback(self.proxy.stop)

    def put(self, key: str, path: Path, *, blocks: bool = True) -> None:
        if self.kind == "gs":
            self.bucket.blob(key).upload_from_filename(str(path))
        else:
            with open(path, "rb") as fh:
                (self.blocks if blocks else self.single).upload_blob(key, fh, overwrite=True)

    def delete(self, key: str) -> None:
        if self.kind == "gs":
            if self.bucket.blob(key).exists():
                self.bucket.blob(key).delete()
        else:
            blob = self.blocks.get_blob_client(key)
            if blob.exists():
                blob.delete_blob()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["gs", "az"], default="gs")
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tensor-mb", type=int, default=16)
    parser.add_argument("--ckptmigrate", type=Path, default=None,
                        help="a source tree whose ckptmigrate the children run (PYTHONPATH), e.g. a checkout of main")
    opts = parser.parse_args()

    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-store-") as tmp_dir:
        store = Store(opts.store, stack)
        env, proxy = store.env, store.proxy
        if opts.ckptmigrate is not None:
            env["PYTHONPATH"] = str(opts.ckptmigrate.resolve())
        tmp = Path(tmp_dir)
        local = tmp / "model.pt"
        tensors = build(local, opts.size_mb, opts.tensor_mb)
        size = local.stat().st_size
        migrations = chain(tmp)
        changed = chain(tmp / "stream", MAP_ONE)
        (migrations / "versions" / "c3.py").write_text(
            '"""c3."""\nrevision = "c3"\ndown_revision = "c2"\n\n\ndef upgrade(ckpt):\n'
            "    ckpt.rename('stem.weight', 'first.weight')\n")
        url = f"{opts.store}://{BUCKET}/work.pt"
        cli = [sys.executable, "-m", "ckptmigrate"]
        upgrade = [*cli, "upgrade", url, "--from", "c1", "--to", "c2", "--migrations", str(migrations), "--json"]
        again = [*cli, "upgrade", url, "--to", "c3", "--migrations", str(migrations), "--json", "--no-backup"]
        sdk = [sys.executable, "-c"]

        def restore(*, blocks: bool = True) -> None:
            store.put("work.pt", local, blocks=blocks)
            for key in ("work.pt.bak", "work.pt.copy"):
                store.delete(key)

        cases: dict[str, list[dict[str, Any]]] = {}

        def case(name: str, args: list[str]) -> None:
            cases.setdefault(name, []).append(timed(args, env, proxy))

        for _ in range(opts.repeat):
            restore()
            case("`inspect`", [*cli, "inspect", url, "--json"])
            case("`upgrade` rename, `--no-backup`", [*upgrade, "--no-backup"])
            case("a second rename (appended again), `--no-backup`", again)
            restore()
            case("`upgrade` rename, backup `KEY.bak`", upgrade)
            if opts.store == "az":
                restore(blocks=False)
                case("`upgrade` rename of a blob of one Put Blob (streamed), `--no-backup`", [*upgrade, "--no-backup"])
            restore()
            case("`upgrade` one 16 MiB tensor's values changed, backup `KEY.bak`",
                 [*sdk, MEASURED, "upgrade", url, "--from", "c1", "--migrations", str(changed), "--json"])
            restore()
            case("naive: download, `torch.load`, rename, `torch.save`, upload",
                 [*sdk, CLIENTS[opts.store] + NAIVE, BUCKET, "work.pt", str(tmp / "naive.pt")])
            for leftover in tmp.glob("naive.pt*"):
                leftover.unlink()
            restore()
            case("download + upload", [*sdk, CLIENTS[opts.store] + ROUNDTRIP, BUCKET, "work.pt", str(tmp / "rt.pt")])
            (tmp / "rt.pt").unlink(missing_ok=True)
    emulator = "gcp-storage-emulator" if opts.store == "gs" else "Azurite"
    print(f"checkpoint: {size / 2**20:.0f} MiB torch zip, {tensors} tensors; {emulator} on 127.0.0.1; "
          f"{opts.repeat} repeat(s), medians; bytes on the wire (headers included)")
    print()
    print("| case | wall (s) | client CPU (s) | received | sent | copied server-side |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in cases.items():
        transfer = runs[-1]["transfer"]
        copied = _size(transfer["bytes_copied_server_side"]) if transfer else "0 B"
        print(f"| {name} | {statistics.median(r['seconds'] for r in runs):.2f} | "
              f"{statistics.median(r['client_cpu'] for r in runs):.2f} | "
              f"{_size(int(statistics.median(r['down'] for r in runs)))} | "
              f"{_size(int(statistics.median(r['up'] for r in runs)))} | {copied} |")
    for name, runs in cases.items():
        if "peak_rss_kib" in runs[0]:
            print(f"\n{name}: peak RSS {_size(max(r['peak_rss_kib'] for r in runs) << 10)}, written to local disk "
                  f"{_size(max(r['disk_written'] for r in runs))}")


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


if __name__ == "__main__":
    main()
