"""Replacing an S3 object in one step, conditionally, from byte ranges of itself and new bytes.

An object store cannot append; S3 can assemble a new object from ranges of the old one with a
multipart upload (``UploadPartCopy``, server-side: nothing crosses the network) and a part of new
bytes. The object changes only when ``CompleteMultipartUpload`` (or a single ``PutObject``)
succeeds: a reader sees the old object or the new one, never a half. Every write is conditional on
the ETag read when the object was opened (``If-Match`` on the put and the complete,
``CopySourceIfMatch`` on each copied part), and the ETag is checked once more right before the
complete (moto, the test server, does not enforce ``If-Match`` on a complete); the loser of two
runners raises :class:`~ckptmigrate.errors.ObjectChanged` and writes nothing. Any failure aborts
the multipart upload, so no parts are left behind (or billed).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from ckptmigrate.errors import BadInput, ObjectChanged, RemoteError
from ckptmigrate.storage.bucket_object import BucketObject
from ckptmigrate.storage.pieces import Kept, Piece, merged, read_through
from ckptmigrate.storage.ranges import TRANSFER, RangeFile, appeared, changed
from ckptmigrate.util.urls import ObjectURL, ObjectVersion, filesystem, translated

#: S3's part sizes: every part but the last at least 5 MiB, none over 5 GiB; at most 10,000 parts.
MIN_PART = 5 << 20
MAX_PART = 5 << 30
MAX_PARTS = 10_000
#: Staged uploads: one conditional PutObject up to this size, else parts of this size (as the AWS CLI's
#: ``multipart_chunksize``; ``CKPTMIGRATE_S3_PART_SIZE`` in bytes, at least 5 MiB, overrides it).
UPLOAD_PART = 64 << 20
WRITABLE = ("s3", "s3a")


@dataclass
class S3Object(BucketObject):
    """An object to replace, conditionally on its ETag (a new one: ``If-None-Match: *``), and its
    version where the bucket keeps versions."""

    version: str | None = None

    @classmethod
    def of(cls, url: ObjectURL, etag: str | None, version: str | None = None) -> S3Object:
        if url.scheme not in WRITABLE:
            raise RemoteError(f"{url}: writing to {url.scheme}:// is not supported (only s3://, gs://, az:// "
                              "objects and hf:// files are rewritten; other URLs are read-only: inspect, current, "
                              "diff, check, --dry-run)",
                              url=str(url))
        return cls(url, *cls.located(url), etag, version=version)

    def call(self, op: str, **kwargs: Any) -> Any:
        TRANSFER.requests += 1
        try:
            with translated(self.url, "write"):
                return self.fs.call_s3(op, Bucket=self.bucket, **kwargs)
        except RemoteError as exc:
            if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc):
                raise self.changed(self.head_etag()) from None
            raise

    def head_etag(self) -> str | None:
        TRANSFER.requests += 1
        with translated(self.url):
            head = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)
        return str(head.get("ETag")) if head.get("ETag") else None

    def changed(self, found: str | None) -> ObjectChanged:
        if self.create_only:
            return appeared(self.url, found)
        return changed(self.url, self.etag, found)

    def check_unchanged(self) -> None:
        if self.etag is None and not self.create_only:
            return  # an unconditional write (--overwrite)
        try:
            found = self.head_etag()
        except RemoteError as exc:
            if not self.create_only or "no such object" not in str(exc):
                raise
            found = None
        if found != self.etag:
            raise self.changed(found)


def backup(obj: S3Object) -> ObjectURL:
    """Where the object as read stays: in a versioned bucket its version (which replacing the object
    keeps, at no cost), else a server-side copy :func:`backup_copy`."""
    if obj.version and obj.version != "null":
        status = obj.call("get_bucket_versioning").get("Status")
        if status == "Enabled":
            return ObjectVersion.of(obj.url, obj.version)
    return backup_copy(obj)


def backup_copy(obj: S3Object) -> ObjectURL:
    """A server-side copy of the object at ``KEY.bak`` (``.bak.1``, ... when taken): the first name
    free, never overwritten. Nothing crosses the network but the request."""
    name = obj.free_backup_name()
    with translated(obj.url, "back up"):
        obj.fs.invalidate_cache(f"{obj.bucket}/{obj.key}")
        size = obj.fs.info(f"{obj.bucket}/{obj.key}")["size"]
        if size <= MAX_PART:
            obj.call("copy_object", Key=name, CopySource={"Bucket": obj.bucket, "Key": obj.key},
                     **({"CopySourceIfMatch": obj.etag} if obj.etag else {}))
        else:
            obj.fs.copy(f"{obj.bucket}/{obj.key}", f"{obj.bucket}/{name}")
    TRANSFER.bytes_copied_server_side += int(size)
    return ObjectURL(f"{obj.url.scheme}://{obj.bucket}/{name}")




def copy_ranges(keep: int) -> list[tuple[int, int]]:
    """``[0, keep)`` as the fewest ranges of at most :data:`MAX_PART` bytes, all but the last at least
    :data:`MIN_PART` (so the new part that follows them may be of any size)."""
    count = -(-keep // MAX_PART)
    step = -(-keep // count)
    return [(start, min(keep, start + step)) for start in range(0, keep, step)]


def compose(obj: S3Object, old: RangeFile, keep: int, tail: bytes) -> None:
    """Replace the object by its first ``keep`` bytes and ``tail``: server-side copies of the kept
    ranges and one uploaded part; an object too small for a copied part (under :data:`MIN_PART`) is
    sent whole in one conditional put (the kept bytes are read by range first)."""
    if keep < MIN_PART:
        body = old.pread(keep, 0) + tail
        _put(obj, body, len(body))
        return
    _multipart(obj, [*(("copy", a, b) for a, b in copy_ranges(keep)), ("data", tail)], source=_copy_source(old))


def replace_head(obj: S3Object, old: RangeFile, head: bytes, skip: int) -> None:
    """Replace the object by ``head`` and its bytes from ``skip`` on (a safetensors header rewritten
    before the same data): the first part is ``head`` and as many of the old bytes as make it
    :data:`MIN_PART` (read by range, then sent), every later part a server-side copy — about 5 MiB
    move each way, however large the object. An object no larger than one part is one put."""
    start = skip + max(0, MIN_PART - len(head))
    if start >= old.size:
        body = head + old.pread(old.size - skip, skip)
        _put(obj, body, len(body))
        return
    first = head + old.pread(start - skip, skip)
    copies = [(start + a, start + b) for a, b in copy_ranges(old.size - start)]
    _multipart(obj, [("data", first), *(("copy", a, b) for a, b in copies)])


def upload(obj: S3Object, path: str | os.PathLike[str]) -> None:
    """Replace the object by a local file (a migration staged on disk): one conditional put up to
    :data:`UPLOAD_PART`, else a multipart upload of parts read from the file one at a time."""
    size = os.path.getsize(path)
    part = part_size()
    with open(path, "rb") as fh:
        if size <= part:
            _put(obj, fh, size)
            return
        _multipart(obj, _file_parts(fh, size, part))


def part_size() -> int:
    text = os.environ.get("CKPTMIGRATE_S3_PART_SIZE")
    if not text:
        return UPLOAD_PART
    if not text.isdigit() or int(text) < MIN_PART or int(text) > MAX_PART:
        raise BadInput(f"CKPTMIGRATE_S3_PART_SIZE={text!r}: a part size in bytes from {MIN_PART} to {MAX_PART}")
    return int(text)


def _file_parts(fh: BinaryIO, size: int, part: int) -> Iterator[tuple[str, bytes]]:
    for _start in range(0, size, part):
        yield ("data", fh.read(part))


def _condition(obj: S3Object) -> dict[str, str]:
    """The write's precondition: the object still the one read, or (a new object) still absent."""
    if obj.etag:
        return {"IfMatch": obj.etag}
    return {"IfNoneMatch": "*"} if obj.create_only else {}


