"""Which writer replaces an object: S3's (the kept byte ranges assembled server-side,
storage/s3_compose), Google Cloud Storage's (a streamed resumable upload, or ``compose`` of the
whole object and an appended tail, storage/gcs_write), Azure's (a block list: the blob's own
committed blocks and an appended one, or blocks streamed, storage/azure_write) or the Hugging Face
Hub's (a commit on top of the commit read, storage/hf_commit). All write in one step,
conditionally on what was read, and take the same backups."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ckptmigrate.errors import RemoteError
from ckptmigrate.storage import azure_write, gcs_write, hf_commit, s3_compose
from ckptmigrate.storage.pieces import Piece
from ckptmigrate.storage.ranges import RangeFile
from ckptmigrate.util.urls import ObjectURL, ObjectVersion, filesystem, translated

#: An object in a bucket, replaced object by object.
ObjectTarget = s3_compose.S3Object | gcs_write.GcsObject | azure_write.AzureObject
Target = ObjectTarget | hf_commit.HubFile


def writable(scheme: str) -> bool:
    """Whether objects under ``scheme://`` are replaced object by object (the prefix protocol of
    storage/prefix_write; a Hub repository is written by one commit instead, storage/hf_commit)."""
    return scheme in (*s3_compose.WRITABLE, *gcs_write.WRITABLE, *azure_write.WRITABLE)


def target(url: ObjectURL, etag: str | None, version: str | None = None) -> Target:
    """The object at ``url`` to replace, conditionally on the ETag (S3, Azure) or generation (GCS,
    ``version``) read, or the Hub commit (``version``) read; a scheme that is not written is one line."""
    if url.scheme in hf_commit.WRITABLE:
        return hf_commit.HubFile.of(url, version)
    return object_target(url, etag, version)


def object_target(url: ObjectURL, etag: str | None, version: str | None = None, *,
                  create_only: bool = False) -> ObjectTarget:
    """:func:`target` in a bucket, or (``create_only``) an object to create where none is."""
    obj: ObjectTarget
    if url.scheme in gcs_write.WRITABLE:
        obj = gcs_write.GcsObject.of(url, version)
    elif url.scheme in azure_write.WRITABLE:
        obj = azure_write.AzureObject.of(url, etag)
    else:
        obj = s3_compose.S3Object.of(url, etag, version)
    obj.create_only = create_only
    return obj


def as_found(url: ObjectURL) -> ObjectTarget:
    """The object at ``url`` to write conditionally on what is there now: replacing the object as
    found, or created where there is none."""
    obj = object_target(url, None)
    obj.etag = found(obj)  # every writer names its precondition token ``etag`` (GCS: the generation)
    obj.create_only = obj.etag is None
    return obj


def found(obj: ObjectTarget) -> str | None:
    """The object's precondition token now (ETag or generation), or None when there is no object."""
    if isinstance(obj, s3_compose.S3Object):
        try:
            return obj.head_etag()
        except RemoteError as exc:
            if "no such object" in str(exc):
                return None
            raise
    return obj.head_etag()


def put(obj: ObjectTarget, body: bytes) -> str | None:
    """Replace (or create) a small object by ``body`` in one conditional request (If-Match /
    ifGenerationMatch on what was read, or create-only); the new object's ETag or generation, what
    a later write in its place is conditional on."""
    if isinstance(obj, azure_write.AzureObject):
        return azure_write.put(obj, body)
    return gcs_write.put(obj, body) if isinstance(obj, gcs_write.GcsObject) else s3_compose.put(obj, body)


def delete(obj: ObjectTarget) -> None:
    """Delete the object (on GCS and Azure conditional on what was read, if anything was; S3 has no
    conditional delete on an ETag everywhere)."""
    if isinstance(obj, azure_write.AzureObject):
        azure_write.delete(obj)
    elif isinstance(obj, gcs_write.GcsObject):
        gcs_write.delete(obj)
    else:
        s3_compose.delete(obj)


def backup_copy(obj: ObjectTarget) -> ObjectURL:
    """A server-side copy at ``KEY.bak`` (``.bak.1``, ...), never the version read: for a protocol
    that keeps several objects' backups, each its own object."""
    if isinstance(obj, azure_write.AzureObject):
        return azure_write.backup(obj)
    return gcs_write.backup_copy(obj) if isinstance(obj, gcs_write.GcsObject) else s3_compose.backup_copy(obj)


def describe(obj: Target, what: str | None) -> None:
    """Name the change (``upgrade c1 -> c2``) where the store keeps a message with it: a Hub commit's."""
    if isinstance(obj, hf_commit.HubFile) and what:
        hf_commit.describe(obj, what, [obj.key])


def backup(obj: Target) -> ObjectURL:
    if isinstance(obj, hf_commit.HubFile):
        return hf_commit.backup(obj)
    if isinstance(obj, azure_write.AzureObject):
        return azure_write.backup(obj)
    return gcs_write.backup(obj) if isinstance(obj, gcs_write.GcsObject) else s3_compose.backup(obj)


