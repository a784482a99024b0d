"""Which writer replaces an object in a bucket: S3's (the kept byte ranges assembled server-side,
storage/s3_compose), Google Cloud Storage's (a streamed resumable upload, or ``compose`` of the
whole object and an appended tail, storage/gcs_write) or Azure's (a block list: the blob's own
committed blocks and an appended one, or blocks streamed, storage/azure_write). All write in one
step, conditionally on what was read, and take the same backups."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckptmigrate.storage import azure_write, gcs_write, s3_compose
from ckptmigrate.storage.ranges import RangeFile
from ckptmigrate.util.urls import ObjectURL, ObjectVersion, filesystem, translated

Target = s3_compose.S3Object | gcs_write.GcsObject | azure_write.AzureObject


def target(url: ObjectURL, etag: str | None, version: str | None = None) -> Target:
    """The object at ``url`` to replace, conditionally on the ETag (S3) or generation (GCS,
    ``version``) read; a scheme that is not written is one line."""
    if url.scheme in gcs_write.WRITABLE:
        return gcs_write.GcsObject.of(url, version)
    if url.scheme in azure_write.WRITABLE:
        return azure_write.AzureObject.of(url, etag)
    return s3_compose.S3Object.of(url, etag, version)


def backup(obj: Target) -> ObjectURL:
    if isinstance(obj, azure_write.AzureObject):
        return azure_write.backup(obj)
    return gcs_write.backup(obj) if isinstance(obj, gcs_write.GcsObject) else s3_compose.backup(obj)


def upload(obj: Target, path: str | os.PathLike[str]) -> None:
    if isinstance(obj, azure_write.AzureObject):
        azure_write.upload(obj, path)
    elif isinstance(obj, gcs_write.GcsObject):
        gcs_write.upload(obj, path)
    else:
        s3_compose.upload(obj, path)


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


def compose(obj: Target, old: RangeFile, keep: int, tail: bytes) -> None:
    """Replace the object by its first ``keep`` bytes and ``tail`` (S3: the kept ranges copied
    server-side; GCS and Azure: streamed through)."""
    if isinstance(obj, azure_write.AzureObject):
        azure_write.compose(obj, old, keep, tail)
    elif isinstance(obj, gcs_write.GcsObject):
        gcs_write.compose(obj, old, keep, tail)
    else:
        s3_compose.compose(obj, old, keep, tail)


def replace_head(obj: Target, old: RangeFile, head: bytes, skip: int) -> None:
    if isinstance(obj, azure_write.AzureObject):
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
