"""Raw byte I/O the writers share: ``pwrite`` that never silently writes fewer bytes, and a copy of
a byte range done by the kernel (``copy_file_range``: a reflink on XFS/btrfs) where it can."""

from __future__ import annotations

import errno
import os

from ckptmigrate.util.progress import advance

_CHUNK = 8 << 20


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written: a short write (a disk filling up) is retried,
    and a write that makes no progress is the error it is, not silently fewer bytes."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        offset += n
        view = view[n:]
        advance(n)


def copy_range(src_fd: int, dst_fd: int, src_offset: int, size: int, dst_offset: int) -> None:
    """Copy bytes between files in the kernel when it can (reflink/copy_file_range), else by reads."""
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < size:
        n = min(size - done, 1 << 30)
        if use_kernel:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, n, src_offset + done, dst_offset + done)
            except OSError:
                use_kernel = False
                continue
            advance(copied)
        else:
            chunk = os.pread(src_fd, min(n, _CHUNK), src_offset + done)
            if chunk:
                write_all(dst_fd, chunk, dst_offset + done)
            copied = len(chunk)
        if copied == 0:
            raise OSError(errno.EIO, "the source ended while its bytes were being copied")
        done += copied
