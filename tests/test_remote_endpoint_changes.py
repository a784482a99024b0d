"""User story: "In one Python process (a notebook, a test session) I point ckptmigrate at another
storage server by its environment variable, and it talks to that one."

fsspec keeps one filesystem per backend and options; gcsfs and adlfs read their endpoint from the
environment when one is made. ckptmigrate names that endpoint among the options, so a changed
``STORAGE_EMULATOR_HOST`` or ``AZURE_STORAGE_CONNECTION_STRING`` makes a new filesystem, with no
cache to clear. Two GCS emulators and two Azurite servers on 127.0.0.1, one after the other, each
holding a different checkpoint under the same name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from ckptmigrate import api
from tests import azurite
from tests.objectstores import restore_env, running_gcs, set_env

Server = Callable[[], contextlib.AbstractContextManager[tuple[dict[str, str], Callable[[bytes], None]]]]


@contextlib.contextmanager
def gcs() -> Iterator[tuple[dict[str, str], Callable[[bytes], None]]]:
    with running_gcs() as (env, bucket):
        yield env, lambda data: bucket.blob("k.pt").upload_from_string(data)


@contextlib.contextmanager
def az() -> Iterator[tuple[dict[str, str], Callable[[bytes], None]]]:
    with azurite.running() as (env, container):
        yield env, lambda data: container.upload_blob("k.pt", data)


@pytest.mark.parametrize(("scheme", "server"), [("gs", gcs), ("az", az)])
def test_the_server_the_environment_names_now_is_the_one_read(scheme: str, server: Server, tmp_path: Path) -> None:
    expected, seen = [], []
    for key in ("first.weight", "second.weight"):
        local = tmp_path / f"{key}.pt"
        torch.save({key: torch.zeros(4)}, local)
        expected.append(api.inspect(local)["arch_hash"])
        with server() as (env, put):
            put(local.read_bytes())
            old = set_env(env)
            try:
                seen.append(api.inspect(f"{scheme}://ckpts/k.pt")["arch_hash"])
            finally:
                restore_env(old)
    assert expected[0] != expected[1] and seen == expected
