"""User story: "Every command I run on a file, I run on an object in my bucket: `-o` to and from it,
stamp and sign it, verify it against a key and a release manifest that live in the bucket too,
compact, convert and sanitize it, a legacy (pre-zip) torch file included."

Against a real moto S3 server on 127.0.0.1, through the CLI as a subprocess (and the API where the
loser of a race must be set up). Commands that need every byte (a digest, a signature check, a
conversion) stream the object into a temporary directory and upload what they wrote in one
conditional step; what they print names the URL, never the temporary file. A sharded model or a DCP
directory under a prefix is read by `current` (its small files) and `verify` (all of them); a shard
alone is refused in one line.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ckptmigrate import api
from ckptmigrate.errors import ObjectChanged
from ckptmigrate.release import signing
from ckptmigrate.release.manifest import stamp_release
from ckptmigrate.storage.staged import staged
from tests.objectstores import HttpServer, S3Server, running_s3

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server, tmp_path: Path) -> str:
    return s3.new_bucket("all", tmp_path)


def chain(tmp_path: Path) -> Path:
    """c1 (base) -> c2: a rename."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", "ckpt.rename('head.bias', 'out.bias')")):
        (versions / f"{rev}.py").write_text(f'"""{rev}."""\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
                                            f"def upgrade(ckpt):\n    {code}\n")
    return versions.parent


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {"body.weight": torch.randn(64, 64), "head.bias": torch.arange(4.0)}


def put_file(s3: S3Server, bucket: str, key: str, local: Path) -> bytes:
    s3.client().upload_file(str(local), bucket, key)
    return local.read_bytes()


def get(s3: S3Server, bucket: str, key: str) -> bytes:
    return bytes(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def keys(s3: S3Server, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []))


