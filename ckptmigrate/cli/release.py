"""The release commands, ``keygen`` and ``verify``: thin click commands over :mod:`ckptmigrate.release.integrity`
and :mod:`ckptmigrate.release.manifest`, registered on the main group by :func:`register`.

``verify`` exits 0 when every file checks out, 1 naming each file and tensor that did not, and 2 for
bad input (a missing key, an unreadable manifest, a PATH that does not exist). The public key is
``--public-key``; ``--key`` names where the state dict sits, as on every other command. With
``--manifest`` it also reports checkpoint files in the manifest's directory that the manifest does
not list (a failure with ``--strict``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ckptmigrate.cli.common import JSON, LOCATION, fleet_options, fleet_run
from ckptmigrate.errors import BadInput
from ckptmigrate.util.progress import file_bar
from ckptmigrate.util.urls import as_location, is_remote


@click.command()
@click.argument("private", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("public", type=click.Path(path_type=Path, dir_okay=False))
def keygen(private: Path, public: Path) -> None:
    """Create an Ed25519 key pair for signing checkpoints (PEM files; never overwrites)."""
    from ckptmigrate import api

    fp = api.keygen(private, public)
    click.echo(f"wrote {private} (private, mode 600) and {public}; fingerprint {fp}")


def _line(r: Any) -> str:
    if not r.ok:
        return f"{r.path}: FAILED: " + "; ".join(r.problems)
    if r.signature == "valid":
        who = f"signed by {r.signed_by}" + ("" if r.pinned else " (key not pinned: pass --public-key)")
    else:
        who = "unsigned"
    return f"{r.path}: OK ({r.tensors} tensors, {r.digest}, {who})"


def _public_key_given_as_key(value: str | None) -> bool:
    """``--key`` names the state dict everywhere; a PEM file given there is the old ``verify --key``."""
    if value is None or not Path(value).is_file():
        return False
    with open(value, "rb") as fh:
        return fh.read(64).lstrip().startswith(b"-----BEGIN")


@click.command()
@click.argument("paths", nargs=-1)
@click.option("--public-key", "pubkey", type=LOCATION,
              help="Public key: every file must carry a valid signature by it.")
@click.option("--manifest", type=LOCATION,
              help="Release manifest: check every file it lists (relative to the manifest).")
@JSON
@click.option("--key", "state_key", default=None, metavar="LOCATION",
              help="Where the state dict sits in the payload, as on every command (the public key is --public-key).")
@click.option("--strict", is_flag=True,
              help="With --manifest: fail when the manifest's directory holds checkpoint files it does not list.")
@fleet_options
def verify(paths: tuple[str, ...], pubkey: Path | None, manifest: Path | None, as_json: bool,
           state_key: str | None, strict: bool, **fleet: Any) -> None:
    """Recompute digests and check signatures of stamped checkpoints (files, directories, globs)."""
    from ckptmigrate import api
    from ckptmigrate.release import integrity, signing

    if _public_key_given_as_key(state_key):
        raise BadInput(f"{state_key}: a key file given as --key, which names where the state dict sits on every "
                       f"command; pass the public key as --public-key {state_key}")
    if not paths and manifest is None:
        raise BadInput("verify needs PATH... or --manifest")
    if strict and manifest is None:
        raise BadInput("--strict checks the directory of a --manifest; give --manifest")
    files = api.checkpoint_files(paths) if paths else []
    for path in files:
        if not is_remote(path) and not path.exists():
            raise BadInput(f"{path}: no such file", path=path)

    watching = sys.stdout.isatty() and not as_json
    options = {"public_key": pubkey, "key": state_key}
    results: list[Any] = []
    skipped: set[str] = set()
    with file_bar("verify", files[0] if files else ".", show=watching and len(files) == 1 and manifest is None):
        for outcome in fleet_run("verify", files, options, fleet=fleet, show=watching) if files else ():
            if outcome.result == "skipped":
                skipped.add(outcome.path)
                if not as_json:
                    click.echo(f"{outcome.path}: OK in the journal, unchanged since, skipped")
                result = integrity.VerifyResult(as_location(outcome.path), ok=True)
            else:
                result = outcome.detail if outcome.detail is not None else integrity.VerifyResult(
                    as_location(outcome.path), problems=[(outcome.error or {}).get("message", "failed")])
                if not as_json:
                    click.echo(_line(result), err=not result.ok)
            results.append(result)
    manifest_info: dict[str, Any] | None = None
    if manifest is not None:
        manifest_info, listed = api.verify_manifest(manifest, None if pubkey is None else signing.load_public_key(
            pubkey), jobs=fleet["jobs"], strict=strict)
        for result in listed:
            results.append(result)
            if not as_json:
                click.echo(_line(result), err=not result.ok)
    failed = [r for r in results if not r.ok]
    manifest_ok = manifest_info is None or manifest_info["ok"]
    if as_json:
        click.echo(json.dumps({"ok": not failed and manifest_ok, "checked": len(results), "failed": len(failed),
                               "manifest": manifest_info,
                               "files": [{**r.to_dict(), **({"skipped": True} if str(r.path) in skipped else {})}
                                         for r in results]}, indent=2))
    else:
        if manifest_info is not None:
            level = "FAILED" if strict else "WARNING"
            for item in manifest_info["unlisted"]:
                click.echo(f"{item['path']}: {level}: a {item['format']} checkpoint not listed in the manifest: "
                           "nothing vouches for it" + ("" if strict else " (--strict fails on it)"), err=True)
            state = "OK" if manifest_ok else "FAILED: " + "; ".join(manifest_info["problems"])
            who = f", signed by {manifest_info['signed_by']}" if manifest_info["signature"] == "valid" else ""
            extra = f", {len(manifest_info['unlisted'])} unlisted in its directory" if manifest_info["unlisted"] else ""
            click.echo(f"manifest {manifest}: release {manifest_info['release']}, {manifest_info['files']} files"
                       f"{extra}{who}: {state}", err=not manifest_ok)
        if len(results) > 1 or manifest_info is not None:
            click.echo(f"{len(results)} files: {len(results) - len(failed) - len(skipped)} ok, "
                       + (f"{len(skipped)} skipped (journal), " if skipped else "") + f"{len(failed)} failed")
    if failed or not manifest_ok:
        sys.exit(1)