def put(obj: S3Object, body: bytes) -> str | None:
    """Replace (or create) the object by ``body`` in one conditional put; the new object's ETag."""
    return _put(obj, body, len(body))


def delete(obj: S3Object) -> None:
    """Delete the object (unconditionally: S3 has no conditional delete on an ETag everywhere)."""
    obj.call("delete_object", Key=obj.key)


def _put(obj: S3Object, body: Any, size: int) -> str | None:
    etag = obj.call("put_object", Key=obj.key, Body=body, **_condition(obj)).get("ETag")
    TRANSFER.bytes_sent += size
    return str(etag) if etag else None


def stream(obj: S3Object, old: RangeFile, pieces: Iterable[Piece], before: Callable[[], None]) -> None:
    """Replace (or create) the object by ``pieces`` as they come, in one multipart upload: kept
    ranges of ``old`` of at least :data:`MIN_PART` copied server-side (``UploadPartCopy``, from
    ``old`` as read: the object itself, or another in the same endpoint, any bucket), new bytes and
    shorter kept ranges (read by range) sent in parts of :func:`part_size`. An ``old`` in another
    store is read through. Memory holds about a part. ``before`` (the read-back of the object to
    be) runs after the last part, before the complete."""
    source = _copy_source(old)
    if source is not None:
        parts = _stream_parts(obj, old, merged(pieces), part_size())
    else:
        parts = _stream_parts(obj, old, read_through(old, pieces, part_size()), part_size())
    _multipart(obj, parts, before=before, source=source)


