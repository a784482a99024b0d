"""A real Ray cluster for a test module: ``ray start --head`` on 127.0.0.1 with 2 CPUs, in its own
session, ready when it says so, killed as a process group at the end whatever happened."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
#: One cluster at a time on this machine: test files run in parallel processes (pytest-xdist), and
#: two 2-CPU clusters on two cores starve each other's workers and client servers.
ONE_AT_A_TIME = Path(tempfile.gettempdir()) / "ckptmigrate-tests-ray.lock"
#: What cuts the cluster's start-up and noise: no usage report, no dashboard, no driver logs.
QUIET = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "RAY_DEDUP_LOGS": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    def __init__(self, gcs: int, client: int) -> None:
        self.gcs, self.client = gcs, client

    @property
    def executor(self) -> str:
        return f"ray://127.0.0.1:{self.client}"

    @property
    def env(self) -> dict[str, str]:
        return {**QUIET, "RAY_ADDRESS": f"127.0.0.1:{self.gcs}"}


@contextlib.contextmanager
def ray_head(env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A 2-CPU head node whose processes (and so its workers) have this environment plus ``env``.
    Its temporary directory is a short one of its own: Ray's Unix sockets live there, and a socket
    path may not exceed 107 bytes (pytest's temporary directories, per xdist worker, are deeper)."""
    with open(ONE_AT_A_TIME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        with _head(env) as cluster:
            yield cluster


@contextlib.contextmanager
def _head(env: dict[str, str] | None) -> Iterator[Cluster]:
    gcs, client = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ckm-ray-")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--ray-client-server-port={client}", "--num-cpus=2",
         "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **QUIET, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # blocks until the next line: the event is the head saying it is up
            seen.append(line)
            if "Ray runtime started" in line:
                break
        else:
            raise AssertionError("ray start exited:\n" + "".join(seen))
        yield Cluster(gcs, client)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
