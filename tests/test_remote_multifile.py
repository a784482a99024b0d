"""User story: "My sharded models and DCP checkpoints live under prefixes in a bucket; I inspect,
diff and plan them without downloading them, and rename keys of a DCP checkpoint in place without a
single ``.distcp`` byte crossing the network."

Against a real moto S3 server on 127.0.0.1, through the CLI as a subprocess. The server counts the
bytes it serves and receives: reading a prefix fetches the index / ``.metadata`` / envelope objects
and each shard's header (each DCP chunk's zip records), never the tensors; a DCP rename sends the
new ``.metadata`` and envelope and nothing else. A run that loses to another writer (the other
writer is the migration script itself, so the race is exact) fails in one line and leaves nothing.
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
import torch.distributed.checkpoint as dcp
from huggingface_hub import save_torch_state_dict

from tests.objectstores import S3Server, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]
TENSOR = 512 * 1024  # bytes per tensor: a read of tensor bytes would show at once
COUNT = 8


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return {f"layers.{i}.weight": torch.randn(TENSOR // 4) for i in range(COUNT)}


def chain(tmp_path: Path, code: str = "ckpt.rename('layers.0.weight', 'embed.weight')", extra: str = "") -> Path:
    """c1 (base) -> c2 (``code``)."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, body in (("c1", None, "pass"), ("c2", "c1", code)):
        (versions / f"{rev}.py").write_text(f'"""{rev}."""\n{extra}\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
                                            f"def upgrade(ckpt):\n    {body}\n")
    return versions.parent


@pytest.fixture
def bucket(s3: S3Server, tmp_path: Path) -> dict[str, Any]:
    """A bucket holding the same weights as 8 HF safetensors shards (``hf/``) and as a DCP
    directory (``dcp/``), and the local copies."""
    name = s3.new_bucket("multi", tmp_path)
    state = weights()
    hf, ckpt = tmp_path / "hf", tmp_path / "dcp"
    hf.mkdir()
    save_torch_state_dict(state, str(hf), max_shard_size="1MB")  # one 512 KiB tensor a shard
    dcp.save(state, checkpoint_id=str(ckpt))  # one process: __0_0.distcp
    client = s3.client()
    for local in (hf, ckpt):
        for path in local.iterdir():
            client.upload_file(str(path), name, f"{local.name}/{path.name}")
    s3.served.reset()
    return {"name": name, "hf": hf, "dcp": ckpt}


def run_json(cli: Cli, *args: str | os.PathLike[str]) -> Any:
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def one(cli: Cli, *args: str | os.PathLike[str]) -> dict[str, Any]:
    """The one row of a command given a prefix ending in ``/`` (``inspect`` lists what a prefix names)."""
    out = run_json(cli, *args)
    [row] = out if isinstance(out, list) else [out]
    return dict(row)


def objects(s3: S3Server, bucket: str) -> dict[str, str]:
    """Every key in the bucket and its ETag."""
    listing = s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in listing}


