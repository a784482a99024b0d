"""Replacing a Google Cloud Storage object in one step, conditionally on the generation read.

GCS cannot append, and cannot assemble an object from byte ranges of another, but ``compose``
joins whole objects: a torch zip whose metadata-only rewrite is the whole old object and an
appended tail (what a local in-place append writes) is :func:`append`, the tail uploaded as a
temporary object and composed after the object at the generation read, no old byte moving. Any
other write streams: the bytes kept are read back in bounded ranges and sent, with the new tail,
through one resumable upload (or a staged file is sent the same way); GCS creates the object only
when the last chunk arrives (or the compose succeeds), so a reader sees the old object or the new
one, never a half. The upload (and the compose) carries ``ifGenerationMatch`` with the generation
read when the object was opened (``0`` for a new object: create only), which GCS checks when it
finalises; the generation is also checked right before the last chunk is sent or the compose
(the emulator the tests run enforces ``ifGenerationMatch`` on neither). The loser of two runners
raises :class:`~ckptmigrate.errors.ObjectChanged` and the object is not created. A failed upload
is cancelled (an unfinalised upload is never an object; GCS forgets it after a week).

The backup is, in a bucket with versioning on, the generation read (``gs://b/k#GEN``), else a
server-side ``rewrite`` to ``KEY.bak`` (``.bak.1``, ...; never overwritten: ``ifGenerationMatch=0``)
conditional on the source generation.
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec.asyn

from ckptmigrate.errors import BadInput, CkptMigrateWarning, ObjectChanged, RemoteError
from ckptmigrate.storage.bucket_object import BucketObject
from ckptmigrate.storage.pieces import Piece, read_through
from ckptmigrate.storage.ranges import TRANSFER, RangeFile, appeared
from ckptmigrate.util.urls import ObjectGeneration, ObjectURL, translated

WRITABLE = ("gs", "gcs")
#: GCS takes a resumable upload's chunks in multiples of 256 KiB (but the last).
QUANTUM = 256 << 10
#: Bytes per chunk sent and per range read back (``CKPTMIGRATE_GCS_CHUNK_SIZE`` overrides it):
#: memory holds a few.
CHUNK = 16 << 20
#: GCS's most components of a composite object (``compose``).
MAX_COMPONENTS = 1024
#: The temporary object an append uploads its tail to: ``KEY`` + this + a unique id.
TAIL_MARK = ".ckptmigrate-tail-"


@dataclass
class GcsObject(BucketObject):
    """An object to replace, conditionally on its generation (``etag`` here; a new one:
    ``ifGenerationMatch=0``)."""

    @classmethod
    def of(cls, url: ObjectURL, generation: str | None) -> GcsObject:
        return cls(url, *cls.located(url), generation)

    def call(self, method: str, path: str, *args: str, action: str = "write", **kwargs: Any) -> Any:
        """One JSON API request through gcsfs (its credentials, endpoint and retries); a failed
        precondition is the other writer's win."""
        TRANSFER.requests += 1
        try:
            with translated(self.url, action):
                return self.fs.call(method, path, *args, **kwargs)
        except RemoteError as exc:
            if isinstance(exc.__context__, FileExistsError):  # gcsfs's name for HTTP 412
                raise self.changed(self.head_etag()) from None
            raise

    def head_etag(self) -> str | None:
        """The object's generation now (None: there is no object)."""
        TRANSFER.requests += 1
        try:
            with translated(self.url):
                meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
        except RemoteError as exc:
            if "no such object" in str(exc):
                return None
            raise
        return str(meta["generation"])

    def changed(self, found: str | None) -> ObjectChanged:
        if self.create_only:
            return appeared(self.url, found)
        return ObjectChanged(f"{self.url}: the object changed since it was read (generation {self.etag} -> "
                             f"{found}): another writer got there first; nothing was written", url=str(self.url),
                             expected=self.etag, found=found)

    def check_unchanged(self) -> None:
        if self.etag is None and not self.create_only:
            return  # an unconditional write (--overwrite)
        found = self.head_etag()
        if found != self.etag:
            raise self.changed(found)

    def precondition(self) -> dict[str, str]:
        if self.etag is not None:
            return {"ifGenerationMatch": self.etag}
        return {"ifGenerationMatch": "0"} if self.create_only else {}


