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


@pytest.mark.parametrize("kind", ["dcp", "hf"])
def test_a_rename_that_loses_a_race_writes_nothing(cli: Cli, s3: S3Server, bucket: dict[str, Any],
                                                   tmp_path: Path, kind: str) -> None:
    """The migration script is the other writer: it replaces ``.metadata`` (the index) after this
    run read it."""
    name = bucket["name"]
    commit = ".metadata" if kind == "dcp" else "model.safetensors.index.json"
    theirs = (bucket[kind] / commit).read_bytes().replace(b"layers.7", b"layers.8")
    (tmp_path / "theirs.bin").write_bytes(theirs)
    code = (f"_put({name!r}, '{kind}/{commit}', {str(tmp_path / 'theirs.bin')!r}); "
            "ckpt.rename('layers.0.weight', 'embed.weight')")
    extra = ("import boto3, os\n\n\ndef _put(bucket, key, path):\n"
             "    boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL']).upload_file(path, bucket, key)\n")
    migrations = chain(tmp_path, code, extra)
    before = objects(s3, name)
    proc = cli("upgrade", f"s3://{name}/{kind}/", "--from", "c1", "--migrations", migrations)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "the object changed since it was read" in proc.stderr, proc.stderr
    assert f"s3://{name}/{kind}/{commit}" in proc.stderr
    left = objects(s3, name)
    assert get(s3, name, f"{kind}/{commit}") == theirs  # the other writer's object stands
    assert not [k for k in left if ".bak" in k or ".ckptmigrate-" in k], left
    assert {k: v for k, v in left.items() if not k.endswith(commit)} == {
        k: v for k, v in before.items() if not k.endswith(commit)}


