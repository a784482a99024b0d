"""A release: checkpoints stamped from a clean commit, signed, and listed in a signed manifest.

The manifest names each file (relative to the manifest), its revision, architecture hash, overall
digest and commit, so ``ckptmigrate verify --manifest`` can check a whole release at once: every
file present, every digest and signature what the release said.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ckptmigrate.checkpoint.envelope import git_info, now_utc
from ckptmigrate.errors import BadInput, CkptMigrateError
from ckptmigrate.release.stamping import require_clean, stamp
from ckptmigrate.storage.atomic import atomic_write
from ckptmigrate.storage.safe_open import read_small

if TYPE_CHECKING:
    from ckptmigrate.release.integrity import VerifyResult

MANIFEST_FORMAT = "ckptmigrate-release-manifest"
MANIFEST_LIMIT = 64 * 1024 * 1024  # ~300 bytes a file: room for 200,000 files
MANIFEST_VERSION = 1
T = TypeVar("T")
R = TypeVar("R")


def parallel(fn: Callable[[T], R], items: list[T], jobs: int | None) -> Iterator[R]:
    """``fn`` over ``items`` in threads (hashing releases the GIL), results in input order."""
    jobs = max(1, jobs or os.cpu_count() or 1)
    if jobs == 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=min(jobs, len(items))) as pool:
        yield from pool.map(fn, items)


def manifest_entry(path: Path, root: Path) -> dict[str, Any]:
    """What the manifest records about one stamped file, read from its envelope."""
    from ckptmigrate import formats

    _fmt, env = formats.read_envelope(path)
    env = env or {}
    return {
        "file": os.path.relpath(path, root), "revision": env.get("revision"), "lineage": env.get("lineage"),
        "arch_hash": env.get("arch_hash"), "digest": (env.get("digest") or {}).get("overall"),
        "commit": (env.get("git") or {}).get("commit"),
        "signed_by": (env.get("signature") or {}).get("public_key_fingerprint"),
    }


def stamp_release(
    files: Iterable[Path], version: str, *, manifest: Path, sign: str | os.PathLike[str] | None,
    repo: str | os.PathLike[str] | None = None, tags: Mapping[str, str] | None = None,
    allow_dirty: bool = False, jobs: int | None = None, allow_unsafe_pickle: bool = False,
) -> tuple[dict[str, Any], dict[Path, str]]:
    """Stamp (and sign) every file for ``version`` and write the manifest; return it and the
    files that failed with why. A failed file is left as it was and kept out of the manifest."""
    from ckptmigrate.release import signing

    info = git_info(repo) if allow_dirty else require_clean(repo)
    key = signing.load_private_key(sign) if sign is not None else None
    paths = list(files)
    if not paths:
        raise BadInput("no checkpoint files to release")
    root = manifest.parent.resolve()
    failures: dict[Path, str] = {}

    def one(path: Path) -> dict[str, Any] | None:
        try:
            stamp(path, release=version, sign=key, repo=repo, tags=tags, allow_dirty=True,
                  allow_unsafe_pickle=allow_unsafe_pickle)
        except CkptMigrateError as exc:
            failures[path] = str(exc)
            return None
        return manifest_entry(path.resolve(), root)

    entries = [e for e in parallel(one, paths, jobs) if e is not None]
    doc: dict[str, Any] = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "release": version,
        "created_at": now_utc(), "commit": (info or {}).get("commit"), "dirty": (info or {}).get("dirty"),
        "remote": (info or {}).get("remote"), "files": entries,
    }
    if key is not None:
        doc["signature"] = signing.sign_manifest(doc, key)
    with atomic_write(manifest) as fh:
        fh.write((json.dumps(doc, indent=2) + "\n").encode())
    return doc, failures


def load_manifest(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(read_small(path, MANIFEST_LIMIT, what="manifest"))
    except FileNotFoundError:
        raise BadInput(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadInput(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), list):
        raise BadInput(f"{path}: not a ckptmigrate release manifest")
    if not isinstance(doc.get("format_version"), int) or doc["format_version"] > MANIFEST_VERSION:
        raise BadInput(f"{path}: manifest format_version {doc.get('format_version')!r} is newer than "
                       "this ckptmigrate understands; upgrade ckptmigrate")
    for entry in doc["files"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise BadInput(f"{path}: a manifest entry lacks its file name")
    return doc


def _checkpoint_kind(path: Path) -> str | None:
    """The format a file would be loaded as, from its first bytes (never its name); regular files
    only (a FIFO or device left in the directory is opened without blocking and skipped)."""
    from ckptmigrate import formats

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in does not block
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        head = os.pread(fd, 512, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"  # what torch.load takes for a zip archive: the first four bytes
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"  # torch.load reads the tar checkpoints of torch < 0.4 too
    return formats.sniff(head, st.st_size)


def unlisted_checkpoints(doc: Mapping[str, Any], root: Path, manifest: Path) -> list[tuple[Path, str]]:
    """Checkpoint files under ``root`` that the manifest does not list, with their format.

    A release directory is what users download and load: a file in it that the manifest does not
    cover is unsigned for the release, whatever its name. Symlinked directories are not followed.
    """
    listed = {os.path.normpath(root / entry["file"]) for entry in doc["files"]}
    listed.add(os.path.normpath(manifest))
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if os.path.normpath(path) in listed:
                continue
            kind = _checkpoint_kind(path)
            if kind is not None:
                found.append((path, kind))
    return found


def check_manifest_file(entry: Mapping[str, Any], root: Path, release: str | None, public_key: Any) -> VerifyResult:
    """Verify one listed file and compare its envelope with what the manifest recorded."""
    from ckptmigrate.release.integrity import VerifyResult, verify

    path = root / entry["file"]
    if not path.exists():
        return VerifyResult(path, problems=["listed in the manifest but missing"])
    try:
        result = verify(path, public_key)
    except CkptMigrateError as exc:
        return VerifyResult(path, problems=[str(exc)])
    env = result.envelope or {}
    recorded = {"digest": (env.get("digest") or {}).get("overall"), "revision": env.get("revision"),
                "arch_hash": env.get("arch_hash"), "commit": (env.get("git") or {}).get("commit")}
    if result.digest is not None:
        recorded["digest"] = result.digest  # what the bytes hash to now, not what the envelope claims
    # a stripped or replaced signature fails even without --key: the manifest says who signed
    recorded["signed_by"] = result.signed_by if result.signature == "valid" else None
    for name, value in recorded.items():
        if name in entry and entry[name] != value:
            result.problems.append(f"{name} {value!r} differs from the manifest's {entry[name]!r}")
    if release is not None and (env.get("tags") or {}).get("release") != release:
        result.problems.append(f"not stamped for release {release}")
    result.ok = not result.problems
    return result


def verify_manifest_file(path: Path, public_key: Any = None, *, jobs: int | None = None, strict: bool = False
                         ) -> tuple[dict[str, Any], list[VerifyResult]]:
    """:func:`ckptmigrate.api.verify_manifest` of a local manifest file."""
    from ckptmigrate.release import signing

    key = signing.load_public_key(public_key) if isinstance(public_key, (str, os.PathLike)) else public_key
    doc = load_manifest(path)
    sig = signing.check_manifest_signature(doc, key)
    problems = [sig.problem] if sig.problem and (sig.status != "absent" or key is not None) else []
    root = path.resolve().parent
    unlisted = unlisted_checkpoints(doc, root, path.resolve())
    if strict and unlisted:
        problems.append(f"{len(unlisted)} checkpoint file(s) in its directory are not listed (--strict)")
    info = {"path": str(path), "release": doc.get("release"), "commit": doc.get("commit"),
            "files": len(doc["files"]), "signature": sig.status, "signed_by": sig.signed_by,
            "unlisted": [{"path": str(p), "format": kind} for p, kind in unlisted],
            "problems": problems, "ok": not problems}
    results = list(parallel(lambda e: check_manifest_file(e, root, doc.get("release"), key), doc["files"], jobs))
    return info, results