def chunk_size() -> int:
    text = os.environ.get("CKPTMIGRATE_GCS_CHUNK_SIZE")
    if not text:
        return CHUNK
    if not text.isdigit() or int(text) < QUANTUM or int(text) % QUANTUM:
        raise BadInput(f"CKPTMIGRATE_GCS_CHUNK_SIZE={text!r}: a chunk size in bytes, a multiple of {QUANTUM}")
    return int(text)


def backup(obj: GcsObject) -> ObjectURL:
    """Where the object as read stays: in a bucket with versioning on, the generation read (which
    replacing the object keeps as a noncurrent version), else a server-side copy ``KEY.bak``."""
    if obj.etag is not None:
        meta = obj.call("GET", "b/{}", obj.bucket, fields="versioning", json_out=True)
        if (meta.get("versioning") or {}).get("enabled"):
            return ObjectGeneration.of(obj.url, obj.etag)
    return backup_copy(obj)


def backup_copy(obj: GcsObject) -> ObjectURL:
    """A server-side rewrite of the object to the first free ``KEY.bak`` (``.bak.1``, ...), created
    only where nothing is (``ifGenerationMatch=0``), from the generation read."""
    name = obj.free_backup_name()
    source = {"ifSourceGenerationMatch": obj.etag} if obj.etag is not None else {}
    token: str | None = None
    while True:
        out = obj.call("POST", "b/{}/o/{}/rewriteTo/b/{}/o/{}", obj.bucket, obj.key, obj.bucket, name,
                       json_out=True, ifGenerationMatch="0", rewriteToken=token, **source)
        if out.get("done"):
            break
        token = out["rewriteToken"]
    TRANSFER.bytes_copied_server_side += int(out.get("objectSize") or 0)
    return ObjectURL(f"{obj.url.scheme}://{obj.bucket}/{name}")




def put(obj: GcsObject, body: bytes) -> str:
    """Replace (or create) a small object by ``body`` in one media upload carrying the precondition
    (``ifGenerationMatch``: the generation read, ``0`` for create-only); the new generation. The
    precondition is also checked right before (the emulator the tests run does not enforce it)."""
    obj.check_unchanged()
    try:
        out = obj.call("POST", f"{obj.fs._location}/upload/storage/v1/b/{{}}/o", obj.bucket, uploadType="media",
                       name=obj.key, data=body, headers={"Content-Type": "application/octet-stream"},
                       json_out=True, **obj.precondition())
    except RemoteError as exc:
        if "no such object" in str(exc):
            raise RemoteError(f"{obj.url}: cannot write: the bucket does not exist", url=str(obj.url)) from None
        raise
    TRANSFER.bytes_sent += len(body)
    return str(out["generation"])


def delete(obj: GcsObject) -> None:
    """Delete the object, conditionally on the generation read (if one was; checked first as well)."""
    condition = {"ifGenerationMatch": obj.etag} if obj.etag is not None else {}
    if condition:
        obj.check_unchanged()
    obj.call("DELETE", "b/{}/o/{}", obj.bucket, obj.key, action="delete", **condition)


def appendable(obj: GcsObject) -> str | None:
    """The object's CRC32C (as GCS gives it: base64) when :func:`append` can add to it: a
    composite of fewer than :data:`MAX_COMPONENTS` objects (each append adds one; past that, a
    rewrite streams the object and the count starts again at one); else None. An object no longer
    the generation read is the other writer's win, found before any byte moves."""
    if obj.etag is None:
        return None
    TRANSFER.requests += 1
    try:
        with translated(obj.url):
            meta = obj.fs.call("GET", "b/{}/o/{}", obj.bucket, obj.key, fields="generation,componentCount,crc32c",
                               json_out=True)
    except RemoteError as exc:
        if "no such object" in str(exc):
            raise obj.changed(None) from None
        raise
    if str(meta.get("generation")) != obj.etag:
        raise obj.changed(str(meta.get("generation")))
    if int(meta.get("componentCount") or 1) >= MAX_COMPONENTS or not meta.get("crc32c"):
        return None
    return str(meta["crc32c"])


