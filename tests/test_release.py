"""User story: "I release checkpoints from CI: stamped from a clean commit, signed, and anyone can
check that what they downloaded is what we released."

Every rejection is shown on a real file tampered with the way an accident or an attacker would: a
flipped bit in a tensor record of a torch zip file and of a safetensors file, an edited envelope
field, two keys' tensors swapped, a digest recomputed after editing tensors, another key's
signature, a stripped signature. A release of several checkpoints is stamped, signed and verified
through ``scripts/release_stamp.py`` in a real git repository; a dirty tree is refused; an upgrade
of a signed checkpoint leaves it honestly unsigned, its old signature kept in the history.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CREPE, LPIPS, ROOT
from safetensors.torch import save_file

from ckptmigrate import api
from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.example import model_at
from ckptmigrate.formats import torchzip
from ckptmigrate.release import integrity, signing
from ckptmigrate.tensors.refs import ITEMSIZE

Cli = Callable[..., subprocess.CompletedProcess[str]]
MIGRATIONS = ROOT / "migrations"
RELEASE_SCRIPT = ROOT / "scripts" / "release_stamp.py"


# --- helpers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two key pairs: ours (a) and someone else's (b)."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        signing.keygen(d / f"{name}.pem", d / f"{name}.pub")
        out[name], out[f"{name}_pub"] = d / f"{name}.pem", d / f"{name}.pub"
    return out


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return model_at(6).state_dict()


def signed_zip(tmp_path: Path, keys: dict[str, Path], payload: Any = None, name: str = "m.pt") -> Path:
    path = tmp_path / name
    torch.save(state_dict() if payload is None else payload, path)
    api.stamp(path, sign=keys["a"], tags={"run": "42"})
    return path


def signed_safetensors(tmp_path: Path, keys: dict[str, Path]) -> Path:
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict().items()}, path)
    api.stamp(path, sign=keys["a"])
    return path


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ (1 << bit)]))


def tensor_offset(path: Path, key: str) -> tuple[int, int]:
    """(absolute offset, nbytes) of a tensor's bytes in the file, from ckptmigrate's own reader."""
    with Checkpoint.open(path) as ckpt:
        ref: Any = ckpt.tensors()[key]
        return ref.storage.offset + ref.storage_offset * ITEMSIZE[ref.dtype], ref.nbytes


def envelope_of(path: Path) -> dict[str, Any]:
    with Checkpoint.open(path) as ckpt:
        assert ckpt.container.envelope is not None
        return ckpt.container.envelope


def rewrite_zip_envelope(path: Path, env: dict[str, Any]) -> None:
    """Replace the envelope record of a torch zip file in place (what an editor of the JSON does)."""
    with open(path, "r+b") as fh:
        torchzip.append_records(fh, {torchzip.ENVELOPE_RECORD: torchzip.envelope_bytes(env)})


def rewrite_safetensors_envelope(path: Path, env: dict[str, Any]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["ckptmigrate"] = json.dumps(env, sort_keys=True)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * ((-len(encoded)) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def verify(path: Path, key: Path | None = None) -> integrity.VerifyResult:
    return integrity.verify(path, key)


# --- digests over every container -----------------------------------------------------------------


def test_digest_is_stable_across_stamp_for_every_container_and_layout(tmp_path: Path) -> None:
    sd = state_dict()
    tied = {"emb": torch.randn(8, 4), "bias": torch.zeros(3)}
    tied["head"] = tied["emb"]                      # tied weights share one storage
    tied["col"] = tied["emb"][:, 1]                 # a strided view: covers part of the storage
    lightning = {"state_dict": sd, "epoch": 3, "hyper": {"lr": 0.1, "name": "x", "betas": (0.9, 0.99)},
                 "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}]}
    torch.save(sd, tmp_path / "bare.pt")
    torch.save(tied, tmp_path / "tied.pt")
    torch.save(lightning, tmp_path / "lightning.ckpt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "st.safetensors")
    for name in ("bare.pt", "tied.pt", "lightning.ckpt", "legacy.pt", "st.safetensors"):
        path = tmp_path / name
        api.stamp(path, digest=True)
        result = verify(path)
        assert result.ok, (name, result.problems)
        assert result.signature == "absent" and result.digest == envelope_of(path)["digest"]["overall"]
        # a plain re-stamp without --digest keeps the tensors; the old digest goes into history
        api.stamp(path)
        env = envelope_of(path)
        assert env["digest"] is None and env["history"][-1]["superseded"]["digest"] == result.digest


def test_real_files_from_other_projects(real_file: Callable[[str], Path], keys: dict[str, Path]) -> None:
    for name in (LPIPS, CREPE):
        path = real_file(name)
        api.stamp(path, sign=keys["a"])
        result = verify(path, keys["a_pub"])
        assert result.ok, (name, result.problems)


def test_sha256_digests_verify_too(tmp_path: Path) -> None:
    """The algorithm is recorded; verify follows it, so a sha256-only policy stays possible."""
    path = tmp_path / "m.pt"
    torch.save(state_dict(), path)
    with Checkpoint.open(path) as ckpt:
        digest = integrity.compute(ckpt, alg="sha256")
        env = Envelope.build(ckpt.state_dict.entries, layout=ckpt.layout.name)
        env.digest = digest
        ckpt.write(path, env)
    assert digest["overall"].startswith("sha256:") and verify(path).ok


def test_old_envelopes_without_digest_fields_still_load() -> None:
    old = {"format_version": 1, "schema": {}, "arch_hash": "sha256:x", "layout": "bare", "devices": []}
    env = Envelope.from_dict(old)
    assert env.digest is None and env.signature is None


# --- tampering: every rejection ---------------------------------------------------------------------


def test_one_flipped_bit_in_a_torch_zip_tensor_record_is_caught_and_named(
    tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    path = signed_zip(tmp_path, keys)
    pristine = path.read_bytes()
    keys_to_try = ["layers.0.attn.q.weight", "head.weight", "temperature"]
    for key in keys_to_try:
        offset, nbytes = tensor_offset(path, key)
        for where, bit in ((0, 0), (nbytes - 1, 7), (nbytes // 2, 3)):
            path.write_bytes(pristine)
            flip_bit(path, offset + where, bit)
            result = verify(path, keys["a_pub"])
            assert not result.ok and result.changed == [key], (key, where, result.problems)
    proc = cli("verify", path, "--public-key", keys["a_pub"])
    assert proc.returncode == 1 and "temperature" in proc.stderr and "FAILED" in proc.stderr
    path.write_bytes(pristine)
    assert cli("verify", path, "--public-key", keys["a_pub"]).returncode == 0


def test_one_flipped_byte_in_a_safetensors_tensor_is_caught(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    path = signed_safetensors(tmp_path, keys)
    offset, nbytes = tensor_offset(path, "head.bias")
    flip_bit(path, offset + nbytes - 1, 5)
    proc = cli("verify", path, "--public-key", keys["a_pub"], "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["files"][0]["changed"] == ["head.bias"] and not report["ok"]


def test_an_edited_metadata_field_is_caught_by_the_signature(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    path = signed_zip(tmp_path, keys)
    env = envelope_of(path)
    env["tags"]["run"] = "43"
    rewrite_zip_envelope(path, env)
    assert envelope_of(path)["tags"]["run"] == "43"
    for args in (["--public-key", keys["a_pub"]], []):  # also without a pinned key: the recorded key checks it
        proc = cli("verify", path, *args)
        assert proc.returncode == 1 and "metadata or the recorded digest changed" in proc.stderr

    st = signed_safetensors(tmp_path, keys)
    env = envelope_of(st)
    env["revision"] = "9999"
    rewrite_safetensors_envelope(st, env)
    result = verify(st, keys["a_pub"])
    assert not result.ok and result.signature == "invalid"


def test_edited_tensors_with_a_recomputed_digest_are_caught_by_the_signature(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    path = signed_zip(tmp_path, keys)
    offset, _ = tensor_offset(path, "head.weight")
    flip_bit(path, offset)
    env = envelope_of(path)
    with Checkpoint.open(path) as ckpt:
        env["digest"] = integrity.compute(ckpt)  # the attacker updates the digest, not the signature
    rewrite_zip_envelope(path, env)
    result = verify(path, keys["a_pub"])
    assert not result.ok and not result.changed and result.signature == "invalid"


def test_two_keys_tensors_swapped_are_both_named(tmp_path: Path, keys: dict[str, Path]) -> None:
    path = signed_zip(tmp_path, keys)
    env = envelope_of(path)
    sd = torch.load(path)
    a, b = "layers.0.attn.q.weight", "layers.0.attn.k.weight"
    sd[a], sd[b] = sd[b], sd[a]
    torch.save(sd, path)
    rewrite_zip_envelope(path, env)  # the original envelope, signature and all
    result = verify(path, keys["a_pub"])
    assert not result.ok and sorted(result.changed) == sorted([a, b])


def test_changed_extras_are_caught(tmp_path: Path, keys: dict[str, Path]) -> None:
    path = signed_zip(tmp_path, keys, payload={"state_dict": state_dict(), "epoch": 3})
    env = envelope_of(path)
    torch.save({"state_dict": torch.load(path)["state_dict"], "epoch": 4}, path)
    rewrite_zip_envelope(path, env)
    result = verify(path)
    assert not result.ok and result.payload_changed and not result.changed


def test_another_keys_signature_is_rejected(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    path = tmp_path / "m.pt"
    torch.save(state_dict(), path)
    assert cli("stamp", path, "--sign", keys["b"]).returncode == 0
    proc = cli("verify", path, "--public-key", keys["a_pub"])
    assert proc.returncode == 1 and "signed by another key" in proc.stderr
    # re-signed by someone else after a change: valid on its own, rejected against our key
    assert verify(path).ok and verify(path, keys["b_pub"]).ok


def test_a_removed_signature_fails_when_a_key_is_required(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    path = signed_zip(tmp_path, keys)
    env = envelope_of(path)
    env["signature"] = None
    rewrite_zip_envelope(path, env)
    proc = cli("verify", path, "--public-key", keys["a_pub"])
    assert proc.returncode == 1 and "unsigned; a signature is required" in proc.stderr
    assert cli("verify", path).returncode == 0  # without a key the digest alone is checked


# --- the CLI: bad input, batches ----------------------------------------------------------------------


def test_bad_input_exits_2_with_one_line(tmp_path: Path, keys: dict[str, Path], cli: Cli) -> None:
    path = signed_zip(tmp_path, keys)
    (tmp_path / "empty").mkdir()
    cases = [
        ("verify", tmp_path / "empty"),                               # a directory without checkpoints
        ("verify", path, "--public-key", keys["a"]),                       # a private key where a public one goes
        ("verify", path, "--public-key", tmp_path / "nope.pub"),
        ("verify", tmp_path / "missing.pt"),
        ("verify", "--manifest", tmp_path / "nope.json"),
        ("keygen", keys["a"], tmp_path / "x.pub"),                  # never overwrites a key
        ("stamp", path, "--sign", keys["a_pub"]),
    ]
    private_key = keys["a"].read_bytes()
    for args in cases:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert keys["a"].read_bytes() == private_key and not (tmp_path / "x.pub").exists()


def test_a_batch_goes_on_past_bad_files_and_exit_code_reflects_them(
    tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    good = [signed_zip(ckpts, keys, name=f"g{i}.pt") for i in range(3)]
    (ckpts / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save(state_dict(), ckpts / "unstamped.pt")
    proc = cli("verify", ckpts, "--public-key", keys["a_pub"], "-j", "2")
    assert proc.returncode == 1
    assert "5 files: 3 ok, 2 failed" in proc.stdout
    assert "garbage.pt: FAILED" in proc.stderr and "unstamped.pt: FAILED: unstamped" in proc.stderr
    assert all(f"{g}: OK" in proc.stdout for g in good)
    assert cli("verify", str(ckpts / "g[0-9].pt"), "--public-key", keys["a_pub"]).returncode == 0


def test_a_batch_stamp_in_parallel_signs_the_good_files_and_names_the_bad(
    tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    good = [ckpts / f"g{i}.pt" for i in range(4)]
    for i, path in enumerate(good):
        torch.save({"w": torch.full((64,), float(i))}, path)
    (ckpts / "garbage.pt").write_bytes(b"not a checkpoint at all")
    proc = cli("stamp", ckpts, "--sign", keys["a"], "--tag", "batch=1", "-j", "2")
    assert proc.returncode == 2, proc.stderr
    assert "5 files: 4 stamped, 1 failed" in proc.stdout
    assert [line.split(": FAILED")[0] for line in proc.stderr.splitlines()] == [str(ckpts / "garbage.pt")]
    assert proc.stdout.splitlines()[:4] == [f"stamped {p}" for p in good]  # in input order, whatever finished first
    verified = cli("verify", *good, "--public-key", keys["a_pub"])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for i, path in enumerate(good):
        assert torch.equal(torch.load(path)["w"], torch.full((64,), float(i)))


# --- a release ---------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}
    subprocess.run(["git", *args], cwd=repo, check=True, env=env, capture_output=True)


def test_a_release_is_stamped_signed_listed_and_verified(git_repo: Path, keys: dict[str, Path], cli: Cli) -> None:
    ckpts = git_repo / "checkpoints"
    (ckpts / "sub").mkdir(parents=True)
    torch.save(state_dict(), ckpts / "model.pt")
    torch.save({"state_dict": state_dict(), "epoch": 7}, ckpts / "sub" / "trainer.ckpt")
    save_file({k: v.contiguous() for k, v in state_dict().items()}, ckpts / "model.safetensors")
    proc = subprocess.run(
        [sys.executable, RELEASE_SCRIPT, "checkpoints", "--release", "1.4.0", "--sign", keys["a"], "--tag", "ci=1"],
        cwd=git_repo, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=git_repo, capture_output=True, text=True).stdout.strip()
    manifest_path = ckpts / "release-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["release"] == "1.4.0" and manifest["commit"] == commit
    assert sorted(e["file"] for e in manifest["files"]) == ["model.pt", "model.safetensors", "sub/trainer.ckpt"]
    for entry in manifest["files"]:
        env = envelope_of(ckpts / entry["file"])
        assert env["tags"] == {"release": "1.4.0", "ci": "1"}
        assert env["history"][-1]["action"] == "release" and env["history"][-1]["commit"] == commit
        assert entry["digest"] == env["digest"]["overall"] and entry["commit"] == env["git"]["commit"] == commit
        assert entry["arch_hash"] == env["arch_hash"]
        assert entry["signed_by"] == env["signature"]["public_key_fingerprint"]

    ok = cli("verify", "--manifest", manifest_path, "--public-key", keys["a_pub"])
    assert ok.returncode == 0, ok.stderr
    assert "3 files: 3 ok, 0 failed" in ok.stdout
    assert cli("verify", "--manifest", manifest_path, "--public-key", keys["b_pub"]).returncode == 1

    # a stripped signature fails even without --key: the signed manifest says who signed
    env = envelope_of(ckpts / "model.pt")
    env["signature"] = None
    rewrite_zip_envelope(ckpts / "model.pt", env)
    stripped = cli("verify", "--manifest", manifest_path)
    assert stripped.returncode == 1 and "model.pt: FAILED: signed_by None differs" in stripped.stderr

    # a tampered file, then a missing one, then an edited manifest
    offset, _ = tensor_offset(ckpts / "model.safetensors", "head.weight")
    flip_bit(ckpts / "model.safetensors", offset)
    (ckpts / "sub" / "trainer.ckpt").unlink()
    bad = cli("verify", "--manifest", manifest_path, "--public-key", keys["a_pub"], "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    failed = {Path(f["path"]).name: f["problems"] for f in report["files"] if not f["ok"]}
    assert set(failed) == {"model.pt", "model.safetensors", "trainer.ckpt"}
    assert "missing" in failed["trainer.ckpt"][0] and "head.weight" in failed["model.safetensors"][0]
    manifest["files"] = [e for e in manifest["files"] if e["file"] != "sub/trainer.ckpt"]
    manifest_path.write_text(json.dumps(manifest))
    edited = cli("verify", "--manifest", manifest_path, "--public-key", keys["a_pub"])
    assert edited.returncode == 1 and "manifest" in edited.stderr and "does not match" in edited.stderr


def test_a_dirty_tree_is_refused_unless_allowed(git_repo: Path, keys: dict[str, Path], cli: Cli) -> None:
    ckpts = git_repo / "checkpoints"
    ckpts.mkdir()
    torch.save(state_dict(), ckpts / "a.pt")
    (git_repo / "model.py").write_text("# model, edited and not committed\n")
    before = (ckpts / "a.pt").read_bytes()
    proc = cli("stamp", ckpts / "a.pt", "--release", "2.0", "--sign", keys["a"], cwd=git_repo)
    assert proc.returncode == 2 and "uncommitted changes" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    script = subprocess.run([sys.executable, RELEASE_SCRIPT, "checkpoints", "--release", "2.0", "--sign", keys["a"]],
                            cwd=git_repo, capture_output=True, text=True, timeout=120)
    assert script.returncode == 2 and "uncommitted changes" in script.stderr
    assert (ckpts / "a.pt").read_bytes() == before and not (ckpts / "release-manifest.json").exists()

    allowed = cli("stamp", ckpts / "a.pt", "--release", "2.0", "--allow-dirty", "--repo", git_repo, cwd=git_repo)
    assert allowed.returncode == 0, allowed.stderr
    env = envelope_of(ckpts / "a.pt")
    assert env["git"]["dirty"] is True and env["tags"]["release"] == "2.0" and env["digest"] is not None

    _git(git_repo, "commit", "-qam", "edit")
    clean = cli("stamp", ckpts / "a.pt", "--release", "2.0", "--repo", git_repo)
    assert clean.returncode == 0, clean.stderr


# --- provenance across a migration -------------------------------------------------------------------


def test_upgrading_a_signed_checkpoint_leaves_it_unsigned_with_the_old_signature_in_history(
    tmp_path: Path, keys: dict[str, Path], cli: Cli
) -> None:
    path = tmp_path / "era1.pt"
    torch.save(model_at(1).state_dict(), path)
    cli("stamp", path, "--revision", "0001", "--migrations", MIGRATIONS, "--sign", keys["a"], check=True)
    signed = envelope_of(path)
    assert cli("verify", path, "--public-key", keys["a_pub"]).returncode == 0

    cli("upgrade", path, "--migrations", MIGRATIONS, check=True)
    env = envelope_of(path)
    assert env["revision"] == "0006" and env["signature"] is None and env["digest"] is None
    first_step = next(h for h in env["history"] if h.get("action") == "upgrade")
    assert first_step["superseded"]["signature"] == signed["signature"]
    assert first_step["superseded"]["digest"] == signed["digest"]["overall"]
    proc = cli("verify", path, "--public-key", keys["a_pub"])
    assert proc.returncode == 1 and "no digest recorded" in proc.stderr and "unsigned" in proc.stderr

    cli("stamp", path, "--sign", keys["a"], check=True)
    assert cli("verify", path, "--public-key", keys["a_pub"]).returncode == 0
    backup = path.with_name(path.name + ".bak")
    assert cli("verify", backup, "--public-key", keys["a_pub"]).returncode == 0  # the original is untouched
