"""User story: "My checkpoints are in a bucket (or behind https); I inspect them without downloading them."

A real moto S3 server and a real HTTP server that honours ``Range``, both on 127.0.0.1, count the
bytes they serve: ``inspect``, ``current`` and ``diff`` of a checkpoint of several MiB read its zip
directory, local headers and ``data.pkl`` (or the safetensors header), a few dozen KiB, and say so
in ``--json`` (``transfer``, which must equal what the server counted). The answers are the same as
for the local copy; a glob over a bucket lists the objects; credentials in a URL are never shown.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.objectstores import HttpServer, S3Server, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]
TENSOR = 512 * 1024  # bytes per tensor: a read of tensor bytes would show at once


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server, tmp_path: Path) -> dict[str, Any]:
    """A bucket holding a torch zip (24 tensors of 512 KiB) and a safetensors file, and the local copies."""
    name = s3.new_bucket("ckpts", tmp_path)
    client = s3.client()
    torch.manual_seed(0)
    state = {f"blocks.{i}.weight": torch.randn(TENSOR // 4) for i in range(24)}
    zip_path = tmp_path / "model.pt"
    torch.save(state, zip_path)
    st_path = tmp_path / "model.safetensors"
    save_file(state, str(st_path))
    client.upload_file(str(zip_path), name, "runs/a/model.pt")
    client.upload_file(str(zip_path), name, "runs/b/model.pt")
    client.upload_file(str(st_path), name, "runs/a/model.safetensors")
    s3.served.reset()
    return {"name": name, "zip": zip_path, "st": st_path}


def run_json(cli: Cli, *args: str) -> Any:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def without(info: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in keys}


def test_inspect_of_an_object_reads_the_directory_not_the_tensors(cli: Cli, s3: S3Server,
                                                                  bucket: dict[str, Any]) -> None:
    url = f"s3://{bucket['name']}/runs/a/model.pt"
    remote = run_json(cli, "inspect", url)
    served = s3.served.body_bytes_sent
    local = run_json(cli, "inspect", str(bucket["zip"]))
    size = bucket["zip"].stat().st_size
    assert without(remote, "path", "transfer") == without(local, "path", "transfer")
    assert remote["path"] == url
    # the server's count, not ckptmigrate's, bounds what was read: less than two tensors' worth of a 12 MiB file
    assert served < 2 * TENSOR < size / 10, (served, size)
    # ...and no tensor bytes at all: the last 64 KiB (end records, directory, data.pkl) and one small
    # read per local header, however the records lie
    assert served < 64 * 1024 + 24 * 1024, served
    assert remote["transfer"]["bytes_received"] == served
    assert remote["transfer"]["bytes_sent"] == 0


def test_safetensors_current_and_diff_read_headers_only(cli: Cli, s3: S3Server, bucket: dict[str, Any]) -> None:
    url = f"s3://{bucket['name']}/runs/a/model.safetensors"
    remote = run_json(cli, "inspect", url)
    assert remote["container"] == "safetensors" and remote["tensors"] == 24
    assert s3.served.body_bytes_sent < 2 * TENSOR
    s3.served.reset()
    proc = cli("current", url)
    assert proc.returncode == 0 and proc.stdout.strip() == "unstamped", proc.stderr
    proc = cli("diff", f"s3://{bucket['name']}/runs/a/model.pt", url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["a"] == f"s3://{bucket['name']}/runs/a/model.pt"
    assert s3.served.body_bytes_sent < 4 * TENSOR


def test_a_glob_over_the_bucket_names_every_object(cli: Cli, bucket: dict[str, Any]) -> None:
    infos = run_json(cli, "inspect", f"s3://{bucket['name']}/runs/**/*.pt")
    assert [i["path"] for i in infos] == [f"s3://{bucket['name']}/runs/{d}/model.pt" for d in "ab"]
    prefix = run_json(cli, "inspect", f"s3://{bucket['name']}/runs/")
    assert {i["path"] for i in prefix} == {f"s3://{bucket['name']}/runs/{p}" for p in
                                           ("a/model.pt", "b/model.pt", "a/model.safetensors")}
    proc = cli("inspect", f"s3://{bucket['name']}/nothing/*.pt")
    assert proc.returncode == 2 and "matches no object" in proc.stderr


@pytest.fixture
def web(tmp_path: Path) -> Iterator[HttpServer]:
    root = tmp_path / "www"
    root.mkdir()
    server = HttpServer(root).start()
    yield server
    server.stop()


def test_https_style_reads_by_range_with_credentials_kept_out_of_the_output(cli: Cli, tmp_path: Path,
                                                                            web: HttpServer) -> None:
    torch.save({f"w{i}": torch.randn(TENSOR // 4) for i in range(16)}, tmp_path / "www" / "m.pt")
    size = (tmp_path / "www" / "m.pt").stat().st_size
    secret_url = web.url.replace("http://", "http://alice:s3cr3t@") + "/m.pt?token=TOPSECRET"
    proc = cli("inspect", secret_url, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["path"] == web.url + "/m.pt" and info["tensors"] == 16
    assert "s3cr3t" not in proc.stdout + proc.stderr and "TOPSECRET" not in proc.stdout + proc.stderr
    assert web.served.body_bytes_sent < 2 * TENSOR < size / 5
    assert all("bytes=" in line for line in web.served.log), web.served.log
    missing = cli("inspect", secret_url.replace("/m.pt", "/gone.pt"))
    assert missing.returncode == 2 and "no such object" in missing.stderr
    assert "s3cr3t" not in missing.stderr and "TOPSECRET" not in missing.stderr
    assert missing.stderr.count("\n") == 1


def test_a_file_url_is_a_local_path(cli: Cli, bucket: dict[str, Any]) -> None:
    info = run_json(cli, "inspect", bucket["zip"].as_uri())
    assert info["tensors"] == 24 and "transfer" not in info


def test_the_python_api_takes_urls_too(s3: S3Server, bucket: dict[str, Any]) -> None:
    from ckptmigrate import api

    url = f"s3://{bucket['name']}/runs/b/model.pt"
    assert [str(p) for p in api.checkpoint_files(f"s3://{bucket['name']}/runs/b/*.pt")] == [url]
    assert api.inspect(url)["tensors"] == 24
    assert api.current(url)["stamped"] is False
    assert os.fspath(api.checkpoint_files(url)[0]) == url
