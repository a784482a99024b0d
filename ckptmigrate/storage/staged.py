"""Commands that need a checkpoint's bytes on disk, on objects in a bucket: ``stamp`` (its digest
hashes every byte), ``verify``, ``compact``, ``convert``, ``sanitize``, a legacy (pre-zip) torch
file, and ``-o`` to or from a URL that is not streamed (between buckets a torch zip is:
chain/objects).

The object is streamed into a temporary directory (16 MiB ranges: memory stays bounded), the local
command runs there with its locks and atomic writes, and what it wrote is uploaded in one step
(one put, or a multipart upload completed at once): in place only if the object is still the one
read (``If-Match`` on its ETag: the loser of two writers fails and writes nothing, and an in-place
backup taken for it is removed); to another URL as a new object. Local disk holds the object and
the result meanwhile. Errors and results name the URL, never the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckptmigrate.errors import BadInput, CkptMigrateError, MultiFileObject, OutputExists
from ckptmigrate.storage import writers
from ckptmigrate.storage.ranges import RangeFile, multi_file_marker
from ckptmigrate.util.urls import ObjectURL, as_location, filesystem, sync_tool, translated

#: What transformers and torch DCP name a shard: ``model-00001-of-00004.safetensors``, ``__0_0.distcp``.
SHARD_NAME = re.compile(r"(-\d+-of-\d+\.[A-Za-z]+|\.distcp)$")


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (atomically: a new inode) or appended to in place."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class Staging:
    """A command's source and output as local paths, and the URLs they stand for."""

    source: Path
    output: Path | None
    tmp: Path
    urls: dict[str, str] = field(default_factory=dict)
    #: The in-place write's backup (a version or ``KEY.bak``), once uploaded.
    backup: ObjectURL | None = None
    #: What the command did (``upgrade c1 -> c2``), for a store that keeps a message (a Hub commit).
    what: str | None = None

    def shown(self, text: str) -> str:
        """``text`` with every temporary path replaced by the URL it stands for."""
        for local, url in self.urls.items():
            text = text.replace(local, url)
        return text

    def location(self, path: str | os.PathLike[str] | None) -> Path | ObjectURL | None:
        """A local path the command returned, as what the user named (the URL for a staged file)."""
        if path is None:
            return None
        text = os.fspath(path)
        return as_location(self.urls[text]) if text in self.urls else Path(text)


def check_output(output: ObjectURL, overwrite: bool) -> writers.Target:
    """An output URL a new object can be written at: a writable scheme, and no object there unless
    ``overwrite`` (checked before any work)."""
    target = writers.target(output, None)
    target.create_only = not overwrite
    with translated(output):
        target.fs.invalidate_cache(f"{target.bucket}/{target.key}")
        taken = target.fs.exists(f"{target.bucket}/{target.key}")
    if taken and not overwrite:
        error = OutputExists(f"{output}: the output exists, and overwriting it was not asked for", path=str(output))
        error.cli_hint = "pass --overwrite to replace it"
        raise error
    return target


def fetch(url: ObjectURL, dest: Path) -> RangeFile:
    """Stream the object into ``dest``; the opened object (its ETag and version) is returned."""
    remote = RangeFile(url)
    if remote.size == 0:
        raise BadInput(f"{url}: empty object, not a checkpoint", path=str(url))
    refuse_multi_file(url)
    with open(dest, "wb") as fh:
        for block in remote.chunks():
            fh.write(block)
    return remote


def refuse_multi_file(url: ObjectURL) -> None:
    """A shard of a multi-file checkpoint (an HF sharded model, a DCP directory) in a bucket is not
    rewritten alone: the set cannot be replaced in one step on an object store. (An ``http(s)://``
    server lists nothing.)"""
    if url.scheme in ("http", "https") or not SHARD_NAME.search(url.name):
        return  # only a name a sharded save gives costs a listing of its prefix
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    marker = multi_file_marker(fs, parent, url)
    if marker is not None:
        prefix = f"{url.scheme}://{parent}/"
        raise MultiFileObject(f"{url}: a shard of the multi-file checkpoint {prefix} ({marker}), which object "
                              "storage cannot replace in one step; copy the prefix to a local directory "
                              f"({sync_tool(url.scheme)}) and run there", url=str(url), marker=marker)


