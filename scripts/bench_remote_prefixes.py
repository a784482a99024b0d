"""Benchmark rename-only upgrades in place of multi-file checkpoints under gs:// and az:// prefixes.

Run it from the repository root with the project's virtualenv::

    .venv/bin/python scripts/bench_remote_prefixes.py --size-mb 64 --tensor-mb 16 --repeat 3

The tensors of scripts/bench_remote.py as 4 HF safetensors shards with their index and as a DCP
directory, under a prefix in gcp-storage-emulator and in Azurite (both on 127.0.0.1); a rename of
``blocks.0.weight`` in place, ``--no-backup``, each prefix uploaded afresh (untimed) before each run.
Each case is a child process timed by wall clock (interpreter start-up included), with its CPU time;
the bytes are ckptmigrate's own count (``--json``'s ``transfer``: neither emulator counts them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_remote import build_multi, chain  # noqa: E402
from bench_remote_gcs import _size, timed  # noqa: E402

from tests.objectstores import free_port  # noqa: E402

BUCKET = "ckpts"


@contextlib.contextmanager
def gcs() -> Iterator[tuple[dict[str, str], Callable[[str, bytes], None]]]:
    from gcp_storage_emulator.server import create_server
    from google.cloud import storage

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        client = storage.Client.create_anonymous_client()
        client._connection.API_BASE_URL = env["STORAGE_EMULATOR_HOST"]
        bucket = client.bucket(BUCKET)
        yield env, lambda key, data: bucket.blob(key).upload_from_string(data)
    finally:
        server.stop()


@contextlib.contextmanager
def azure() -> Iterator[tuple[dict[str, str], Callable[[str, bytes], None]]]:
    from tests.azurite import running

    with running(BUCKET) as (env, container):
        yield env, lambda key, data: container.upload_blob(key, data, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--tensor-mb", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    cli = [sys.executable, "-m", "ckptmigrate"]
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-prefixes-") as tmp_dir:
        tmp = Path(tmp_dir)
        build_multi(tmp, opts.size_mb, opts.tensor_mb)
        migrations = chain(tmp)
        sizes = {kind: sum(p.stat().st_size for p in (tmp / kind).iterdir()) for kind in ("hf", "dcp")}
        for scheme, serving in (("gs", gcs), ("az", azure)):
            with serving() as (served_env, put):
                env = {**os.environ, **served_env}
                for kind, label in (("hf", "sharded model (4 shards)"), ("dcp", "DCP directory")):
                    runs = []
                    for _ in range(opts.repeat):
                        for path in (tmp / kind).iterdir():
                            put(f"work/{kind}/{path.name}", path.read_bytes())
                        runs.append(timed([*cli, "upgrade", f"{scheme}://{BUCKET}/work/{kind}/", "--from", "c1",
                                           "--migrations", str(migrations), "--no-backup", "--json"], env))
                    rows.append((f"`{scheme}://` {label}, {sizes[kind] / 2**20:.0f} MiB", runs))
    print(f"rename of blocks.0.weight in place, --no-backup; {opts.repeat} repeat(s), medians")
    print()
    print("| case | wall (s) | client CPU (s) | received | sent | copied server-side | requests |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in rows:
        row = [_size(runs[-1]["transfer"][k]) for k in ("bytes_received", "bytes_sent", "bytes_copied_server_side")]
        print(f"| {name} | {statistics.median(r['seconds'] for r in runs):.2f} | "
              f"{statistics.median(r['client_cpu'] for r in runs):.2f} | {' | '.join(row)} | "
              f"{runs[-1]['transfer']['requests']} |")


if __name__ == "__main__":
    main()
