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

    with _serving() as port:
        connection = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};"
                      f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
        client = BlobServiceClient.from_connection_string(connection)
        yield {"AZURE_STORAGE_CONNECTION_STRING": connection}, client.create_container(container)


@contextlib.contextmanager
def running_https(certs: Path, container: str = "ckpts") -> Iterator[tuple[dict[str, str], Any]]:
    """Azurite over HTTPS (a self-signed certificate for 127.0.0.1 written to ``certs``), reached as a
    real account is: by its name and host, with no credential yet (the caller adds a key or a SAS).
    Yields that environment and a ContainerClient on ``container`` (created)."""
    from azure.storage.blob import BlobServiceClient

    cert, key = _self_signed(certs)
    with _serving("--cert", str(cert), "--key", str(key)) as port:
        account = f"https://127.0.0.1:{port}/devstoreaccount1"
        trust = {"SSL_CERT_FILE": str(cert), "REQUESTS_CA_BUNDLE": str(cert)}  # aiohttp's and requests' CA
        client = BlobServiceClient(account, credential={"account_name": "devstoreaccount1", "account_key": KEY},
                                   connection_verify=str(cert))
        yield ({**trust, "AZURE_STORAGE_ACCOUNT_NAME": "devstoreaccount1",
                "FSSPEC_AZ_ACCOUNT_HOST": f"127.0.0.1:{port}/devstoreaccount1"},
               client.create_container(container))


@contextlib.contextmanager
def _serving(*options: str) -> Iterator[int]:
    """An Azurite Blob service on a free port of 127.0.0.1, ready; stopped at the end."""
    if not AZURITE.exists():
        pytest.fail(f"{AZURITE} is missing: scripts/setup.sh installs Azurite with npm")
    port = free_port()
    proc = subprocess.Popen([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                             "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", *options],
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
        yield port
    finally:
        proc.terminate()
        proc.wait()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, its own CA, and its key, as PEM files in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "azurite.pem", directory / "azurite-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