def append(obj: GcsObject, old: RangeFile, tail: bytes, crc32c: str) -> None:
    """Replace the object by itself followed by ``tail``, without its bytes crossing the network:
    ``tail`` is uploaded as a temporary object beside it (a unique name, create-only), then
    ``compose`` joins [the object at the generation read, the tail] into the key, conditionally on
    that generation (``ifGenerationMatch``; also checked just before: the emulator the tests run
    enforces neither). The temporary object is deleted after, whatever happened. A compose refused
    as stale that had in fact succeeded (its answer lost, the request retried) is known by the
    object's size and CRC32C, ``crc32c`` (the object's as read) extended by ``tail``."""
    assert obj.etag is not None
    name = f"{obj.key}{TAIL_MARK}{uuid.uuid4().hex}"
    part = GcsObject(ObjectURL(f"{obj.url.scheme}://{obj.bucket}/{name}"), obj.fs, obj.bucket, name, None,
                     create_only=True)
    try:
        upload_blocks(part, len(tail), [[tail]])
        obj.check_unchanged()
        sources = [{"name": obj.key, "generation": obj.etag, "objectPreconditions": {"ifGenerationMatch": obj.etag}},
                   {"name": name}]
        try:
            obj.call("POST", "b/{}/o/{}/compose", obj.bucket, obj.key, json_out=True, ifGenerationMatch=obj.etag,
                     json={"sourceObjects": sources, "destination": {"contentType": "application/octet-stream"}})
        except ObjectChanged:
            if not _is(obj, old.size + len(tail), extended_crc32c(crc32c, tail)):
                raise
        TRANSFER.bytes_copied_server_side += old.size
    except BaseException:
        with contextlib.suppress(Exception):  # the error that stopped the write is the one to report
            delete(part)
        raise
    try:
        delete(part)
    except RemoteError as exc:  # the object is written: a stray temporary object is not a failed write
        warnings.warn(f"{part.url}: a temporary object of the write to {obj.url} could not be deleted ({exc}); "
                      "delete it", CkptMigrateWarning, stacklevel=2)


def extended_crc32c(crc32c: str, data: bytes) -> str:
    """The CRC32C (GCS's base64 of its 4 big-endian bytes) of an object's bytes followed by ``data``."""
    import google_crc32c  # google-cloud-storage's, which gcsfs requires

    value = google_crc32c.extend(int.from_bytes(base64.b64decode(crc32c), "big"), data)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def _is(obj: GcsObject, size: int, crc32c: str) -> bool:
    """Whether the object now has ``size`` bytes and the CRC32C ``crc32c``."""
    TRANSFER.requests += 1
    try:
        with translated(obj.url):
            meta = obj.fs.call("GET", "b/{}/o/{}", obj.bucket, obj.key, fields="size,crc32c", json_out=True)
    except RemoteError:
        return False
    return int(meta.get("size") or -1) == size and meta.get("crc32c") == crc32c


def compose(obj: GcsObject, old: RangeFile, keep: int, tail: bytes) -> None:
    """Replace the object by its first ``keep`` bytes and ``tail``: the kept bytes read back in
    bounded ranges and sent with the tail in one resumable upload (GCS has no server-side splice)."""
    upload_blocks(obj, keep + len(tail), [_streamed(old, 0, keep), [tail]])


def replace_head(obj: GcsObject, old: RangeFile, head: bytes, skip: int) -> None:
    """Replace the object by ``head`` and its bytes from ``skip`` on (a safetensors header rewritten
    before the same data), the old bytes streamed through in bounded ranges."""
    upload_blocks(obj, len(head) + old.size - skip, [[head], _streamed(old, skip, old.size)])


def _streamed(old: RangeFile, begin: int, end: int) -> Iterator[bytes]:
    """The old object's bytes ``begin``..``end`` read in chunks, each counted and checked for length."""
    step = chunk_size()
    for start in range(begin, end, step):
        stop = min(end, start + step)
        (block,) = old.fetcher.ranges([(start, stop)])
        TRANSFER.requests += 1
        TRANSFER.bytes_received += len(block)
        if len(block) != stop - start:
            old._short(f"asked for bytes {start}-{stop - 1}, got {len(block)} bytes")
        yield block


