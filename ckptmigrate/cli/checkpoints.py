"""Commands on checkpoint files themselves: ``inspect``, ``current``, ``stamp`` and ``compact``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ckptmigrate.cli.common import (
    JSON,
    LOCATION,
    MIGRATIONS,
    emit_json,
    fleet_options,
    fleet_run,
    naming,
    parse_tags,
)
from ckptmigrate.util.paths import multi_file_checkpoint
from ckptmigrate.util.progress import file_bar
from ckptmigrate.util.urls import as_location, is_remote, names_many


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


#: Modules whose pickled values ``sanitize`` converts (:mod:`ckptmigrate.ops.sanitize`).
_SANITIZABLE = ("argparse.", "numpy.", "pathlib.", "omegaconf.")


def _print_summary(info: dict[str, Any]) -> None:
    env = info["envelope"]
    click.echo(f"{info['path']}")
    click.echo(f"  container   {info['container']}")
    extras = f"  (extras: {', '.join(info['extras'])})" if info["extras"] else ""
    click.echo(f"  layout      {info['layout']}{extras}")
    if len(info.get("state_dicts", [])) > 1:
        click.echo(f"  copies      {', '.join(info['state_dicts'][1:])}  (migrated with the state dict)")
    for problem in info.get("state_dict_problems", []):
        click.echo(f"  warning     {problem}")
    click.echo(f"  tensors     {info['tensors']}  ({info['parameters']:,} elements, {_fmt_bytes(info['bytes'])})")
    dtypes = ", ".join(f"{d} ×{n}" for d, n in sorted(info["dtypes"].items()))
    click.echo(f"  dtypes      {dtypes or '-'}")
    click.echo(f"  devices     {', '.join(info['devices']) or '-'}")
    click.echo(f"  arch hash   {info['arch_hash']}")
    pickle = info.get("pickle") or {}
    if pickle.get("unsafe_globals"):
        called = set(pickle.get("called") or [])
        names = ", ".join(f"{n} (called)" if n in called else n for n in pickle["unsafe_globals"])
        click.echo(f"  pickle      UNSAFE: torch.load(weights_only=False) would import or run {names}")
        click.echo("              weights_only=True refuses it (blocked by those); they stay inert here")
        if any(n.startswith(_SANITIZABLE) for n in pickle["unsafe_globals"]):
            click.echo("              `ckptmigrate sanitize` turns argparse, numpy, pathlib and OmegaConf values "
                       "into plain data")
    elif pickle:
        click.echo("  pickle      safe: loads with torch.load(weights_only=True)")
    if env is None:
        click.echo("  envelope    unstamped")
    else:
        click.echo(f"  revision    {env.get('revision') or '-'}  (lineage {env.get('lineage') or '-'})")
        cuda = f"CUDA {env['cuda']}" if env.get("cuda") else "no CUDA"
        click.echo(f"  written by  torch {env.get('torch')}, {cuda}, Python {env.get('python')}")
        git = env.get("git")
        if git:
            dirty = " (dirty)" if git.get("dirty") else ""
            click.echo(f"  git         {git.get('commit') or '-'} on {git.get('branch') or '-'}{dirty}")
        click.echo(f"  created     {env.get('created_at')}  ({len(env.get('history') or [])} history entries)")
        if env.get("tags"):
            click.echo("  tags        " + ", ".join(f"{k}={v}" for k, v in sorted(env["tags"].items())))
    if "keys" in info:
        width = max((len(k) for k in info["keys"]), default=0)
        for k, v in info["keys"].items():
            click.echo(f"    {k:<{width}}  {str(tuple(v['shape'])):<20} {v['dtype']}")


def _single(paths: tuple[str, ...]) -> bool:
    """One file (or one multi-file checkpoint's directory) named as such: one object in JSON, a bare
    answer; several, a directory of checkpoints or a pattern: a list."""
    if len(paths) != 1:
        return False
    if is_remote(paths[0]):
        return not names_many(paths[0])
    path = as_location(paths[0])
    return path.is_file() or multi_file_checkpoint(path)


_KEY = click.option("--key", default=None, metavar="LOCATION",
                    help="Where the state dict sits in the payload (default: found, or the envelope's).")
_OUTPUT = [
    click.option("-o", "--output", type=LOCATION, help="Write here (a path or a URL) instead of in place."),
    click.option("--overwrite", is_flag=True, help="With -o: replace an existing file."),
]


@click.command()
@click.argument("paths", nargs=-1, required=True)
@JSON
@click.option("--keys", is_flag=True, help="List every key with its shape and dtype.")
@_KEY
@click.option("--state-dict", "state_dicts", multiple=True, metavar="LOCATION",
              help="A state dict to describe, copies included; repeatable (default: searched).")
def inspect(paths: tuple[str, ...], as_json: bool, keys: bool, key: str | None, state_dicts: tuple[str, ...]) -> None:
    """Describe checkpoints (files, directories, globs) from their metadata; reads no tensor bytes."""
    from ckptmigrate import api

    declared = list(state_dicts) or None
    infos = [api.inspect(p, keys=keys, key=key, state_dicts=declared, against_chain=True)
             for p in api.checkpoint_files(paths)]
    if as_json:
        emit_json(infos[0] if _single(paths) else infos)
        return
    for info in infos:
        _print_summary(info)
        hint = (info.get("newer") or {}).get("hint")
        for n, warning in enumerate(info.get("warnings", [])):
            click.echo(f"ckptmigrate: warning: {warning}" + (f"; {hint}" if hint and n == 0 else ""), err=True)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Free-form tag (repeatable).")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False),
              help="Git repository to record (default: the working directory's).")
@_OUTPUT[0]
@_OUTPUT[1]
@_KEY
@click.option("--revision", default=None, help="Record that the checkpoint is at this revision.")
@MIGRATIONS
@JSON
@click.option("--release", default=None, metavar="VERSION",
              help="Record a release (tag `release`, history entry, commit, digest); needs a clean git tree.")
@click.option("--sign", type=click.Path(path_type=Path, dir_okay=False), metavar="KEYFILE",
              help="Sign the envelope with this Ed25519 private key (see `ckptmigrate keygen`).")
@click.option("--digest", is_flag=True, help="Record the content digest (reads every tensor byte).")
@click.option("--allow-dirty", is_flag=True, help="With --release: accept uncommitted changes, or no repository.")
@click.option("--allow-unsafe-pickle", is_flag=True,
              help="With --release/--sign: vouch for a file whose pickle names globals torch's weights_only refuses.")
@fleet_options
def stamp(paths: tuple[str, ...], tags: tuple[str, ...], repo: Path | None, output: Path | None, overwrite: bool,
          key: str | None, revision: str | None, migrations: str | None, as_json: bool,
          release: str | None, sign: Path | None, digest: bool, allow_dirty: bool, allow_unsafe_pickle: bool,
          **fleet: Any) -> None:
    """Write the envelope into checkpoints (files, directories, globs) without changing any tensor."""
    from ckptmigrate import api

    files = api.checkpoint_files(paths)
    options = {"output": output, "overwrite": overwrite, "tags": parse_tags(tags), "repo": repo, "key": key,
               "revision": revision, "release": release, "sign": sign, "digest": digest,
               "allow_dirty": allow_dirty, "allow_unsafe_pickle": allow_unsafe_pickle}
    watching = sys.stdout.isatty() and not as_json
    rows: list[dict[str, Any]] = []
    stamped = failed = skipped = 0
    with file_bar("stamp", files[0], show=watching and len(files) == 1):
        for result in fleet_run("stamp", files, options, fleet=fleet, show=watching, migrations=migrations):
            if result.error is not None:
                click.echo(f"{result.path}: FAILED: {result.error['message']}", err=True)
                rows.append({"path": result.path, "error": result.error})
                failed += 1
                continue
            if result.result == "skipped":
                skipped += 1
                rows.append({"path": result.path, "skipped": True, "revision": result.after})
                if not as_json:
                    click.echo(f"{result.path}: stamped (journal), skipped")
                continue
            dest = result.detail["output"]
            stamped += 1
            rows.append({"path": result.path, "output": dest, "envelope": api.inspect(dest)["envelope"]
                         if as_json else None})
            if not as_json:
                click.echo(f"stamped {dest}")
    if as_json:
        emit_json(rows[0].get("envelope", rows[0]) if len(files) == 1 else rows)
    elif len(files) > 1:
        click.echo(f"{len(files)} files: {stamped} stamped, " + (f"{skipped} skipped (journal), " if skipped else "")
                   + f"{failed} failed")
    if failed:
        sys.exit(2)


@click.command()
@click.argument("paths", nargs=-1, required=True)
@JSON
@click.option("--verbose", "-v", is_flag=True,
              help="Also what the file has applied, and warn of scripts edited since they ran on it.")
@MIGRATIONS
def current(paths: tuple[str, ...], as_json: bool, verbose: bool, migrations: str | None) -> None:
    """The revision each checkpoint (files, directories, globs) is at, or `unstamped`; warns when a
    file is newer than the chain (reads the envelope, and the scripts' ids without importing them)."""
    from ckptmigrate import api

    rows = [api.current(p, verbose=verbose, migrations=migrations) for p in api.checkpoint_files(paths)]
    if as_json:
        emit_json(rows[0] if _single(paths) else rows)
        return
    for row in rows:
        state = row["revision"] or ("stamped, no revision" if row["stamped"] else "unstamped")
        click.echo(state if _single(paths) else f"{row['path']}: {state}")
        for entry in row.get("applied", []):
            by = ", ".join(x for x in (entry.get("chain"), entry.get("ckptmigrate_version") and
                                       f"ckptmigrate {entry['ckptmigrate_version']}") if x)
            sha = (entry.get("script_sha256") or "")[:12]
            click.echo(f"  {entry['action']} {entry['revision']} at {entry['at']}" + (f" by {by}" if by else "")
                       + (f", script sha256 {sha}" if sha else ""))
        hint = (row.get("newer") or {}).get("hint")
        for n, warning in enumerate(row.get("warnings", [])):
            click.echo(f"ckptmigrate: warning: {warning}" + (f"; {hint}" if hint and n == 0 else ""), err=True)


@click.command()
@click.argument("path", type=LOCATION)
@_OUTPUT[0]
@_OUTPUT[1]
def compact(path: Path, output: Path | None, overwrite: bool) -> None:
    """Reclaim the bytes that in-place stamps and renames left in a torch zip file, or that
    migrations left in a DCP directory's .distcp files (chunks no tensor reads any more)."""
    from ckptmigrate import api

    with naming(path), file_bar("compact", path, show=sys.stdout.isatty()):
        before, after = api.compact(path, output=output, overwrite=overwrite)
    click.echo(f"{output or path}: {before:,} -> {after:,} bytes")
