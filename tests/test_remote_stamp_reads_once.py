"""User story: "Stamping a checkpoint in a bucket reads its metadata once, not once per look at it."

``ckptmigrate stamp URL`` looks at the object twice before it writes (the revision it was at, then
the checkpoint to stamp); the second look is served from what the first fetched, as long as the
object is still the one read. Counted on the wire, through a TCP proxy in front of the GCS
emulator on 127.0.0.1: a stamp receives less than a look at the object (``current``), a full
read of its metadata (``inspect``) and a look at the stamped object together — it did not read
the directory twice.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from tests.objectstores import CountingProxy, free_port, restore_env, set_env

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def gcs() -> Iterator[tuple[dict[str, str], Any, CountingProxy]]:
    from gcp_storage_emulator.server import create_server
    from google.cloud import storage  # the test's own look at the bucket, not through the proxy

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="ckpts")
    server.start()
    proxy = CountingProxy(port)
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{proxy.port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    old = set_env(env)
    try:
        client = storage.Client.create_anonymous_client()
        client._connection.API_BASE_URL = f"http://127.0.0.1:{port}"
        yield env, client.bucket("ckpts"), proxy
    finally:
        restore_env(old)
        proxy.stop()
        server.stop()


def received(cli: Cli, proxy: CountingProxy, env: dict[str, str], *args: str) -> int:
    proxy.reset()
    proc = cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proxy.down


def test_a_stamp_reads_the_directory_once(cli: Cli, gcs: tuple[dict[str, str], Any, CountingProxy]) -> None:
    env, bucket, proxy = gcs
    buf = io.BytesIO()
    torch.save({f"layers.{i}.weight": torch.zeros(8) for i in range(3000)}, buf)  # a directory of ~170 KiB
    bucket.blob("k.pt").upload_from_string(buf.getvalue())
    url = "gs://ckpts/k.pt"
    look = received(cli, proxy, env, "current", url)  # the directory and the envelope: one look
    whole = received(cli, proxy, env, "inspect", url)  # the directory and data.pkl: the read a stamp needs
    stamped = received(cli, proxy, env, "stamp", url)
    after = received(cli, proxy, env, "current", url)  # the look at the stamped object a stamp ends with
    assert look > 500 << 10  # the directory, and the local headers beside it
    # the stamp also streams the object to its new generation; a second read of the directory (one
    # more look) would take it past the sum
    assert stamped < look + whole + after, (stamped, look, whole, after)