def upload(obj: GcsObject, path: str | os.PathLike[str]) -> None:
    """Replace (or create) the object with a local file, read a chunk at a time."""
    size = os.path.getsize(path)
    step = chunk_size()
    with open(path, "rb") as fh:
        upload_blocks(obj, size, [iter(lambda: fh.read(step), b"")])


def stream(obj: GcsObject, old: RangeFile, pieces: Iterable[Piece], total: int, before: Callable[[], None]) -> None:
    """Replace the object by ``pieces`` (``total`` bytes) as they come, in one resumable upload: kept
    ranges read from ``old`` and sent through (GCS copies no byte range server-side). ``before``
    (the read-back of the object to be) runs before the last chunk, which creates the object."""
    upload_blocks(obj, total, [read_through(old, pieces, chunk_size())], before=before)


def upload_blocks(obj: GcsObject, total: int, sources: Iterable[Iterable[bytes | memoryview]],
                  before: Callable[[], None] | None = None) -> None:
    """One resumable upload of ``total`` bytes from ``sources`` in turn; ``before`` runs and the
    precondition is checked once more before the last chunk, which is what creates the object."""
    step = chunk_size()
    location = _initiate(obj)
    try:
        offset, pending = 0, bytearray()
        for source in sources:
            for block in source:
                pending += block
                while len(pending) > step:  # the last chunk waits for the check
                    _send(obj, location, bytes(pending[:step]), offset, total)
                    offset += step
                    del pending[:step]
        if offset + len(pending) != total:
            raise RemoteError(f"{obj.url}: {offset + len(pending)} bytes to send, {total} announced; nothing "
                              "was written", url=str(obj.url))
        if before is not None:
            before()
        obj.check_unchanged()
        _send(obj, location, bytes(pending), offset, total)
    except BaseException:
        _cancel(obj, location)
        raise


def _initiate(obj: GcsObject) -> str:
    """A resumable upload session, carrying the precondition; a 404 here can only be the bucket's."""
    try:
        headers, _ = obj.call("POST", f"{obj.fs._location}/upload/storage/v1/b/{{}}/o", obj.bucket,
                              uploadType="resumable", name=obj.key, json={"name": obj.key},
                              headers={"X-Upload-Content-Type": "application/octet-stream"}, **obj.precondition())
    except RemoteError as exc:
        if "no such object" in str(exc):
            raise RemoteError(f"{obj.url}: cannot write: the bucket does not exist", url=str(obj.url)) from None
        raise
    location = headers["Location"]
    return str(location[0] if isinstance(location, list) else location)


def _send(obj: GcsObject, location: str, data: bytes, offset: int, total: int) -> None:
    """One chunk; GCS may keep fewer bytes than sent (its ``Range`` answer says how many): the rest
    is sent again."""
    while data:
        end = offset + len(data) - 1
        headers, _ = obj.call("PUT", location, data=data, headers={
            "Content-Range": f"bytes {offset}-{end}/{total}", "Content-Length": str(len(data))})
        TRANSFER.bytes_sent += len(data)
        got = headers.get("Range")
        if end + 1 == total or got is None:
            return
        kept = int(str(got).rsplit("-", 1)[1]) + 1
        data, offset = data[kept - offset:], kept


def _cancel(obj: GcsObject, location: str) -> None:
    """Cancel an unfinished upload: one ``DELETE`` of its session, not retried. Best effort: an
    upload never finalised never becomes an object, and GCS drops it after a week (the emulator
    the tests run cannot cancel one: it answers 501)."""

    async def delete() -> None:
        session = await obj.fs._set_session()
        async with session.request("DELETE", location, headers=obj.fs._get_headers(None),
                                   timeout=obj.fs.requests_timeout):
            pass

    with contextlib.suppress(Exception):  # see the docstring: nothing is left to clean up either way
        fsspec.asyn.sync(obj.fs.loop, delete)
