"""Benchmark checkpoints in object storage against a local S3 server (moto, on 127.0.0.1).

Run it from the repository root with the project's virtualenv::

    .venv/bin/python scripts/bench_remote.py                    # 1 GiB checkpoint of 16 MiB tensors, 3 repeats
    .venv/bin/python scripts/bench_remote.py --size-mb 256      # smaller, faster
    .venv/bin/python scripts/bench_remote.py --tensor-mb 256    # 1 GiB in 4 tensors: few range requests
    .venv/bin/python scripts/bench_remote.py --json bench-remote.json
    .venv/bin/python scripts/bench_remote.py --cases multi      # only the multi-file and safetensors cases
    .venv/bin/python scripts/bench_remote.py --cases stream --size-mb 256   # one tensor of 16 MiB changed
    .venv/bin/python scripts/bench_remote.py --cases stream --ckptmigrate /tmp/main-tree  # the same, another build

What it measures, each case a child process timed by wall clock (interpreter start-up included),
its CPU time (the client's) and this process's CPU time meanwhile (the server's: moto runs in a
thread here), and the bytes each moved over the network as the *server* counted them (request and
response bodies; a server-side copy moves none):

- ``inspect s3://...``: the zip directory, local headers and ``data.pkl`` only;
- ``upgrade s3://...`` of a rename-only chain (``--no-backup``, and with the default backup, a
  server-side copy): UploadPartCopy of the records plus a new tail;
- the naive route: download, ``torch.load``, rename, ``torch.save``, upload (boto3);
- a plain copy of the object: server-side ``copy_object``, and download + upload (what
  ``aws s3 cp`` to a local file and back does);
- the same tensors as one safetensors object, as a sharded model (4 safetensors shards and their
  index under a prefix) and as a DCP directory under a prefix: ``inspect`` (headers, index,
  ``.metadata`` by range) and a rename in place (``--no-backup``): a safetensors object or shard
  gets a new header and its first 5 MiB sent, the rest copied server-side; DCP puts ``.metadata``
  and its envelope only.

- ``--cases stream``: an upgrade that changes the values of one tensor (``map``, the second of
  16 MiB), with the backup: streamed (the new archive sent as it is made, kept tensors copied
  server-side but for 5 MiB of each that fills a part); with ``--ckptmigrate DIR`` the child runs
  the ckptmigrate of another source tree (a checkout of ``main``: before/after). These rows add the
  child's peak RSS and the bytes it wrote to local disk (``/proc/self/io`` ``write_bytes``). The
  same change with ``-o`` into another bucket: a new object, the kept tensors copied from the
  source bucket server-side.

Before each timed upgrade the object is restored by a server-side copy (untimed). moto reads the
whole object to answer each range request, so on moto the wall time of ``inspect`` and ``upgrade``
grows with the object (see the server CPU column) although the bytes they move do not; on S3 a
range request costs its range. Network latency and bandwidth to a real region would make the
bytes-moved columns matter more, not less.
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

from tests.objectstores import S3Server, set_env  # noqa: E402

BUCKET = "bench"
#: ``-o`` into another bucket (``--cases stream``).
OTHER = "bench-out"
NAIVE = """
import sys, boto3, torch
bucket, key, tmp = sys.argv[1:4]
s3 = boto3.client("s3")
s3.download_file(bucket, key, tmp)
sd = torch.load(tmp, weights_only=True, mmap=True)
sd = {("stem.weight" if k == "blocks.0.weight" else k): v for k, v in sd.items()}
torch.save(sd, tmp + ".new")
s3.upload_file(tmp + ".new", bucket, key)
"""
ROUNDTRIP = """
import sys, boto3
bucket, key, tmp = sys.argv[1:4]
s3 = boto3.client("s3")
s3.download_file(bucket, key, tmp)
s3.upload_file(tmp, bucket, key + ".copy")
"""


def build(path: Path, size_mb: int, tensor_mb: int) -> int:
    import torch

    count = max(1, size_mb // tensor_mb)
    state = {f"blocks.{i}.weight": torch.full((tensor_mb << 18,), float(i)) for i in range(count)}
    torch.save(state, path)
    return count


def build_multi(directory: Path, size_mb: int, tensor_mb: int) -> None:
    """The tensors of :func:`build` as one safetensors file, 4 HF shards and a DCP directory."""
    import torch
    import torch.distributed.checkpoint as dcp
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import save_file

    count = max(1, size_mb // tensor_mb)
    state = {f"blocks.{i}.weight": torch.full((tensor_mb << 18,), float(i)) for i in range(count)}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "hf").mkdir()
    save_torch_state_dict(state, str(directory / "hf"), max_shard_size=max(1, size_mb // 4) * 2**20 + 1)
    dcp.save(state, checkpoint_id=str(directory / "dcp"))


def chain(directory: Path, body: str = "ckpt.rename('blocks.0.weight', 'stem.weight')") -> Path:
    versions = directory / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "c1.py").write_text('"""c1."""\nrevision = "c1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
                                    "    pass\n")
    (versions / "c2.py").write_text('"""c2."""\nrevision = "c2"\ndown_revision = "c1"\n\n\ndef upgrade(ckpt):\n'
                                    f"    {body}\n")
    return versions.parent


#: Runs the CLI and reports, as it exits, the process's peak RSS (KiB: VmHWM; not ``ru_maxrss``, which
#: counts the parent's memory the child was forked with) and bytes written to disk.
MEASURED = """
import atexit, runpy, sys
def report():
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
    sys.stderr.write(f"\\nBENCH {hwm} {io['write_bytes']}\\n")