@contextlib.contextmanager
def staged(source: str | os.PathLike[str], output: str | os.PathLike[str] | None = None, *,
           overwrite: bool = False, write_back: bool = True, backup: bool = False) -> Iterator[Staging]:
    """``source`` and ``output`` as local paths for a command; on success, what it wrote uploaded:
    to ``output`` when it is a URL, else back over ``source`` when that is a URL, ``write_back`` is
    set and the local copy changed (conditionally on the ETag read; ``backup`` first keeps the object
    as read). A failure uploads nothing, and its message names the URLs."""
    src, out = as_location(source), as_location(output) if output is not None else None
    out_target = check_output(out, overwrite) if isinstance(out, ObjectURL) else None
    if isinstance(src, ObjectURL) and write_back and out is None:
        writers.target(src, None)  # a scheme written in place, or one line before any download
    with tempfile.TemporaryDirectory(prefix="ckptmigrate-") as tmp:
        stage = Staging(Path(src), Path(out) if out is not None else None, Path(tmp))
        remote = None
        if isinstance(src, ObjectURL):
            stage.source = Path(tmp) / "in" / src.name
            stage.source.parent.mkdir()
            stage.urls[str(stage.source)] = str(src)
            remote = fetch(src, stage.source)
        if isinstance(out, ObjectURL):
            stage.output = Path(tmp) / "out" / out.name
            stage.output.parent.mkdir()
            stage.urls[str(stage.output)] = str(out)
        before = _fingerprint(stage.source)
        try:
            yield stage
        except CkptMigrateError as exc:
            raise _renamed(exc, stage) from None
        if out_target is not None:
            assert stage.output is not None
            if stage.output.exists():
                writers.describe(out_target, stage.what)
                writers.upload(out_target, stage.output)
        elif remote is not None and write_back and output is None and _fingerprint(stage.source) != before:
            assert isinstance(src, ObjectURL)
            _replace(src, remote, stage, backup)


def _replace(url: ObjectURL, remote: RangeFile, stage: Staging, backup: bool) -> None:
    target = writers.target(url, remote.etag, remote.version)
    writers.describe(target, stage.what)
    if backup:
        stage.backup = writers.backup(target)
    try:
        writers.upload(target, stage.source)
    except BaseException:
        if stage.backup is not None:
            writers.remove(stage.backup)
            stage.backup = None
        raise


def _renamed(exc: CkptMigrateError, stage: Staging) -> CkptMigrateError:
    """The error with the temporary paths in its message and fields shown as the URLs."""
    exc.args = tuple(stage.shown(a) if isinstance(a, str) else a for a in exc.args)
    for name, value in list(vars(exc).items()):
        if isinstance(value, str):
            setattr(exc, name, stage.shown(value))
    return exc


@contextlib.contextmanager
def mirrored(manifest: ObjectURL) -> Iterator[Staging]:
    """A release manifest and every object under its prefix (what it lists, and what it does not
    list but a user downloading the release would get), mirrored into a temporary directory."""
    _fs, path = filesystem(manifest)
    prefix = path.rsplit("/", 1)[0]
    with mirrored_prefix(as_url(f"{manifest.scheme}://{prefix}")) as stage:
        stage.source = stage.source / path[len(prefix) + 1:]
        if not stage.source.exists():
            raise BadInput(f"{manifest}: no such manifest", path=str(manifest))
        yield stage


@contextlib.contextmanager
def mirrored_prefix(url: ObjectURL) -> Iterator[Staging]:
    """Every object under the prefix ``url`` in a temporary directory of the same layout: ``source``
    is that directory (``verify`` of a multi-file checkpoint, a release manifest's prefix)."""
    fs, path = filesystem(url)
    with translated(url, "list"):
        found = [p for p in fs.find(path) if p.startswith(path + "/")]
    with tempfile.TemporaryDirectory(prefix="ckptmigrate-") as tmp:
        root = Path(tmp) / "prefix"
        root.mkdir()
        stage = Staging(root, None, Path(tmp))
        stage.urls[str(root)] = str(url)
        for name in found:
            local = root / name[len(path) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            with open(local, "wb") as fh:
                for block in RangeFile(as_url(f"{url.scheme}://{name}")).chunks():
                    fh.write(block)
        try:
            yield stage
        except CkptMigrateError as exc:
            raise _renamed(exc, stage) from None


def as_url(text: str) -> ObjectURL:
    url = as_location(text)
    assert isinstance(url, ObjectURL)
    return url