def _copy_source(old: RangeFile) -> CopySource | None:
    """``old`` as the source of copied parts: an object in S3 (the same endpoint: any bucket)."""
    if old.url.scheme not in WRITABLE:
        return None
    _fs, path = filesystem(old.url)
    bucket, _, key = path.partition("/")
    return CopySource(old.url, bucket, key, old.etag)


@dataclass(frozen=True)
class CopySource:
    """The object a copied part is a range of, as read (its ETag, which each copy is conditional on)."""

    url: ObjectURL
    bucket: str
    key: str
    etag: str | None

    @classmethod
    def of(cls, obj: S3Object) -> CopySource:
        return cls(obj.url, obj.bucket, obj.key, obj.etag)


def _stream_parts(obj: S3Object, old: RangeFile, pieces: Iterable[Piece], part: int) -> Iterator[Any]:
    """The parts of :func:`stream`, at most :data:`MAX_PARTS`."""
    for count, one in enumerate(_parts_of(old, pieces, part), start=1):
        if count > MAX_PARTS:
            raise BadInput(f"{obj.url}: the streamed write needs more than {MAX_PARTS} parts; set "
                           "CKPTMIGRATE_S3_PART_SIZE larger; nothing was written", path=str(obj.url))
        yield one


def _parts_of(old: RangeFile, pieces: Iterable[Piece], part: int) -> Iterator[Any]:
    """Every part but the last at least :data:`MIN_PART`: a kept range is copied when what is left
    of it, after enough of it is read to fill the part being filled to that size, still is."""
    buf = bytearray()
    sent = False

    def filled(data: bytes | memoryview) -> Iterator[tuple[str, bytearray]]:
        nonlocal buf
        view = memoryview(data).cast("B")
        while view:
            take = part - len(buf)
            buf.extend(view[:take])
            view = view[take:]
            if len(buf) >= part:  # sent as it is (no copy), a new one filled next
                full, buf = buf, bytearray()
                yield ("data", full)

    for piece in pieces:
        if not isinstance(piece, Kept):
            for one in filled(piece):
                sent = True
                yield one
            continue
        start, end = piece.start, piece.start + piece.size
        need = max(0, MIN_PART - len(buf)) if buf else 0
        if end - start - need < MIN_PART:  # too short to copy: read and sent
            for block in old.chunks(start, end):
                for one in filled(block):
                    sent = True
                    yield one
            continue
        for block in old.chunks(start, start + need):
            buf.extend(block)
        if buf:
            full, buf = buf, bytearray()
            yield ("data", full)
        for a, b in copy_ranges(end - start - need):
            sent = True
            yield ("copy", start + need + a, start + need + b)
    if buf or not sent:
        yield ("data", buf)