atexit.register(report)
sys.argv[0] = "ckptmigrate"
runpy.run_module("ckptmigrate", run_name="__main__", alter_sys=True)
"""
MAP_ONE = "ckpt.map('blocks.1.weight', lambda t: -t)"


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed(server: S3Server, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall time of the child, its CPU (the client's), and this process's CPU meanwhile (moto's: the
    server is a thread here) — on moto a range request costs a read of the whole object."""
    server.served.reset()
    children, own = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF)
    start = time.perf_counter()
    # run outside the repository: its working tree would come first on the child's path
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    client_cpu, server_cpu = _cpu(resource.RUSAGE_CHILDREN) - children, _cpu(resource.RUSAGE_SELF) - own
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr}")
    measured = [line.split() for line in proc.stderr.splitlines() if line.startswith("BENCH ")]
    return {"seconds": seconds, "client_cpu": client_cpu, "server_cpu": server_cpu,
            "received_by_client": server.served.body_bytes_sent,
            "sent_by_client": server.served.body_bytes_received, "requests": server.served.requests,
            "stdout": proc.stdout, **({"peak_rss_kib": int(measured[-1][1]), "disk_written": int(measured[-1][2])}
                                      if measured else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tensor-mb", type=int, default=16,
                        help="size of each tensor: what ckptmigrate reads grows with their number, not their size")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cases", choices=("all", "zip", "multi", "stream"), default="all",
                        help="the torch zip cases, the safetensors / sharded / DCP ones, both, or only the "
                             "upgrade that changes one tensor")
    parser.add_argument("--ckptmigrate", type=Path, default=None,
                        help="a source tree whose ckptmigrate the children run (PYTHONPATH), e.g. a checkout of main")
    opts = parser.parse_args()

    server = S3Server().start()
    set_env(server.env)
    env = {**os.environ, **server.env}
    if opts.ckptmigrate is not None:
        env["PYTHONPATH"] = str(opts.ckptmigrate.resolve())
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    client.create_bucket(Bucket=OTHER)
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp_dir:
        tmp = Path(tmp_dir)
        local = tmp / "model.pt"
        tensors = build(local, opts.size_mb, opts.tensor_mb)
        size = local.stat().st_size
        client.upload_file(str(local), BUCKET, "orig.pt")
        local.unlink()
        migrations = chain(tmp)
        url = f"s3://{BUCKET}/work.pt"
        cli = [sys.executable, "-m", "ckptmigrate"]

        def restore() -> None:
            client.copy_object(Bucket=BUCKET, Key="work.pt", CopySource={"Bucket": BUCKET, "Key": "orig.pt"})
            for key in ("work.pt.bak", "work.pt.copy"):
                client.delete_object(Bucket=BUCKET, Key=key)

        cases: dict[str, list[dict[str, Any]]] = {}
        if opts.cases in ("all", "multi"):
            multi_cases(server, client, tmp, opts, migrations, cli, env, cases)
        if opts.cases in ("all", "stream"):
            changed = chain(tmp / "stream", MAP_ONE)
            for _ in range(opts.repeat):
                restore()
                cases.setdefault("upgrade (one 16 MiB tensor's values changed, backup KEY.bak)", []).append(timed(
                    server, [sys.executable, "-c", MEASURED, "upgrade", url, "--from", "c1", "--migrations",
                             str(changed), "--json"], env))
                restore()
                client.delete_object(Bucket=OTHER, Key="out.pt")
                cases.setdefault("upgrade -o s3://another-bucket/... (the same change, a new object)", []).append(
                    timed(server, [sys.executable, "-c", MEASURED, "upgrade", url, "-o", f"s3://{OTHER}/out.pt",
                                   "--from", "c1", "--migrations", str(changed), "--json"], env))
        for _ in range(opts.repeat if opts.cases in ("all", "zip") else 0):
            restore()
            cases.setdefault("inspect", []).append(timed(server, [*cli, "inspect", url, "--json"], env))
            restore()
            cases.setdefault("upgrade (rename, --no-backup)", []).append(timed(
                server, [*cli, "upgrade", url, "--from", "c1", "--migrations", str(migrations), "--no-backup",
                         "--json"], env))
            restore()
            cases.setdefault("upgrade (rename, backup KEY.bak)", []).append(timed(
                server, [*cli, "upgrade", url, "--from", "c1", "--migrations", str(migrations), "--json"], env))
            restore()
            cases.setdefault("upgrade -o s3://... (rename, a new object)", []).append(timed(
                server, [*cli, "upgrade", url, "-o", f"s3://{BUCKET}/work.pt.copy", "--from", "c1", "--migrations",
                         str(migrations), "--json"], env))
            restore()
            cases.setdefault("stamp --digest (every byte read, the tail sent)", []).append(
                timed(server, [*cli, "stamp", url, "--digest"], env))
            cases.setdefault("verify (streamed, nothing on disk)", []).append(timed(server, [*cli, "verify", url], env))
            restore()
            cases.setdefault("naive: download, torch.load, rename, torch.save, upload", []).append(timed(
                server, [sys.executable, "-c", NAIVE, BUCKET, "work.pt", str(tmp / "naive.pt")], env))
            for leftover in tmp.glob("naive.pt*"):
                leftover.unlink()
            restore()
            copy = ("import sys, boto3; boto3.client('s3').copy_object(Bucket=sys.argv[1], Key='work.pt.copy', "
                    "CopySource={'Bucket': sys.argv[1], 'Key': 'work.pt'})")
            cases.setdefault("server-side copy_object", []).append(timed(server, [sys.executable, "-c", copy,
                                                                                  BUCKET], env))
            restore()
            cases.setdefault("download + upload (aws s3 cp style)", []).append(timed(
                server, [sys.executable, "-c", ROUNDTRIP, BUCKET, "work.pt", str(tmp / "rt.pt")], env))
            (tmp / "rt.pt").unlink(missing_ok=True)
        rows = []
        for name, runs in cases.items():
            rows.append({"case": name, "median_s": statistics.median(r["seconds"] for r in runs),
                         "client_cpu_s": statistics.median(r["client_cpu"] for r in runs),
                         "server_cpu_s": statistics.median(r["server_cpu"] for r in runs),
                         "received_bytes": max(r["received_by_client"] for r in runs),
                         "sent_bytes": max(r["sent_by_client"] for r in runs),
                         "requests": max(r["requests"] for r in runs)})
            if "peak_rss_kib" in runs[0]:
                rows[-1].update(peak_rss_kib=max(r["peak_rss_kib"] for r in runs),
                                disk_written=max(r["disk_written"] for r in runs))
    server.stop()
    print(f"checkpoint: {size / 2**20:.0f} MiB torch zip, {tensors} tensors; moto S3 on 127.0.0.1; "
          f"{opts.repeat} repeat(s), median wall time")
    print()
    print("| case | wall (s) | client CPU (s) | server CPU (s) | received | sent | requests |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['case']} | {row['median_s']:.2f} | {row['client_cpu_s']:.2f} | {row['server_cpu_s']:.2f} | "
              f"{_size(row['received_bytes'])} | {_size(row['sent_bytes'])} | {row['requests']} |")
    measured = [row for row in rows if "peak_rss_kib" in row]
    if measured:
        print()
        print("| case | peak RSS | written to local disk |")
        print("| --- | ---: | ---: |")
        for row in measured:
            print(f"| {row['case']} | {_size(row['peak_rss_kib'] << 10)} | {_size(row['disk_written'])} |")
    if opts.json:
        opts.json.write_text(json.dumps({"size_bytes": size, "tensors": tensors, "rows": rows}, indent=2))


