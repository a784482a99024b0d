"""Azurite (Microsoft's Azure Storage emulator, the Blob service, in memory; installed from npm by
scripts/setup.sh) on 127.0.0.1 at a free port, for the az:// tests. The account is Azurite's
well-known development account, named by ``AZURE_STORAGE_CONNECTION_STRING`` as for a real one.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.objectstores import free_port

AZURITE = Path(__file__).resolve().parent.parent / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
#: Azurite's published development account key (not a secret; a real key is treated the same).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@contextlib.contextmanager
def running(container: str = "ckpts") -> Iterator[tuple[dict[str, str], Any]]:
    """Azurite serving; yields the environment naming it and a ContainerClient on ``container`` (created)."""
    from azure.storage.blob import BlobServiceClient  # the tests' own look at the container

    if not AZURITE.exists():
        pytest.fail(f"{AZURITE} is missing: scripts/setup.sh installs Azurite with npm")
    port = free_port()
    proc = subprocess.Popen([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                             "--inMemoryPersistence", "--skipApiVersionCheck", "--loose"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # ready when it says so (or it exited: the loop ends)
            seen.append(line)
            if "successfully listens" in line:
                break
        else:
            pytest.fail("Azurite did not start: " + "".join(seen))
        # its access log goes on: read it away so a full pipe never stalls the server
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        connection = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};"
                      f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
        client = BlobServiceClient.from_connection_string(connection)
        yield {"AZURE_STORAGE_CONNECTION_STRING": connection}, client.create_container(container)
    finally:
        proc.terminate()
        proc.wait()