def _multipart(obj: S3Object, parts: Any, before: Callable[[], None] | None = None,
               source: CopySource | None = None) -> None:
    """One multipart upload of ``parts`` (new bytes, or ranges copied from ``source``: by default
    the object itself, as read), completed conditionally, or aborted."""
    source = source or CopySource.of(obj)
    upload_id = obj.call("create_multipart_upload", Key=obj.key)["UploadId"]
    try:
        done: list[dict[str, Any]] = []
        for number, part in enumerate(parts, start=1):
            if part[0] == "copy":
                _kind, start, end = part
                etag = _copy_part(obj, source, upload_id, number, start, end)
                TRANSFER.bytes_copied_server_side += end - start
            else:
                data = part[1]
                etag = obj.call("upload_part", Key=obj.key, UploadId=upload_id, PartNumber=number, Body=data)["ETag"]
                TRANSFER.bytes_sent += len(data)
            done.append({"PartNumber": number, "ETag": etag})
        if before is not None:
            before()
        obj.check_unchanged()
    except BaseException:
        abort(obj, upload_id)
        raise
    try:
        obj.call("complete_multipart_upload", Key=obj.key, UploadId=upload_id, MultipartUpload={"Parts": done},
                 **_condition(obj))
    except BaseException:
        # the answer to a complete can be lost after S3 completed it (a timeout, then a retry that finds
        # no such upload): the object then has the ETag of exactly these parts
        if _found_etag(obj) == multipart_etag([part["ETag"] for part in done]):
            return
        abort(obj, upload_id)
        raise


def _copy_part(obj: S3Object, source: CopySource, upload_id: str, number: int, start: int, end: int) -> str:
    """Part ``number``: bytes ``[start, end)`` of ``source`` copied server-side, only if it is still
    the object read (a source that changed is named as such, not the object written)."""
    args: dict[str, Any] = {"Key": obj.key, "UploadId": upload_id, "PartNumber": number,
            "CopySource": {"Bucket": source.bucket, "Key": source.key}, "CopySourceRange": f"bytes={start}-{end - 1}",
            **({"CopySourceIfMatch": source.etag} if source.etag else {})}
    if source.url == obj.url:
        return str(obj.call("upload_part_copy", **args)["CopyPartResult"]["ETag"])
    TRANSFER.requests += 1
    try:
        with translated(obj.url, "write"):
            result = obj.fs.call_s3("upload_part_copy", Bucket=obj.bucket, **args)
    except RemoteError as exc:
        if "pre-condition" not in str(exc) and "PreconditionFailed" not in str(exc):
            raise
        raise changed(source.url, source.etag, _found_etag(S3Object.of(source.url, source.etag))) from None
    return str(result["CopyPartResult"]["ETag"])


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags (MD5 of their MD5s, -count)."""
    digest = hashlib.md5(b"".join(bytes.fromhex(e.strip('"')) for e in part_etags), usedforsecurity=False)
    return f'"{digest.hexdigest()}-{len(part_etags)}"'


def _found_etag(obj: S3Object) -> str | None:
    try:
        return obj.head_etag()
    except RemoteError:
        return None


def abort(obj: S3Object, upload_id: str) -> None:
    """Abort a multipart upload (its parts are deleted); a failure to abort is not hidden."""
    try:
        obj.call("abort_multipart_upload", Key=obj.key, UploadId=upload_id)
    except RemoteError as exc:
        raise RemoteError(f"{obj.url}: the write failed and its multipart upload {upload_id} could not be "
                          f"aborted ({exc}); abort it with `aws s3api abort-multipart-upload`",
                          url=str(obj.url)) from exc