def multi_cases(server: S3Server, client: Any, tmp: Path, opts: argparse.Namespace, migrations: Path,
                cli: list[str], env: dict[str, str], cases: dict[str, list[dict[str, Any]]]) -> None:
    """inspect and a rename in place of a safetensors object, a sharded model and a DCP directory;
    each put back from a pristine copy (server-side, untimed) before each run."""
    build_multi(tmp, opts.size_mb, opts.tensor_mb)
    uploads = {"st/model.safetensors": tmp / "model.safetensors"}
    for kind in ("hf", "dcp"):
        uploads.update({f"{kind}/{p.name}": p for p in (tmp / kind).iterdir()})
    for key, path in uploads.items():
        client.upload_file(str(path), BUCKET, f"orig/{key}")

    def restore() -> None:
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix="work/").get("Contents", [])
        for obj in listing:
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
        for key in uploads:
            client.copy_object(Bucket=BUCKET, Key=f"work/{key}", CopySource={"Bucket": BUCKET, "Key": f"orig/{key}"})

    upgrade = ["upgrade", "--from", "c1", "--migrations", str(migrations), "--no-backup", "--json"]
    targets = {"safetensors object": f"s3://{BUCKET}/work/st/model.safetensors",
               "sharded model (4 shards)": f"s3://{BUCKET}/work/hf", "DCP directory": f"s3://{BUCKET}/work/dcp"}
    for _ in range(opts.repeat):
        for label, url in targets.items():
            restore()
            cases.setdefault(f"inspect, {label}", []).append(timed(server, [*cli, "inspect", url, "--json"], env))
            cases.setdefault(f"upgrade rename in place, {label}", []).append(
                timed(server, [*cli, upgrade[0], url, *upgrade[1:]], env))


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


if __name__ == "__main__":
    main()
