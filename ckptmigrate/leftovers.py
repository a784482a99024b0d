"""What killed ckptmigrate runs left behind, found by our own naming and removed only when provably
unused (``ckptmigrate leftovers``).

A run killed outright (SIGKILL, a lost machine, a preempted worker) cannot clean up. What it can
leave, and how each is known as ours and as no longer in use:

- a local temporary sibling ``.ckptmigrate-tmp-<name>.<8 hex>.part`` (storage/atomic) and a lock
  file ``.<name>.ckptmigrate-lock`` (storage/locking): in use while any ckptmigrate lock in its
  directory or the one above is held (``flock``; the kernel drops a dead holder's lock);
- a remote command's staging directory ``$TMPDIR/ckptmigrate-<8 chars>`` (a whole object staged on
  disk): in use while a process has a file open in it (``/proc``), looked for when the target is
  the temporary directory itself;
- a local journal ``.<index>.ckptmigrate-journal`` / ``-headers`` (storage/shardset): a recovery in
  waiting, which the next ``upgrade`` of the checkpoint replays — never deleted here;
- a GCS append's temporary object ``KEY.ckptmigrate-tail-<32 hex>`` (storage/gcs_write);
- an open S3 multipart upload (storage/s3_compose). S3 shows an open upload's key and start time,
  never its metadata or who began it, so nothing marks it as ours: it is listed as not proven, and
  only ``abort_uploads`` (the user's word that no other tool uploads there) takes an upload on the
  key or under the prefix older than ``older_than`` as abandoned, as the bucket's
  ``AbortIncompleteMultipartUpload`` rule would take it;
- under a prefix, a header rewrite's journal object ``.<index>.ckptmigrate-headers.<12 hex>``
  (storage/prefix_write): a leftover when the index is not the placeholder naming it (when it is,
  a recovery in waiting), and a DCP envelope ``.ckptmigrate-<16 hex>.json`` named for neither the
  ``.metadata`` there nor a ``.metadata.bak*`` (in a bucket that keeps versions it may be an earlier
  version's: not proven, kept).

Everything is also kept when younger than ``older_than`` (a run may be at work). Deletes are
conditional where the store allows: on the generation (GCS) or ETag (Azure) listed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ckptmigrate.errors import BadInput, RemoteError
from ckptmigrate.formats.dcp import ENVELOPE_PREFIX, METADATA
from ckptmigrate.storage import writers
from ckptmigrate.storage.atomic import TEMP_PREFIX
from ckptmigrate.storage.gcs_write import TAIL_MARK
from ckptmigrate.storage.prefix_write import JOURNAL_FIELD
from ckptmigrate.storage.safe_open import CLOEXEC, NOFOLLOW, NONBLOCK
from ckptmigrate.util.urls import ObjectURL, as_location, filesystem, translated

#: The default of ``older_than``: an hour, longer than any metadata-only run takes.
DEFAULT_OLDER_THAN = 3600.0

_TEMP = re.compile(re.escape(TEMP_PREFIX) + r".+\.[0-9a-f]{8}\.part")
_LOCK = re.compile(r"\..+\.ckptmigrate-lock")
_STAGING = re.compile(r"ckptmigrate-[a-z0-9_]{8}")
_LOCAL_JOURNAL = re.compile(r"\.(.+)\.ckptmigrate-(journal|headers)")
_TAIL = re.compile(r".+" + re.escape(TAIL_MARK) + r"[0-9a-f]{32}")
_PREFIX_JOURNAL = re.compile(r"\.(.+)\.ckptmigrate-headers\.[0-9a-f]{12}")
_ENVELOPE = re.compile(re.escape(ENVELOPE_PREFIX) + r"([0-9a-f]{16})\.json")

#: What became of a leftover. ``leftover`` and ``recovery`` are what a check fails on.
LEFTOVER, REMOVED, RECOVERY, YOUNG, IN_USE, UNPROVEN = (
    "leftover", "removed", "recovery", "young", "in use", "unproven")


@dataclass
class Leftover:
    """One thing a run left: where (a path or URL, without credentials), what, how old (seconds;
    None when the store does not say), and its ``status`` (one of the constants above) with ``note``."""

    location: str
    kind: str
    age: float | None
    status: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """What :func:`leftovers` found under every target, in order."""

    items: list[Leftover]

    @property
    def failing(self) -> list[Leftover]:
        """What a check fails on: leftovers not removed, and recoveries in waiting."""
        return [i for i in self.items if i.status in (LEFTOVER, RECOVERY)]

    def to_dict(self) -> dict[str, Any]:
        return {"leftovers": [i.to_dict() for i in self.items], "failing": len(self.failing)}


def leftovers(targets: Sequence[str | os.PathLike[str]], *, older_than: float = DEFAULT_OLDER_THAN,
              delete: bool = False, abort_uploads: bool = False) -> Report:
    """List (and, with ``delete``, remove) what killed runs left under each target: a local file or
    directory (searched down), an object URL, or a prefix URL (``s3://b/runs/``, searched down)."""
    if older_than < 0:
        raise BadInput(f"older than {older_than} seconds: a duration cannot be negative")
    items: list[Leftover] = []
    for target in targets:
        text = os.fspath(target)
        where = as_location(text)
        if isinstance(where, ObjectURL):
            items.extend(_remote(where, text.endswith("/"), older_than, delete, abort_uploads))
        else:
            items.extend(_local(where, older_than, delete))
    return Report(items)


def parse_duration(text: str) -> float:
    """``0``, ``90``, ``90s``, ``30m``, ``2h``, ``7d`` as seconds; BadInput otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise BadInput(f"{text!r} is not a duration (seconds, or a number with s, m, h or d: 30m, 2h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


# --- local files ---------------------------------------------------------------------------------------

def _local(path: Path, older_than: float, delete: bool) -> Iterator[Leftover]:
    """Under a directory (searched down, and its own lock beside it), or beside one file; in the
    temporary directory, the staging directories of remote commands (and nothing else there)."""
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory", path=str(path))
    if path.is_dir() and os.path.samefile(path, tempfile.gettempdir()):
        for stage in _staging(path, time.time(), older_than):
            yield _delete_staging(stage) if delete and stage.status == LEFTOVER else stage
        return
    places: Iterator[tuple[Path, list[str], str | None]] = iter([(path.parent, os.listdir(path.parent), path.name)])
    if path.is_dir():
        places = itertools.chain(places, ((Path(d), names, None) for d, _dirs, names in os.walk(path)))
    now = time.time()
    for directory, names, only in places:
        ours = sorted(n for n in names if _relevant(n, only))
        if not ours:
            continue
        live = _live_locks(directory) | _live_locks(directory.parent)
        for name in ours:
            item = _local_item(directory / name, name, now, older_than, live)
            if item is not None:
                yield _delete_local(directory / name, item) if delete and item.status == LEFTOVER else item


def _relevant(name: str, only: str | None) -> bool:
    if only is None:
        return bool(_TEMP.fullmatch(name) or _LOCK.fullmatch(name) or _LOCAL_JOURNAL.fullmatch(name))
    return name in (f".{only}.ckptmigrate-lock", f".{only}.ckptmigrate-journal", f".{only}.ckptmigrate-headers") or (
        name.startswith(f"{TEMP_PREFIX}{only}.") and bool(_TEMP.fullmatch(name)))


def _local_item(path: Path, name: str, now: float, older_than: float, live: set[str]) -> Leftover | None:
    try:
        age = max(0.0, now - os.lstat(path).st_mtime)
    except FileNotFoundError:
        return None  # its run finished meanwhile
    journal = _LOCAL_JOURNAL.fullmatch(name)
    if journal:
        commit = path.with_name(journal.group(1))
        return Leftover(str(path), "journal", age, IN_USE if live else RECOVERY,
                        "its run is at work" if live else
                        f"an interrupted switch of {commit}: run `ckptmigrate upgrade` on it, which finishes or "
                        "undoes the switch (do not delete the journal)")
    kind = "lock file" if _LOCK.fullmatch(name) else "temporary file"
    if kind == "lock file" and name in live:
        return Leftover(str(path), kind, age, IN_USE, "held by a running process")
    if live:
        return Leftover(str(path), kind, age, IN_USE, "a ckptmigrate lock beside it is held: a run is at work")
    if age < older_than:
        return Leftover(str(path), kind, age, YOUNG, "younger than --older-than")
    return Leftover(str(path), kind, age, LEFTOVER, "left by a run that was killed")


def _staging(directory: Path, now: float, older_than: float) -> Iterator[Leftover]:
    """``ckptmigrate-<8 chars>`` directories (``tempfile.TemporaryDirectory(prefix="ckptmigrate-")``:
    storage/staged, chain/objects, storage/hf_commit), which a killed run leaves with a whole staged
    object in them. In use while a process has a file open there or works in it (Linux's ``/proc``;
    elsewhere, or another user's, it cannot be told: unproven, kept). Its age is its newest file's."""
    in_use = _open_paths()
    for name in sorted(os.listdir(directory)):
        path = directory / name
        if not _STAGING.fullmatch(name) or path.is_symlink() or not path.is_dir():
            continue
        real = os.path.realpath(path)
        newest = max([os.lstat(path).st_mtime, *(os.lstat(os.path.join(d, n)).st_mtime
                                                 for d, dirs, files in os.walk(path) for n in dirs + files)])
        item = Leftover(str(path), "staging directory", max(0.0, now - newest), LEFTOVER,
                        "a remote command's local copy, left by a run that was killed")
        if in_use is None or os.lstat(path).st_uid != os.getuid():
            item.status, item.note = UNPROVEN, "whether a process uses it cannot be seen here"
        elif any(p == real or p.startswith(real + os.sep) for p in in_use):
            item.status, item.note = IN_USE, "a running process has a file open in it"
        yield _aged(item, older_than)


def _open_paths() -> set[str] | None:
    """Every file this user's processes have open, and their working directories (None: no ``/proc``)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    found: set[str] = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):  # gone, or another user's
            found.add(os.readlink(f"/proc/{pid}/cwd"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def _delete_staging(item: Leftover) -> Leftover:
    try:
        shutil.rmtree(item.location)
    except FileNotFoundError:
        pass
    except OSError as exc:
        item.note = f"cannot delete: {exc.strerror or exc}"
        return item
    item.status = REMOVED
    return item


def _live_locks(directory: Path) -> set[str]:
    """The names of the lock files in ``directory`` that a running process holds."""
    try:
        names = [n for n in os.listdir(directory) if _LOCK.fullmatch(n)]
    except OSError:
        return set()
    return {n for n in names if _held(directory / n)}


def _held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY | NOFOLLOW | NONBLOCK | CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock, if it was taken
    return False


def _delete_local(path: Path, item: Leftover) -> Leftover:
    """Remove it; a lock file only while holding its lock (a waiter finds it gone and creates another,
    as :func:`ckptmigrate.storage.locking.file_lock` does after any holder)."""
    fd = None
    try:
        if item.kind == "lock file":
            fd = os.open(path, os.O_RDONLY | NOFOLLOW | NONBLOCK | CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                item.status, item.note = IN_USE, "taken by a run that started meanwhile"
                return item
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        item.note = f"cannot delete: {exc.strerror or exc}"
        return item
    finally:
        if fd is not None:
            os.close(fd)
    item.status = REMOVED
    return item


# --- objects in buckets --------------------------------------------------------------------------------

def _remote(url: ObjectURL, is_prefix: bool, older_than: float, delete: bool,
            abort_uploads: bool) -> Iterator[Leftover]:
    if not writers.writable(url.scheme):
        raise RemoteError(f"{url}: a killed run leaves nothing under {url.scheme}:// (a Hub commit is whole or "
                          "absent, http(s):// is only read); leftovers looks under s3://, gs:// and az://",
                          url=str(url))
    fs, path = filesystem(url)
    path = path.rstrip("/")
    root = f"{url.scheme}://{path.split('/', 1)[0]}"
    with translated(url, "list"):
        fs.invalidate_cache()
        exact = not is_prefix and not fs.isdir(path)  # one object (or a key an upload was writing)
        if exact:
            there = fs.isfile(path)
            listing = {k: v for k, v in _listing(fs, path.rsplit("/", 1)[0], recursive=False).items()
                       if k.startswith(path + TAIL_MARK)}
        else:
            listing = _listing(fs, path, recursive=True)
            there = bool(listing)
    now = time.time()
    found: list[Leftover] = []
    with translated(url):
        digests: dict[str, str] = {}
        for key, info in sorted(listing.items()):
            found.extend(_object_item(fs, root, key, info, listing, now, older_than, digests))
        if url.scheme in ("s3", "s3a"):
            found.extend(_uploads(fs, url, path, exact=exact, now=now, older_than=older_than, abort=abort_uploads))
    if not there and not found:
        raise RemoteError(f"{url}: no such object or prefix", url=str(url))
    for item in found:
        if delete and item.status == LEFTOVER:
            _delete_remote(fs, item, listing)
        yield item


def _listing(fs: Any, path: str, *, recursive: bool) -> dict[str, dict[str, Any]]:
    if recursive:
        return dict(fs.find(path, detail=True))
    return {i["name"].rstrip("/"): i for i in fs.ls(path, detail=True) if i.get("type") != "directory"}


def _object_item(fs: Any, root: str, key: str, info: dict[str, Any], listing: dict[str, dict[str, Any]],
                 now: float, older_than: float, digests: dict[str, str]) -> Iterator[Leftover]:
    name = key.rsplit("/", 1)[-1]
    directory = key.rsplit("/", 1)[0]
    where = f"{root.split('://')[0]}://{key}"
    age = _age(info, now)
    if _TAIL.fullmatch(name):
        yield _aged(Leftover(where, "temporary object", age, LEFTOVER, "a GCS append killed before its compose"),
                    older_than)
        return
    journal = _PREFIX_JOURNAL.fullmatch(name)
    if journal:
        index = f"{directory}/{journal.group(1)}"
        if _names_journal(fs, index, name):
            yield Leftover(where, "journal object", age, RECOVERY,
                           f"the placeholder index {root.split('://')[0]}://{index} names it: a header rewrite was "
                           f"interrupted; run `ckptmigrate upgrade` on {root.split('://')[0]}://{directory}/, "
                           "which puts the old headers back (do not delete the journal)")
            return
        yield _aged(Leftover(where, "journal object", age, LEFTOVER, "a header rewrite's journal no index names"),
                    older_than)
        return
    envelope = _ENVELOPE.fullmatch(name)
    if envelope and f"{directory}/{METADATA}" in listing:
        named = {_digest(fs, k, digests) for k in listing
                 if k.rsplit("/", 1)[0] == directory and re.fullmatch(re.escape(METADATA) + r"(\.bak(\.\d+)?)?",
                                                                      k.rsplit("/", 1)[-1])}
        if envelope.group(1) in named:
            return
        if _versioned(fs, root):
            yield Leftover(where, "envelope object", age, UNPROVEN,
                           "named for no .metadata here, but the bucket keeps versions: it may be the envelope of an "
                           "earlier version of .metadata (a backup)")
            return
        yield _aged(Leftover(where, "envelope object", age, LEFTOVER,
                             "a DCP envelope named for no .metadata here (a run killed before its switch)"), older_than)


def _aged(item: Leftover, older_than: float) -> Leftover:
    if item.status == LEFTOVER and item.age is not None and item.age < older_than:
        item.status, item.note = YOUNG, f"{item.note}; younger than --older-than"
    return item


def _names_journal(fs: Any, index: str, journal: str) -> bool:
    try:
        raw = fs.cat_file(index)
        return bool(json.loads(raw).get("metadata", {}).get(JOURNAL_FIELD) == journal)
    except FileNotFoundError:
        return False
    except (ValueError, AttributeError):
        return False


def _digest(fs: Any, key: str, digests: dict[str, str]) -> str:
    """The name an envelope for ``key`` (a ``.metadata``) has, each object read once."""
    if key not in digests:
        digests[key] = hashlib.sha256(fs.cat_file(key)).hexdigest()[:16]
    return digests[key]


def _versioned(fs: Any, root: str) -> bool:
    """Whether the bucket keeps earlier versions (S3 versioning ever enabled, GCS versioning on)."""
    bucket = root.split("://", 1)[1]
    if root.startswith("s3"):
        return bool(fs.call_s3("get_bucket_versioning", Bucket=bucket).get("Status"))
    if root.startswith(("gs", "gcs")):
        meta = fs.call("GET", "b/{}", bucket, json_out=True)
        return bool((meta.get("versioning") or {}).get("enabled"))
    return False  # Azure: ckptmigrate's backups there are copies (KEY.bak), never versions


def _age(info: dict[str, Any], now: float) -> float | None:
    for field in ("LastModified", "last_modified", "updated", "timeCreated", "creation_time", "mtime"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, str):
            value = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, _dt.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=_dt.UTC)
            return max(0.0, now - value.timestamp())
        return max(0.0, now - float(value))
    return None


def _uploads(fs: Any, url: ObjectURL, path: str, *, exact: bool, now: float, older_than: float,
             abort: bool) -> Iterator[Leftover]:
    """The open multipart uploads on the key (``exact``) or under the prefix: not proven ours
    unless ``abort`` says no other tool uploads there."""
    bucket, _, key = path.partition("/")
    prefix = key if exact or not key else key + "/"
    markers: dict[str, str] = {}
    while True:
        with translated(url, "list the multipart uploads of"):
            page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
        for upload in page.get("Uploads", []):
            if exact and upload["Key"] != key:
                continue
            age = max(0.0, now - upload["Initiated"].timestamp())
            item = Leftover(f"{url.scheme}://{bucket}/{upload['Key']}?uploadId={upload['UploadId']}",
                            "multipart upload", age, LEFTOVER if abort else UNPROVEN,
                            "S3 does not say who began it; any upload this old is taken as abandoned" if abort else
                            "S3 does not say who began it: --abort-uploads aborts it when no other tool uploads here")
            yield _aged(item, older_than)
        if not page.get("IsTruncated"):
            return
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def _delete_remote(fs: Any, item: Leftover, listing: dict[str, dict[str, Any]]) -> None:
    scheme, _, rest = item.location.partition("://")
    try:
        if item.kind == "multipart upload":
            key_part, _, upload_id = rest.partition("?uploadId=")
            bucket, _, key = key_part.partition("/")
            with translated(item.location, "abort"):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        else:
            info = listing[rest]
            token = info.get("generation") if scheme in ("gs", "gcs") else (info.get("etag") or info.get("ETag"))
            obj = writers.object_target(ObjectURL(item.location), None if token is None else str(token))
            with contextlib.suppress(FileNotFoundError):
                writers.delete(obj)
    except RemoteError as exc:
        item.note = f"cannot delete: {exc}"
        return
    item.status = REMOVED
