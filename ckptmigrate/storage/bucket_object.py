"""An object in a bucket that a writer replaces (S3, GCS, Azure): where it is, and the precondition
token read with it, so that every write is conditional on the object being the one read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckptmigrate.storage.ranges import TRANSFER
from ckptmigrate.util.urls import ObjectURL, filesystem, translated


@dataclass
class BucketObject:
    """``etag`` is each store's precondition token under one name (S3's and Azure's ETag, GCS's
    generation); None for an unconditional write."""

    url: ObjectURL
    fs: Any
    bucket: str
    key: str
    etag: str | None
    #: A new object: written only if none is there when the write completes.
    create_only: bool = False

    @staticmethod
    def located(url: ObjectURL) -> tuple[Any, str, str]:
        """The filesystem, bucket and key of ``url``."""
        fs, path = filesystem(url)
        bucket, _, key = path.partition("/")
        return fs, bucket, key

    def free_backup_name(self) -> str:
        """The first of ``KEY.bak``, ``KEY.bak.1``, ... where no object is: a backup replaces none."""
        n = 0
        while True:
            name = self.key + ".bak" + (f".{n}" if n else "")
            TRANSFER.requests += 1
            with translated(self.url, "back up"):
                self.fs.invalidate_cache(f"{self.bucket}/{name}")
                if not self.fs.exists(f"{self.bucket}/{name}"):
                    return name
            n += 1
