"""Byte progress of one long read or write, shown only to someone watching a terminal.

The code that moves tensor bytes (the zip and safetensors writers, the digest reader) calls
:func:`advance`; nothing is drawn unless the CLI opened :func:`byte_bar` around the work on one
file. Library calls stay silent, and the worker threads of a batch (which has its own bar of
files) report into nothing: a context variable is not inherited by a thread pool.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: Smaller files are done before a bar is worth drawing.
MIN_BYTES = 64 << 20

_bar: ContextVar[Any] = ContextVar("ckptmigrate_byte_bar", default=None)


def advance(nbytes: int) -> None:
    """Count ``nbytes`` moved (read, copied or written) towards the open bar, if any."""
    bar = _bar.get()
    if bar is None:
        return
    if bar.n + nbytes > bar.total:  # a digest reads what a write then copies: the work grew
        bar.total = bar.n + nbytes
    bar.update(nbytes)


@contextmanager
def byte_bar(desc: str, total: int, *, show: bool) -> Iterator[None]:
    """A tqdm bar on stderr of ``total`` bytes for the block, when ``show`` and the file is large."""
    if not show or total < MIN_BYTES:
        yield
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              leave=False, dynamic_ncols=True) as bar:
        token = _bar.set(bar)
        try:
            yield
        finally:
            _bar.reset(token)


def file_bar(desc: str, path: str | os.PathLike[str], *, show: bool) -> Any:
    """:func:`byte_bar` sized by the file at ``path`` (the bytes a rewrite or a digest moves)."""
    try:
        size = os.stat(path).st_size if show else 0
    except OSError:
        size = 0
    return byte_bar(desc, size, show=show)