def open_uploads(s3: S3Server, bucket: str) -> list[object]:
    return list(s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def loads(data: bytes) -> dict[str, torch.Tensor]:
    return dict(torch.load(io.BytesIO(data), weights_only=True))


def test_upgrade_dash_o_to_from_and_between_buckets(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    migrations = chain(tmp_path)
    local = tmp_path / "local.pt"
    torch.save(weights(), local)
    original = local.read_bytes()
    # local -> s3
    up = cli("upgrade", local, "-o", f"s3://{bucket}/out/a.pt", "--from", "c1", "--migrations", migrations, "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["output"] == f"s3://{bucket}/out/a.pt"
    assert local.read_bytes() == original
    assert set(loads(get(s3, bucket, "out/a.pt"))) == {"body.weight", "out.bias"}
    # s3 -> s3: the source object stays as it was, no backup is made (the source is not touched)
    put_file(s3, bucket, "src.pt", local)
    both = cli("upgrade", f"s3://{bucket}/src.pt", "-o", f"s3://{bucket}/out/b.pt", "--from", "c1",
               "--migrations", migrations)
    assert both.returncode == 0, both.stderr
    assert f"written to s3://{bucket}/out/b.pt" in both.stdout and "/tmp" not in both.stdout
    assert get(s3, bucket, "src.pt") == original
    assert torch.equal(loads(get(s3, bucket, "out/b.pt"))["out.bias"], weights()["head.bias"])
    # s3 -> local
    down = cli("upgrade", f"s3://{bucket}/src.pt", "-o", tmp_path / "back.pt", "--from", "c1",
               "--migrations", migrations)
    assert down.returncode == 0, down.stderr
    assert set(torch.load(tmp_path / "back.pt", weights_only=True)) == {"body.weight", "out.bias"}
    assert cli("current", f"s3://{bucket}/out/b.pt").stdout.strip() == "c2"
    # an existing object is not overwritten unless asked, and nothing is written
    again = cli("upgrade", local, "-o", f"s3://{bucket}/out/a.pt", "--from", "c1", "--migrations", migrations)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert f"s3://{bucket}/out/a.pt: the output exists" in again.stderr
    assert keys(s3, bucket) == ["out/a.pt", "out/b.pt", "src.pt"]
    # to a scheme ckptmigrate does not write: one line, before any work
    gs = cli("upgrade", local, "-o", "https://example.invalid/m.pt", "--from", "c1", "--migrations", migrations)
    assert gs.returncode == 2 and "writing to https:// is not supported" in gs.stderr, gs.stderr
    assert open_uploads(s3, bucket) == []


def test_stamp_with_digest_and_signature_then_verify_against_a_key_in_the_bucket(
        cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    torch.save(weights(), tmp_path / "m.pt")
    original = put_file(s3, bucket, "m.pt", tmp_path / "m.pt")
    signing.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    put_file(s3, bucket, "keys/k.pub", tmp_path / "k.pub")
    url = f"s3://{bucket}/m.pt"
    stamped = cli("stamp", url, "--digest", "--sign", tmp_path / "k.pem", "--tag", "team=vision")
    assert stamped.returncode == 0, stamped.stderr
    assert stamped.stdout.strip() == f"stamped {url}"
    assert get(s3, bucket, "m.pt") != original and open_uploads(s3, bucket) == []
    info = json.loads(cli("inspect", url, "--json").stdout)
    assert info["envelope"]["tags"] == {"team": "vision"} and info["envelope"]["digest"]
    ok = cli("verify", url, "--public-key", f"s3://{bucket}/keys/k.pub", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    verdict = json.loads(ok.stdout)["files"][0]
    assert verdict["ok"] and verdict["signature"] == "valid" and verdict["path"] == url
    # a tensor changed in the bucket: the digest no longer matches; the problem names the URL
    data = loads(get(s3, bucket, "m.pt"))
    tampered = tmp_path / "t.pt"
    torch.save({**data, "body.weight": data["body.weight"] + 1}, tampered)
    local_stamped = tmp_path / "stamped.pt"
    local_stamped.write_bytes(get(s3, bucket, "m.pt"))
    # keep the envelope (and its signature), swap a tensor's bytes: as a tampering would
    raw = bytearray(local_stamped.read_bytes())
    needle = data["body.weight"].numpy().tobytes()[:64]
    at = bytes(raw).find(needle)
    raw[at] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key="m.pt", Body=bytes(raw))
    bad = cli("verify", url, "--public-key", f"s3://{bucket}/keys/k.pub")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert bad.stderr.startswith(f"{url}: FAILED") and "/tmp" not in bad.stderr, bad.stderr
    # stamp -o from a local file into the bucket
    out = cli("stamp", tmp_path / "m.pt", "-o", f"s3://{bucket}/stamped/m.pt", "--tag", "k=v")
    assert out.returncode == 0, out.stderr
    assert json.loads(cli("inspect", f"s3://{bucket}/stamped/m.pt", "--json").stdout)["envelope"]["tags"] == {"k": "v"}


def test_verify_a_release_manifest_in_the_bucket(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    (release / "sub").mkdir(parents=True)
    torch.save(weights(), release / "model.pt")
    torch.save({"state_dict": {"b": torch.ones(2)}}, release / "sub" / "trainer.ckpt")
    signing.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    _doc, failures = stamp_release([release / "model.pt", release / "sub" / "trainer.ckpt"], "1.0",
                                   manifest=release / "release-manifest.json", sign=tmp_path / "k.pem",
                                   allow_dirty=True)
    assert failures == {}
    for path in sorted(release.rglob("*")):
        if path.is_file():
            put_file(s3, bucket, f"rel/{path.relative_to(release)}", path)
    manifest = f"s3://{bucket}/rel/release-manifest.json"
    ok = cli("verify", "--manifest", manifest, "--public-key", tmp_path / "k.pub", "--strict", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["manifest"]["path"] == manifest and report["manifest"]["signature"] == "valid"
    assert sorted(f["path"] for f in report["files"]) == [f"s3://{bucket}/rel/model.pt",
                                                          f"s3://{bucket}/rel/sub/trainer.ckpt"]
    # an unsigned checkpoint dropped beside the release is named by its URL, and fails --strict
    torch.save({"x": torch.ones(1)}, tmp_path / "extra.bin")
    put_file(s3, bucket, "rel/extra.bin", tmp_path / "extra.bin")
    strict = cli("verify", "--manifest", manifest, "--public-key", tmp_path / "k.pub", "--strict")
    assert strict.returncode == 1
    assert f"s3://{bucket}/rel/extra.bin: FAILED: a torch-zip checkpoint not listed" in strict.stderr, strict.stderr


def test_compact_convert_and_sanitize_objects(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    torch.save(weights(), tmp_path / "m.pt")
    put_file(s3, bucket, "m.pt", tmp_path / "m.pt")
    url = f"s3://{bucket}/m.pt"
    for tag in ("a=1", "a=2"):  # the second stamp leaves the first one's envelope behind: dead bytes
        assert cli("stamp", url, "--tag", tag).returncode == 0
    grown = len(get(s3, bucket, "m.pt"))
    compacted = cli("compact", url)
    assert compacted.returncode == 0, compacted.stderr
    assert compacted.stdout.strip() == f"{url}: {grown:,} -> {len(get(s3, bucket, 'm.pt')):,} bytes"
    assert len(get(s3, bucket, "m.pt")) < grown
    assert json.loads(cli("inspect", url, "--json").stdout)["envelope"]["tags"] == {"a": "2"}
    # convert: object -> object in another container, the source untouched
    before = get(s3, bucket, "m.pt")
    conv = cli("convert", url, f"s3://{bucket}/m.safetensors", "--to", "safetensors")
    assert conv.returncode == 0, conv.stderr
    assert conv.stdout.strip() == f"{url} -> s3://{bucket}/m.safetensors (safetensors)"
    tensors = load_safetensors(get(s3, bucket, "m.safetensors"))
    assert torch.equal(tensors["body.weight"], weights()["body.weight"]) and get(s3, bucket, "m.pt") == before
    # several files cannot be replaced in one step on a store: one line, nothing written
    sharded = cli("convert", url, f"s3://{bucket}/sharded/", "--to", "hf-sharded")
    assert sharded.returncode == 2 and sharded.stderr.count("\n") == 1, sharded.stderr
    assert "to object storage is not supported" in sharded.stderr
    # sanitize in place: the Namespace becomes plain data, the original kept as KEY.bak
    torch.save({"state_dict": weights(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    original = put_file(s3, bucket, "ns.pt", tmp_path / "ns.pt")
    clean = cli("sanitize", f"s3://{bucket}/ns.pt", "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    row = json.loads(clean.stdout)
    assert row["weights_only"] is True and row["backup"] == f"s3://{bucket}/ns.pt.bak"
    assert row["output"] == f"s3://{bucket}/ns.pt"
    assert get(s3, bucket, "ns.pt.bak") == original
    assert torch.load(io.BytesIO(get(s3, bucket, "ns.pt")), weights_only=True)["args"] == {"lr": 0.1}
    assert open_uploads(s3, bucket) == []


def test_diff_and_check_read_objects(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    torch.save(weights(), tmp_path / "a.pt")
    torch.save({**weights(), "extra.weight": torch.ones(3)}, tmp_path / "b.pt")
    put_file(s3, bucket, "a.pt", tmp_path / "a.pt")
    put_file(s3, bucket, "b.pt", tmp_path / "b.pt")
    diff = cli("diff", f"s3://{bucket}/a.pt", f"s3://{bucket}/b.pt", "--json")
    assert diff.returncode == 0, diff.stderr
    report = json.loads(diff.stdout)
    assert report["a"] == f"s3://{bucket}/a.pt" and list(report["added"]) == ["extra.weight"]
    # check reads each named object's envelope for the scripts that ran on it
    example = Path(__file__).resolve().parents[1] / "migrations"
    check = cli("check", f"s3://{bucket}/a.pt", "--model", "ckptmigrate.example:current_model",
                "--migrations", example)
    assert check.returncode == 0 and check.stdout.startswith("ok: head"), check.stdout + check.stderr
    missing = cli("check", f"s3://{bucket}/nope.pt", "--model", "ckptmigrate.example:current_model",
                  "--migrations", example)
    assert missing.returncode == 2 and missing.stderr.startswith(f"ckptmigrate: error: s3://{bucket}/nope.pt: ")


def test_a_legacy_torch_file_in_a_bucket(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    torch.save(weights(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    original = put_file(s3, bucket, "old.pt", tmp_path / "old.pt")
    url = f"s3://{bucket}/old.pt"
    info = json.loads(cli("inspect", url, "--json").stdout)
    assert info["container"] == "torch-legacy" and info["tensors"] == 2
    up = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path))
    assert up.returncode == 0, up.stderr
    assert get(s3, bucket, "old.pt.bak") == original
    new = get(s3, bucket, "old.pt")
    assert new[:2] == b"PK"  # written as a torch zip, as on disk
    assert torch.equal(loads(new)["out.bias"], weights()["head.bias"])


def test_a_sharded_model_under_a_prefix_is_read_by_current_and_verify(cli: Cli, s3: S3Server, bucket: str,
                                                                          tmp_path: Path) -> None:
    shards = tmp_path / "hf"
    shards.mkdir()
    save_file({"a": torch.ones(2)}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.arange(3.0)}, str(shards / "model-00002-of-00002.safetensors"))
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors"}}))
    assert cli("stamp", shards, "--digest", "--tag", "run=7").returncode == 0  # stamped where it was made
    for path in shards.iterdir():
        put_file(s3, bucket, f"hf/{path.name}", path)
    prefix = f"s3://{bucket}/hf"
    s3.served.reset()
    current = cli("current", f"{prefix}/", "--json")
    assert current.returncode == 0, current.stderr
    [row] = json.loads(current.stdout)  # a prefix names many checkpoints: a list, here of one
    assert row["stamped"] is True and row["path"] == prefix
    assert s3.served.body_bytes_sent < 16 * 1024  # the index (and its envelope), not the shards
    ok = cli("verify", f"{prefix}/")
    assert ok.returncode == 0 and ok.stdout.startswith(f"{prefix}: OK (2 tensors, "), ok.stdout + ok.stderr
    # a shard's tensor bytes changed in the bucket: verify names the prefix
    shard = bytearray((shards / "model-00002-of-00002.safetensors").read_bytes())
    shard[-1] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key="hf/model-00002-of-00002.safetensors", Body=bytes(shard))
    bad = cli("verify", f"{prefix}/")
    assert bad.returncode == 1 and bad.stderr.startswith(f"{prefix}: FAILED"), bad.stdout + bad.stderr
    assert "/tmp" not in bad.stderr
    # inspect reads it by range (tests/test_remote_multifile.py); a shard alone is not rewritten: one line
    assert cli("inspect", prefix).returncode == 0
    proc = cli("stamp", f"{prefix}/model-00001-of-00002.safetensors")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{prefix}/" in proc.stderr and "multi-file checkpoint" in proc.stderr, proc.stderr
    assert len(keys(s3, bucket)) == 3 and open_uploads(s3, bucket) == []


def test_a_dcp_directory_under_a_prefix_is_read_by_current_and_verify(cli: Cli, s3: S3Server, bucket: str,
                                                                      tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    local = tmp_path / "dcp"
    dcp.save({"w": torch.ones(3), "b": torch.arange(2.0)}, checkpoint_id=str(local))  # one process, no group
    assert cli("stamp", local, "--digest", "--tag", "step=100").returncode == 0
    for path in local.iterdir():
        put_file(s3, bucket, f"ckpt/step100/{path.name}", path)
    prefix = f"s3://{bucket}/ckpt/step100"
    current = cli("current", f"s3://{bucket}/ckpt/", "--json")
    assert current.returncode == 0, current.stderr
    assert [(r["path"], r["stamped"]) for r in json.loads(current.stdout)] == [(prefix, True)]
    ok = cli("verify", f"s3://{bucket}/ckpt/")
    assert ok.returncode == 0 and ok.stdout.startswith(f"{prefix}: OK (2 tensors, "), ok.stdout + ok.stderr
    info = json.loads(cli("inspect", prefix, "--json").stdout)
    assert info["container"] == "dcp" and info["path"] == prefix and info["stamped"] is True


def test_a_staged_write_loses_to_a_writer_that_got_there_first(s3: S3Server, bucket: str, tmp_path: Path) -> None:
    torch.save(weights(), tmp_path / "m.pt")
    put_file(s3, bucket, "m.pt", tmp_path / "m.pt")
    url = f"s3://{bucket}/m.pt"
    other = tmp_path / "other.pt"
    torch.save({"other": torch.zeros(1)}, other)
    with pytest.raises(ObjectChanged, match=f"^{url}: the object changed since it was read"), \
            staged(url, backup=True) as stage:
        api.stamp(stage.source, tags={"mine": "1"})
        s3.client().put_object(Bucket=bucket, Key="m.pt", Body=other.read_bytes())  # the other writer
    assert get(s3, bucket, "m.pt") == other.read_bytes()
    assert keys(s3, bucket) == ["m.pt"]  # the backup taken for the lost write is gone
    # through the API, with the object named by URL: the result is the URL
    assert api.stamp(url, tags={"mine": "2"}) == api.checkpoint_files([url])[0]
    assert api.inspect(url)["envelope"]["tags"] == {"mine": "2"}


def test_a_new_output_object_is_written_only_where_none_appeared(s3: S3Server, bucket: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    torch.save({"w": torch.randn(6 * 256 * 1024)}, tmp_path / "big.pt")  # 6 MiB: two parts of 5 MiB
    monkeypatch.setenv("CKPTMIGRATE_S3_PART_SIZE", str(5 << 20))
    url = f"s3://{bucket}/out/big.pt"
    with staged(tmp_path / "big.pt", url) as stage:
        assert stage.output is not None
        stage.output.write_bytes(stage.source.read_bytes())
    assert get(s3, bucket, "out/big.pt") == (tmp_path / "big.pt").read_bytes()
    raced = f"s3://{bucket}/out/raced.pt"
    with pytest.raises(ObjectChanged, match=f"^{raced}: an object appeared there since the output was checked"), \
            staged(tmp_path / "big.pt", raced) as stage:
        assert stage.output is not None
        stage.output.write_bytes(stage.source.read_bytes())
        s3.client().put_object(Bucket=bucket, Key="out/raced.pt", Body=b"theirs")  # the other writer
    assert get(s3, bucket, "out/raced.pt") == b"theirs"
    assert open_uploads(s3, bucket) == []


def test_a_stamp_in_place_sends_only_the_new_tail(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save({"w": torch.randn(6 * 256 * 1024), "b": torch.zeros(3)}, tmp_path / "m.pt")  # 6 MiB
    original = put_file(s3, bucket, "m.pt", tmp_path / "m.pt")
    url = f"s3://{bucket}/m.pt"
    s3.served.reset()
    assert cli("stamp", url, "--tag", "a=1").returncode == 0
    # the directory and data.pkl read, the records copied server-side, the new tail sent
    assert s3.served.body_bytes_sent < len(original) / 4 and s3.served.body_bytes_received < 64 * 1024
    s3.served.reset()
    signed = cli("stamp", url, "--digest", "--json")
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["digest"]["overall"]
    assert s3.served.body_bytes_sent >= len(original)  # the digest hashes every byte it reads...
    assert s3.served.body_bytes_received < 64 * 1024  # ...but only the tail goes back
    assert torch.equal(loads(get(s3, bucket, "m.pt"))["w"], torch.load(tmp_path / "m.pt")["w"])
    assert open_uploads(s3, bucket) == []


def test_from_a_read_only_https_url_into_the_bucket(cli: Cli, s3: S3Server, bucket: str, tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    torch.save(weights(), served / "m.pt")
    server = HttpServer(served).start()
    try:
        url = f"{server.url}/m.pt"
        up = cli("upgrade", url, "-o", f"s3://{bucket}/from-web.pt", "--from", "c1", "--migrations", chain(tmp_path))
        assert up.returncode == 0, up.stderr
        assert set(loads(get(s3, bucket, "from-web.pt"))) == {"body.weight", "out.bias"}
        in_place = cli("stamp", url, "--tag", "a=b")  # an https:// object is never written
        assert in_place.returncode == 2 and f"{url}: writing to http:// is not supported" in in_place.stderr
    finally:
        server.stop()