def test_what_object_storage_cannot_do_yet_is_one_line(cli: Cli, s3: S3Server, bucket: dict[str, Any],
                                                      tmp_path: Path) -> None:
    name = bucket["name"]
    before = objects(s3, name)
    casts = chain(tmp_path, "ckpt.cast('layers.1.weight', 'float16')")
    for url in (f"s3://{name}/hf/", f"s3://{name}/dcp/"):
        migrations, what = casts, "changes tensor bytes"
        proc = cli("upgrade", url, "--from", "c1", "--migrations", migrations)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
        assert url in proc.stderr and what in proc.stderr and "aws s3 sync" in proc.stderr, proc.stderr
    for args in (("compact", f"s3://{name}/dcp"), ("upgrade", f"s3://{name}/hf", "-o", f"s3://{name}/out/"),
                 ("upgrade", f"s3://{name}/hf", "--max-shard-size", "1GB")):
        proc = cli(*args, "--from", "c1", "--migrations", casts) if args[0] == "upgrade" else cli(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert f"s3://{name}/" in proc.stderr and "aws s3 sync" in proc.stderr, proc.stderr
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


@pytest.fixture
def big_shards(s3: S3Server, tmp_path: Path) -> dict[str, Any]:
    """Three 6 MiB safetensors shards and their index under ``hf/`` (S3's least part is 5 MiB)."""
    name = s3.new_bucket("shards", tmp_path)
    torch.manual_seed(9)
    state = {f"layers.{i}.weight": torch.randn(6 << 18) for i in range(3)}  # 6 MiB each
    local = tmp_path / "hf"
    local.mkdir()
    save_torch_state_dict(state, str(local), max_shard_size="7MB")
    for path in local.iterdir():
        s3.client().upload_file(str(path), name, f"hf/{path.name}")
    s3.served.reset()
    return {"name": name, "state": state, "local": local}


def load_shards(s3: S3Server, bucket: str) -> dict[str, torch.Tensor]:
    """What a reader through the index gets: every tensor the index names, from the shard it names."""
    from safetensors.torch import load

    index = json.loads(get(s3, bucket, "hf/model.safetensors.index.json"))
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load(get(s3, bucket, f"hf/{shard}"))  # KeyError-free: a missing shard raises here
        out.update((k, tensors[k]) for k, s in index["weight_map"].items() if s == shard)
    return out


def test_a_sharded_rename_in_place_moves_5_mib_per_changed_shard(cli: Cli, s3: S3Server, big_shards: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    name, state = big_shards["name"], big_shards["state"]
    before = objects(s3, name)
    migrations = chain(tmp_path, "ckpt.rename('layers.0.weight', 'embed.weight')")
    row = one(cli, "upgrade", f"s3://{name}/hf/", "--from", "c1", "--migrations", migrations, "--no-backup")
    received = s3.served.body_bytes_received
    assert row["written"] is True and row["backup"] is None, row
    after = objects(s3, name)
    changed = {k for k in after if after[k] != before.get(k)}
    # one shard held the renamed tensor: its new object, the index (the journal came and went)
    assert changed == {"hf/model.safetensors.index.json", "hf/model-00001-of-00003.safetensors"}, changed
    assert set(after) == set(before)
    index = get(s3, name, "hf/model.safetensors.index.json")
    five = 5 << 20
    # sent: the shard's first part (5 MiB), the journal, the placeholder and the new index (a few KiB)
    assert five < row["transfer"]["bytes_sent"] <= received < five + 16 * 1024 + 3 * len(index), (row, received)
    loaded = load_shards(s3, name)
    assert set(loaded) == {"embed.weight", "layers.1.weight", "layers.2.weight"}
    assert torch.equal(loaded["embed.weight"], state["layers.0.weight"])
    assert cli("current", f"s3://{name}/hf").stdout.strip() == "c2"
    # back down, with a backup: the index and the changed shard are kept as KEY.bak, server-side copies
    upgraded = {k: get(s3, name, k) for k in changed}
    down = one(cli, "downgrade", f"s3://{name}/hf/", "--to", "c1", "--migrations", migrations)
    assert down["backup"] == f"s3://{name}/hf/model.safetensors.index.json.bak", down
    assert {k: get(s3, name, k + ".bak") for k in changed} == upgraded
    assert set(load_shards(s3, name)) == set(state)


CRASH = """
import os, sys
from ckptmigrate.storage import prefix_write
rewritten = []
real = prefix_write._replace_header
def once_then_die(shard, head):
    if rewritten:
        os._exit(9)  # killed between two shards: no clean-up runs
    rewritten.append(shard.key)
    real(shard, head)
prefix_write._replace_header = once_then_die
from ckptmigrate.cli import main
main(sys.argv[1:], prog_name="ckptmigrate")
"""


def test_a_run_killed_between_shards_is_refused_by_readers_then_recovered(
        cli: Cli, s3: S3Server, big_shards: dict[str, Any], tmp_path: Path) -> None:
    import sys

    name, state = big_shards["name"], big_shards["state"]
    original = {k: get(s3, name, k) for k in objects(s3, name)}
    migrations = chain(tmp_path, "ckpt.rename_regex(r'^layers\\.', 'blocks.')")
    url = f"s3://{name}/hf/"
    killed = subprocess.run([sys.executable, "-c", CRASH, "upgrade", url, "--from", "c1", "--migrations",
                             str(migrations), "--no-backup"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=os.environ)
    assert killed.returncode == 9, killed.stderr
    # the first shard has its new header, the others the old: a mix, but the index is the placeholder,
    # which names only a shard that does not exist, so no reader loads any of it
    shard1 = "hf/model-00001-of-00003.safetensors"
    assert get(s3, name, shard1) != original[shard1]
    assert get(s3, name, "hf/model-00002-of-00003.safetensors") == original["hf/model-00002-of-00003.safetensors"]
    with pytest.raises(Exception, match="NoSuchKey|Not Found|404"):
        load_shards(s3, name)
    refused = cli("inspect", url.rstrip("/"))
    assert refused.returncode == 2 and "ckptmigrate-header-rewrite-in-progress" in refused.stderr, refused.stderr
    assert [k for k in objects(s3, name) if ".ckptmigrate-headers." in k]  # its journal
    # the next run puts the old headers and index back, then migrates: the result, whole
    again = cli("upgrade", url, "--from", "c1", "--migrations", migrations, "--no-backup")
    assert again.returncode == 0, again.stderr
    loaded = load_shards(s3, name)
    assert set(loaded) == {f"blocks.{i}.weight" for i in range(3)}
    assert all(torch.equal(loaded[f"blocks.{i}.weight"], state[f"layers.{i}.weight"]) for i in range(3))
    assert not [k for k in objects(s3, name) if ".ckptmigrate-headers." in k]


def test_a_killed_run_recovered_then_downgraded_is_the_original(
        cli: Cli, s3: S3Server, big_shards: dict[str, Any], tmp_path: Path) -> None:
    """Recovery restores: after a kill, a downgrade to where the model already is gives back every
    original byte of every shard and of the index."""
    import sys

    name = big_shards["name"]
    original = {k: get(s3, name, k) for k in objects(s3, name)}
    migrations = chain(tmp_path, "ckpt.rename_regex(r'^layers\\.', 'blocks.')")
    url = f"s3://{name}/hf/"
    killed = subprocess.run([sys.executable, "-c", CRASH, "upgrade", url, "--from", "c1", "--migrations",
                             str(migrations), "--no-backup"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=os.environ)
    assert killed.returncode == 9, killed.stderr
    stay = cli("upgrade", url, "--from", "c1", "--to", "c1", "--migrations", migrations, "--no-backup")
    assert stay.returncode == 0, stay.stderr
    assert {k: get(s3, name, k) for k in objects(s3, name)} == original


def test_stamping_a_prefix_writes_only_its_index_or_envelope(cli: Cli, s3: S3Server, bucket: dict[str, Any]) -> None:
    name = bucket["name"]
    before = objects(s3, name)
    for kind in ("hf", "dcp"):
        proc = cli("stamp", f"s3://{name}/{kind}", "--tag", "run=7")
        assert proc.returncode == 0, proc.stderr
        info = json.loads(cli("inspect", f"s3://{name}/{kind}", "--json").stdout)
        assert info["stamped"] is True and '"run": "7"' in json.dumps(info), info
    after = objects(s3, name)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {"hf/model.safetensors.index.json", *[k for k in after if k.startswith("dcp/.ckptmigrate-")]}
    assert set(before) <= set(after)
    assert s3.served.body_bytes_received < 16 * 1024  # the index and an envelope, nothing else


def test_a_missing_shard_or_a_truncated_distcp_is_one_line(cli: Cli, s3: S3Server, bucket: dict[str, Any]) -> None:
    name = bucket["name"]
    client = s3.client()
    client.delete_object(Bucket=name, Key="hf/model-00003-of-00008.safetensors")
    distcp = get(s3, name, "dcp/__0_0.distcp")
    client.put_object(Bucket=name, Key="dcp/__0_0.distcp", Body=distcp[: len(distcp) // 2])
    for url, what in ((f"s3://{name}/hf", "model-00003-of-00008.safetensors, which is missing"),
                      (f"s3://{name}/dcp", "torch.distributed.checkpoint")):
        proc = cli("inspect", url)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert url in proc.stderr and what in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


DCP_CRASH = """
import os, sys
from ckptmigrate.storage import s3_compose
real = s3_compose.put
def die_at_the_switch(obj, body):
    if obj.key.endswith("/.metadata"):
        os._exit(9)  # killed after the new envelope was put, before .metadata: no clean-up runs
    return real(obj, body)
s3_compose.put = die_at_the_switch
from ckptmigrate.cli import main
main(sys.argv[1:], prog_name="ckptmigrate")
"""


def test_a_dcp_run_killed_before_its_switch_leaves_the_original_loadable(
        cli: Cli, s3: S3Server, bucket: dict[str, Any], tmp_path: Path) -> None:
    import sys

    name, migrations = bucket["name"], chain(tmp_path)
    original_md = get(s3, name, "dcp/.metadata")
    url = f"s3://{name}/dcp/"
    killed = subprocess.run([sys.executable, "-c", DCP_CRASH, "upgrade", url, "--from", "c1", "--migrations",
                             str(migrations)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=os.environ)
    assert killed.returncode == 9, killed.stderr
    # the new envelope is there, named for a .metadata that is not: nothing reads it
    [orphan] = [k for k in objects(s3, name) if k.startswith("dcp/.ckptmigrate-")]
    assert get(s3, name, "dcp/.metadata") == original_md
    assert cli("current", f"s3://{name}/dcp").stdout.strip() == "unstamped"
    assert set(load_dcp(s3, name, "dcp", tmp_path, list(weights()))) == set(weights())
    # the next run writes that name again and switches
    again = cli("upgrade", url, "--from", "c1", "--migrations", migrations)
    assert again.returncode == 0, again.stderr
    assert [k for k in objects(s3, name) if k.startswith("dcp/.ckptmigrate-")] == [orphan]
    assert cli("current", f"s3://{name}/dcp").stdout.strip() == "c2"