def get(s3: S3Server, bucket: str, key: str) -> bytes:
    return bytes(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def without(info: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in keys}


@pytest.mark.parametrize("kind", ["hf", "dcp"])
def test_inspect_of_a_prefix_reads_headers_not_tensors(cli: Cli, s3: S3Server, bucket: dict[str, Any],
                                                      kind: str) -> None:
    url = f"s3://{bucket['name']}/{kind}"
    remote = one(cli, "inspect", f"{url}/", "--keys")
    served = s3.served.body_bytes_sent
    local = run_json(cli, "inspect", bucket[kind], "--keys")
    assert without(remote, "path", "transfer") == without(local, "path", "transfer")
    assert remote["path"] == url and remote["tensors"] == COUNT
    # the server also sent listings of the prefix (XML), which ckptmigrate does not count as object bytes
    assert 0 < remote["transfer"]["bytes_received"] <= served and remote["transfer"]["bytes_sent"] == 0
    total = sum(p.stat().st_size for p in bucket[kind].iterdir())
    # each shard's header (a 4 KiB read) or each chunk's zip records (4 KiB at each edge), and the
    # small files: far less than one tensor's 512 KiB of the 4 MiB
    assert served < COUNT * 8 * 1024 + 16 * 1024 < TENSOR < total, (served, total)
    # the index (or .metadata) object named alone is the same checkpoint
    commit = "model.safetensors.index.json" if kind == "hf" else ".metadata"
    assert without(run_json(cli, "inspect", f"{url}/{commit}", "--keys"), "transfer") == without(remote, "transfer")


def test_diff_and_a_dry_run_of_prefixes_write_nothing(cli: Cli, s3: S3Server, bucket: dict[str, Any],
                                                           tmp_path: Path) -> None:
    hf, ckpt = f"s3://{bucket['name']}/hf", f"s3://{bucket['name']}/dcp"
    before = objects(s3, bucket["name"])
    diff = run_json(cli, "diff", hf, ckpt)
    assert diff["a"] == hf and diff["b"] == ckpt and diff["same"] is True, diff
    migrations = chain(tmp_path)
    for url in (hf, ckpt):
        row = one(cli, "upgrade", f"{url}/", "--from", "c1", "--migrations", migrations, "--dry-run")
        assert row["written"] is False and row["revisions"] == ["c2"], row
        assert row["transfer"]["bytes_sent"] == 0
    assert s3.served.body_bytes_sent < 4 * COUNT * 8 * 1024 < TENSOR
    assert s3.served.body_bytes_received == 0 and objects(s3, bucket["name"]) == before


def load_dcp(s3: S3Server, bucket: str, prefix: str, tmp_path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The prefix copied down and read by torch's own ``dcp.load`` under ``names``."""
    local = tmp_path / "down"
    local.mkdir(exist_ok=True)
    for key in objects(s3, bucket):
        if key.startswith(prefix + "/"):
            (local / key[len(prefix) + 1:]).write_bytes(get(s3, bucket, key))
    state = {n: torch.empty(TENSOR // 4) for n in names}
    dcp.load(state, checkpoint_id=str(local))
    return state


def test_a_dcp_rename_in_place_sends_only_metadata_and_envelope(cli: Cli, s3: S3Server, bucket: dict[str, Any],
                                                                tmp_path: Path) -> None:
    name, migrations = bucket["name"], chain(tmp_path)
    before = objects(s3, name)
    original_md = get(s3, name, "dcp/.metadata")
    row = one(cli, "upgrade", f"s3://{name}/dcp/", "--from", "c1", "--migrations", migrations)
    assert row["written"] is True and row["backup"] == f"s3://{name}/dcp/.metadata.bak", row
    after = objects(s3, name)
    new_md = get(s3, name, "dcp/.metadata")
    [envelope] = [k for k in after if k.startswith("dcp/.ckptmigrate-")]
    # what crossed the network towards the server: the new .metadata and its envelope, nothing else
    assert s3.served.body_bytes_received == len(new_md) + len(get(s3, name, envelope))
    assert row["transfer"]["bytes_sent"] == s3.served.body_bytes_received
    assert after["dcp/__0_0.distcp"] == before["dcp/__0_0.distcp"]  # no .distcp byte moved
    assert get(s3, name, "dcp/.metadata.bak") == original_md
    assert cli("current", f"s3://{name}/dcp").stdout.strip() == "c2"
    names = ["embed.weight", *[f"layers.{i}.weight" for i in range(1, COUNT)]]
    loaded = load_dcp(s3, name, "dcp", tmp_path, names)
    expected = weights()
    assert torch.equal(loaded["embed.weight"], expected["layers.0.weight"])
    assert all(torch.equal(loaded[n], expected[n]) for n in names[1:])
    # and back, without a backup: the stale envelope goes, the .metadata is the original's again
    down = cli("downgrade", f"s3://{name}/dcp/", "--to", "c1", "--migrations", migrations, "--no-backup")
    assert down.returncode == 0, down.stderr
    final = objects(s3, name)
    assert envelope not in final and get(s3, name, "dcp/.metadata") != new_md
    assert cli("current", f"s3://{name}/dcp").stdout.strip() == "c1"
    assert set(load_dcp(s3, name, "dcp", tmp_path, list(expected))) == set(expected)


def test_a_dcp_rename_that_loses_a_race_writes_nothing(cli: Cli, s3: S3Server, bucket: dict[str, Any],
                                                       tmp_path: Path) -> None:
    """The migration script is the other writer: it replaces ``.metadata`` after this run read it."""
    name = bucket["name"]
    other = tmp_path / "other"
    dcp.save({"x": torch.zeros(3)}, checkpoint_id=str(other))
    theirs = (other / ".metadata").read_bytes()
    (tmp_path / "theirs.bin").write_bytes(theirs)
    code = (f"_put({name!r}, 'dcp/.metadata', {str(tmp_path / 'theirs.bin')!r}); "
            "ckpt.rename('layers.0.weight', 'embed.weight')")
    extra = ("import boto3, os\n\n\ndef _put(bucket, key, path):\n"
             "    boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL']).upload_file(path, bucket, key)\n")
    migrations = chain(tmp_path, code, extra)
    proc = cli("upgrade", f"s3://{name}/dcp/", "--from", "c1", "--migrations", migrations)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "the object changed since it was read" in proc.stderr, proc.stderr
    assert f"s3://{name}/dcp/.metadata" in proc.stderr
    left = objects(s3, name)
    assert get(s3, name, "dcp/.metadata") == theirs  # the other writer's object stands
    assert not [k for k in left if ".bak" in k or ".ckptmigrate-" in k], left


def test_what_object_storage_cannot_do_yet_is_one_line(cli: Cli, s3: S3Server, bucket: dict[str, Any],
                                                      tmp_path: Path) -> None:
    name = bucket["name"]
    before = objects(s3, name)
    renames = chain(tmp_path / "r")
    scales = chain(tmp_path / "s", "ckpt.cast('layers.1.weight', 'float16')")
    for url, migrations, what in ((f"s3://{name}/hf/", renames, "rewrites shard headers"),
                                  (f"s3://{name}/dcp/", scales, "changes tensor bytes")):
        proc = cli("upgrade", url, "--from", "c1", "--migrations", migrations)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
        assert url in proc.stderr and what in proc.stderr and "aws s3 sync" in proc.stderr, proc.stderr
    assert objects(s3, name) == before


def test_a_safetensors_rename_sends_a_new_header_and_copies_the_rest(cli: Cli, s3: S3Server, tmp_path: Path) -> None:
    """A 24 MiB safetensors object: the new header and the first 5 MiB are sent (S3's least part),
    the rest is copied server-side; a reader sees the old object or the new one."""
    from safetensors.torch import load, save_file

    name = s3.new_bucket("st", tmp_path)
    torch.manual_seed(7)
    big = {f"blocks.{i}.weight": torch.randn(1024 * 1024) for i in range(6)}  # 4 MiB each
    save_file(big, str(tmp_path / "m.safetensors"))
    original = (tmp_path / "m.safetensors").read_bytes()
    s3.client().upload_file(str(tmp_path / "m.safetensors"), name, "m.safetensors")
    s3.served.reset()
    migrations = chain(tmp_path, "ckpt.rename('blocks.0.weight', 'stem.weight')")
    row = one(cli, "upgrade", f"s3://{name}/m.safetensors", "--from", "c1", "--migrations", migrations)
    received, sent = s3.served.body_bytes_received, s3.served.body_bytes_sent
    assert row["written"] is True and row["backup"] == f"s3://{name}/m.safetensors.bak", row
    new = get(s3, name, "m.safetensors")
    loaded = load(new)
    assert torch.equal(loaded["stem.weight"], big["blocks.0.weight"]) and set(loaded) == {
        "stem.weight", *[f"blocks.{i}.weight" for i in range(1, 6)]}
    assert get(s3, name, "m.safetensors.bak") == original
    five = 5 << 20
    # sent to the server: one 5 MiB part (the header, then data bytes) and the complete's list of parts;
    # read from it: the old header and those data bytes; the rest was copied inside the server (the backup too)
    assert row["transfer"]["bytes_sent"] == five <= received < five + 1024
    assert five <= sent < five + 64 * 1024 < len(original) / 4
    assert row["transfer"]["bytes_copied_server_side"] == len(original) + len(new) - five
    assert cli("current", f"s3://{name}/m.safetensors").stdout.strip() == "c2"
