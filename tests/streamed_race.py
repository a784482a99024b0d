"""Another writer, for tests/test_remote_streamed_migration.py: replaces an object in the GCS
emulator or Azurite (named by the environment, as the CLI under test is) from inside a migration."""

from __future__ import annotations

import os


def put(store: str, key: str, path: str) -> None:
    """Upload the file at ``path`` over ``key`` in the bucket (container) ``ckpts``."""
    with open(path, "rb") as fh:
        body = fh.read()
    if store == "gs":
        from google.cloud import storage

        client = storage.Client.create_anonymous_client()
        client._connection.API_BASE_URL = os.environ["STORAGE_EMULATOR_HOST"]
        client.bucket("ckpts").blob(key).upload_from_string(body)
    else:
        from azure.storage.blob import ContainerClient

        container = ContainerClient.from_connection_string(os.environ["AZURE_STORAGE_CONNECTION_STRING"], "ckpts")
        container.upload_blob(key, body, overwrite=True)