def upload(obj: Target, path: str | os.PathLike[str]) -> None:
    if isinstance(obj, hf_commit.HubFile):
        hf_commit.upload(obj, path)
    elif isinstance(obj, azure_write.AzureObject):
        azure_write.upload(obj, path)
    elif isinstance(obj, gcs_write.GcsObject):
        gcs_write.upload(obj, path)
    else:
        s3_compose.upload(obj, path)


def stream(obj: ObjectTarget, old: RangeFile, pieces: Iterable[Piece], total: int, before: Callable[[], None]) -> None:
    """Replace the object by ``pieces`` (``total`` bytes, new or kept ranges of ``old``) as they come,
    without a local file, in one conditional step; ``before`` (the read-back of the object to be)
    runs before that step. Not on the Hub: an LFS upload needs the whole file's SHA-256 first."""
    if isinstance(obj, azure_write.AzureObject):
        azure_write.stream(obj, old, pieces, before)
    elif isinstance(obj, gcs_write.GcsObject):
        gcs_write.stream(obj, old, pieces, total, before)
    else:
        s3_compose.stream(obj, old, pieces, before)


@dataclass
class Appendable:
    """An object the store can add bytes to without the old ones moving (:func:`append`):
    ``blocks``, an Azure blob's committed blocks; ``crc32c``, a GCS object's checksum."""

    blocks: list[azure_write.Block] | None = None
    crc32c: str | None = None


def appendable(obj: Target, size: int) -> Appendable | None:
    """Whether a metadata-only rewrite of ``obj`` (``size`` bytes as read) is best the whole object
    and an appended tail: on GCS (``compose``; under 1,024 components) and on an Azure blob of
    committed blocks (not one ``Put Blob``), which keep only whole objects or blocks server-side.
    None elsewhere: S3 copies the records by byte range (:func:`compose`), and an object that
    cannot take an append is streamed."""
    if isinstance(obj, azure_write.AzureObject):
        blocks = azure_write.committed_blocks(obj, size)
        return None if blocks is None else Appendable(blocks)
    if isinstance(obj, gcs_write.GcsObject):
        crc32c = gcs_write.appendable(obj)
        return None if crc32c is None else Appendable(crc32c=crc32c)
    return None


def append(obj: Target, old: RangeFile, tail: bytes, how: Appendable) -> None:
    """Replace the object by itself (``old``, as read) followed by ``tail``, assembled server-side."""
    if isinstance(obj, azure_write.AzureObject):
        assert how.blocks is not None
        azure_write.append(obj, how.blocks, tail)
    elif isinstance(obj, gcs_write.GcsObject):
        assert how.crc32c is not None
        gcs_write.append(obj, old, tail, how.crc32c)
    else:
        raise AssertionError(f"{obj.url}: appended only on GCS and Azure")


def copies_from(obj: Target, old: RangeFile, keep: int | None = None) -> bool:
    """Whether :func:`compose` of ``obj`` copies ``old``'s first ``keep`` bytes (by default: all)
    server-side, every part conditional on ``old`` as read (S3 to S3, the same endpoint: parts of
    at least 5 MiB)."""
    return isinstance(obj, s3_compose.S3Object) and old.url.scheme in s3_compose.WRITABLE \
        and (old.size if keep is None else keep) >= s3_compose.MIN_PART


def compose(obj: Target, old: RangeFile, keep: int, tail: bytes) -> None:
    """Replace (or create) the object by the first ``keep`` bytes of ``old`` and ``tail`` (S3: the
    kept ranges copied server-side, from ``old``'s bucket; GCS, Azure and the Hub: streamed through)."""
    if isinstance(obj, hf_commit.HubFile):
        hf_commit.compose(obj, old, keep, tail)
    elif isinstance(obj, azure_write.AzureObject):
        azure_write.compose(obj, old, keep, tail)
    elif isinstance(obj, gcs_write.GcsObject):
        gcs_write.compose(obj, old, keep, tail)
    else:
        s3_compose.compose(obj, old, keep, tail)


def replace_head(obj: Target, old: RangeFile, head: bytes, skip: int) -> None:
    if isinstance(obj, hf_commit.HubFile):
        hf_commit.replace_head(obj, old, head, skip)
    elif isinstance(obj, azure_write.AzureObject):
        azure_write.replace_head(obj, old, head, skip)
    elif isinstance(obj, gcs_write.GcsObject):
        gcs_write.replace_head(obj, old, head, skip)
    else:
        s3_compose.replace_head(obj, old, head, skip)


def remove(url: ObjectURL) -> None:
    """Delete an object this run created (a backup whose write failed); a version or generation is
    the object itself, kept by the bucket."""
    if isinstance(url, ObjectVersion):
        return
    fs, path = filesystem(url)
    with translated(url, "delete"):
        fs.rm_file(path)
