"""Digest algorithms on a ~1 GiB checkpoint: blake3 vs hashlib's sha256, through ckptmigrate's own
digest code (integrity.compute: pread in 1 MiB chunks, hash) and on the raw file.

    .venv/bin/python scripts/bench_digest.py [--size-mb 1024] [--repeat 3] [--workdir DIR]

Prints medians: seconds and GiB/s per case, plus ``-j 2`` verify of two copies (threads).
The checkpoint is a safetensors file of float32 tensors of random bytes, written once and kept
in the page cache by a first untimed read, so the figures are hashing, not the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.release import integrity
from ckptmigrate.release.manifest import parallel


def build(path: Path, size_mb: int) -> None:
    """A safetensors file of 64 MiB float32 tensors, written without torch."""
    n, chunk = max(1, size_mb // 64), 64 << 20
    header: dict[str, object] = {}
    for i in range(n):
        span = [i * chunk, (i + 1) * chunk]
        header[f"layer.{i}.weight"] = {"dtype": "F32", "shape": [chunk // 4], "data_offsets": span}
    encoded = json.dumps(header).encode()
    encoded += b" " * ((-len(encoded)) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)) + encoded)
        for _ in range(n):
            fh.write(os.urandom(chunk))


def raw_hash(path: Path, make: Callable[[], object]) -> None:
    h: object = make()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [view]):
            h.update(view[:n])  # type: ignore[attr-defined]
    finally:
        os.close(fd)


def digest(path: Path, alg: str) -> None:
    with Checkpoint.open(path) as ckpt:
        integrity.compute(ckpt, alg=alg)


def timed(fn: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "bench.safetensors"
        build(path, args.size_mb)
        copy = Path(tmp) / "copy.safetensors"
        os.link(path, copy)
        size = path.stat().st_size
        raw_hash(path, hashlib.md5)  # warm the page cache
        from blake3 import blake3

        cases: dict[str, tuple[Callable[[], object], int]] = {
            "raw file, sha256": (lambda: raw_hash(path, hashlib.sha256), size),
            "raw file, blake3": (lambda: raw_hash(path, blake3), size),
            "integrity.compute, sha256": (lambda: digest(path, "sha256"), size),
            "integrity.compute, blake3": (lambda: digest(path, "blake3"), size),
            "2 files -j 2, sha256": (lambda: list(parallel(lambda p: digest(p, "sha256"), [path, copy], 2)), 2 * size),
            "2 files -j 2, blake3": (lambda: list(parallel(lambda p: digest(p, "blake3"), [path, copy], 2)), 2 * size),
        }
        print(f"{size / 2**30:.2f} GiB file, {os.cpu_count()} CPUs, medians of {args.repeat}")
        for name, (fn, nbytes) in cases.items():
            seconds = timed(fn, args.repeat)
            print(f"  {name:28s} {seconds:7.3f} s  {nbytes / seconds / 2**30:6.2f} GiB/s")


if __name__ == "__main__":
    main()
