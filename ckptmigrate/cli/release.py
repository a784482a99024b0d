"""The release commands, ``keygen`` and ``verify``: thin click commands over :mod:`ckptmigrate.release.integrity`
and :mod:`ckptmigrate.release.manifest`, registered on the main group by :func:`register`.

``verify`` exits 0 when every file checks out, 1 naming each file and tensor that did not, and 2 for
bad input (a missing key, an unreadable manifest, a PATH that does not exist).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ckptmigrate.errors import BadInput, CkptMigrateError
from ckptmigrate.util.progress import file_bar


@click.command()
@click.argument("private", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("public", type=click.Path(path_type=Path, dir_okay=False))
def keygen(private: Path, public: Path) -> None:
    """Create an Ed25519 key pair for signing checkpoints (PEM files; never overwrites)."""
    from ckptmigrate.release import signing

    fp = signing.keygen(private, public)
    click.echo(f"wrote {private} (private, mode 600) and {public}; fingerprint {fp}")


def _bar(items: Iterator[Any], total: int, show: bool) -> Iterator[Any]:
    if not show:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc="verify", unit="file", file=sys.stderr) as bar:
        yield from bar


def _line(r: Any) -> str:
    if not r.ok:
        return f"{r.path}: FAILED: " + "; ".join(r.problems)
    if r.signature == "valid":
        who = f"signed by {r.signed_by}" + ("" if r.pinned else " (key not pinned: pass --key)")
    else:
        who = "unsigned"
    return f"{r.path}: OK ({r.tensors} tensors, {r.digest}, {who})"


@click.command()
@click.argument("paths", nargs=-1)
@click.option("--key", "pubkey", type=click.Path(path_type=Path, dir_okay=False),
              help="Public key: every file must carry a valid signature by it.")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False),
              help="Release manifest: check every file it lists (relative to the manifest).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Files verified at once (default: the number of CPUs).")
@click.option("--state-key", "state_key", default=None, help="The payload key that holds the state dict.")
def verify(paths: tuple[str, ...], pubkey: Path | None, manifest: Path | None, as_json: bool,
           jobs: int | None, state_key: str | None) -> None:
    """Recompute digests and check signatures of stamped checkpoints (files, directories, globs)."""
    from ckptmigrate.chain import engine
    from ckptmigrate.release import integrity, signing
    from ckptmigrate.release import manifest as release

    if not paths and manifest is None:
        raise BadInput("verify needs PATH... or --manifest")
    public_key = signing.load_public_key(pubkey) if pubkey is not None else None
    files = list(engine.expand_paths(paths))
    if paths and not files:
        raise BadInput(f"{', '.join(paths)}: no checkpoint files found")
    for path in files:
        if not path.exists():
            raise BadInput(f"{path}: no such file")
    doc = release.load_manifest(manifest) if manifest is not None else None

    watching = sys.stdout.isatty() and not as_json and len(files) == 1 and manifest is None

    def one(path: Path) -> integrity.VerifyResult:
        try:
            with file_bar("verify", path, show=watching):
                return integrity.verify(path, public_key, state_key=state_key)
        except CkptMigrateError as exc:  # one unreadable file never stops the rest
            return integrity.VerifyResult(path, problems=[str(exc)])

    manifest_info: dict[str, Any] | None = None
    jobs_list: list[tuple[str, Path, Any]] = [("path", p, None) for p in files]
    if doc is not None and manifest is not None:
        sig = signing.check_manifest_signature(doc, public_key)
        problems = [sig.problem] if sig.problem and (sig.status != "absent" or public_key is not None) else []
        manifest_info = {"path": str(manifest), "release": doc.get("release"), "commit": doc.get("commit"),
                         "files": len(doc["files"]), "signature": sig.status, "signed_by": sig.signed_by,
                         "problems": problems, "ok": not problems}
        root = manifest.resolve().parent
        jobs_list += [("manifest", root / e["file"], e) for e in doc["files"]]

    def run(item: tuple[str, Path, Any]) -> integrity.VerifyResult:
        kind, path, entry = item
        if kind == "path":
            return one(path)
        assert doc is not None and manifest is not None
        return release.check_manifest_file(entry, manifest.resolve().parent, doc.get("release"), public_key)

    show = sys.stdout.isatty() and len(jobs_list) > 1 and not as_json
    results = []
    for result in _bar(release.parallel(run, jobs_list, jobs), len(jobs_list), show):
        results.append(result)
        if not as_json:
            click.echo(_line(result), err=not result.ok)
    failed = [r for r in results if not r.ok]
    manifest_ok = manifest_info is None or manifest_info["ok"]
    if as_json:
        click.echo(json.dumps({"ok": not failed and manifest_ok, "checked": len(results), "failed": len(failed),
                               "manifest": manifest_info, "files": [r.to_dict() for r in results]}, indent=2))
    else:
        if manifest_info is not None:
            state = "OK" if manifest_ok else "FAILED: " + "; ".join(manifest_info["problems"])
            who = f", signed by {manifest_info['signed_by']}" if manifest_info["signature"] == "valid" else ""
            click.echo(f"manifest {manifest}: release {manifest_info['release']}, {manifest_info['files']} files"
                       f"{who}: {state}", err=not manifest_ok)
        if len(results) > 1 or manifest_info is not None:
            click.echo(f"{len(results)} files: {len(results) - len(failed)} ok, {len(failed)} failed")
    if failed or not manifest_ok:
        sys.exit(1)
