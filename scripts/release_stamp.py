"""Stamp and sign every checkpoint under a directory for a release, and write its manifest.

    .venv/bin/python scripts/release_stamp.py ckpts/ --release 1.4.0 --sign release.pem
    .venv/bin/ckptmigrate verify --manifest ckpts/release-manifest.json --public-key release.pub

Each checkpoint gets the release tag and history entry, the git commit, its content digest and an
Ed25519 signature; the manifest (default ``DIR/release-manifest.json``, itself signed) lists each
file with its revision, architecture hash, digest and commit. A dirty working tree is refused
unless ``--allow-dirty``. Exit 0 when every file was stamped, 2 when any failed or the input is bad.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ckptmigrate.chain import engine
from ckptmigrate.errors import CkptMigrateError
from ckptmigrate.release.manifest import stamp_release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="Directory (searched recursively) of checkpoints.")
    parser.add_argument("--release", required=True, metavar="VERSION", help="The release being stamped.")
    parser.add_argument("--sign", required=True, metavar="KEYFILE", help="Ed25519 private key (ckptmigrate keygen).")
    parser.add_argument("--repo", type=Path, default=None, help="Git repository to record (default: the cwd's).")
    parser.add_argument("--manifest", type=Path, default=None, help="Where to write the manifest.")
    parser.add_argument("--tag", action="append", default=[], metavar="K=V", help="Extra tag (repeatable).")
    parser.add_argument("--allow-dirty", action="store_true", help="Accept uncommitted changes or no repository.")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="Sign files whose pickle names globals torch's weights_only refuses.")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="Files stamped at once (default: CPUs).")
    args = parser.parse_args(argv)
    tags = {}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--tag {item!r} is not KEY=VALUE")
        tags[key] = value
    if not args.directory.is_dir():
        print(f"release_stamp: error: {args.directory}: not a directory", file=sys.stderr)
        return 2
    manifest = args.manifest or args.directory / "release-manifest.json"
    try:
        doc, failures = stamp_release(
            list(engine.expand_paths([args.directory])), args.release, manifest=manifest, sign=args.sign,
            repo=args.repo, tags=tags, allow_dirty=args.allow_dirty, jobs=args.jobs,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
        )
    except CkptMigrateError as exc:
        print(f"release_stamp: error: {exc}", file=sys.stderr)
        return 2
    for path, why in failures.items():
        print(f"{path}: FAILED: {why}", file=sys.stderr)
    print(f"release {args.release}: {len(doc['files'])} files stamped and signed, {len(failures)} failed; "
          f"manifest {manifest} (commit {doc['commit']})")
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
