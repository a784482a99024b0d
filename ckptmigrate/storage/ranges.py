"""A remote object read by byte range: a small cache, coalesced prefetches, and a count of what moved.

The zip and safetensors readers read a few hundred bytes here and there (end records, the central
directory, every local header, ``data.pkl``); over a network each read is a request. A
:class:`RangeFile` keeps what it fetched, fetches at least :data:`MIN_READ` bytes at once, and takes
hints (:meth:`RangeFile.prefetch`) of the ranges about to be read, merged into few requests. Tensor
bytes are fetched only when asked for (:meth:`RangeFile.stage`, a streamed copy in a temporary file).

:data:`TRANSFER` counts requests and bytes for the whole process: the commands report it.
"""

from __future__ import annotations

import base64
import bisect
import io
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from ckptmigrate.errors import BadInput, MultiFileObject, ObjectChanged, RemoteError
from ckptmigrate.util.urls import ObjectURL, filesystem, read_options, sync_tool, translated

#: The least a read near the end fetches: the end of a zip is found, then its directory, in one request or two.
MIN_READ = 64 << 10
#: The least a read elsewhere fetches: a header and its neighbours, not the tensor bytes after them.
SMALL_READ = 4 << 10
#: Ranges closer than this are fetched as one (the bytes between cost less than another request).
GAP = 16 << 10
#: Staging (the whole object, when tensor bytes are needed) streams in chunks of this size.
CHUNK = 16 << 20


@dataclass
class Transfer:
    """Requests made and bytes moved over the network by this process (server-side copies apart)."""

    requests: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    bytes_copied_server_side: int = 0

    def reset(self) -> None:
        self.requests = self.bytes_received = self.bytes_sent = self.bytes_copied_server_side = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """What moved since ``before``, a :meth:`to_dict` taken earlier (a command's share)."""
        return {k: v - before[k] for k, v in self.to_dict().items()}


TRANSFER = Transfer()

#: What the last object closed in this process held, for the next open of that same object: a command
#: that opens an object twice before it writes (a stamp reads the envelope, then the checkpoint)
#: fetches its metadata once. Keyed by URL, size, ETag and version, so an object changed since is read
#: afresh (a weak ETag proves no bytes the same, and is not kept).
_LAST: dict[tuple[str, int, str, str | None], tuple[list[int], dict[int, bytes]]] = {}
#: The most bytes kept there.
KEEP_AT_MOST = 64 << 20


class Fetcher(Protocol):
    size: int
    etag: str | None

    def ranges(self, spans: list[tuple[int, int]]) -> list[bytes]: ...

    def etag_now(self) -> str | None: ...


class FsspecObject:
    """An object through its fsspec filesystem (s3fs, gcsfs, adlfs, huggingface_hub)."""

    def __init__(self, url: ObjectURL) -> None:
        self.url = url
        self.fs, self.path = filesystem(url)
        commit = None
        with translated(url):
            if url.scheme == "hf":  # read at the commit the revision points at now
                from ckptmigrate.storage import hub_revisions

                self.fs.invalidate_cache(self.path)
                commit, self.path = hub_revisions.pinned(self.fs, self.path)
                TRANSFER.requests += 1
            self.fs.invalidate_cache(self.path)
            info = self.fs.info(self.path)
        TRANSFER.requests += 1
        if info.get("type") == "directory":
            marker = multi_file_marker(self.fs, self.path, url)
            if marker is not None:
                raise MultiFileObject(
                    f"{url}/: a multi-file checkpoint ({marker}), which this command does not take in object storage "
                    "(inspect, current, diff, verify and upgrade/downgrade/stamp in place do): copy the prefix to a "
                    f"local directory ({sync_tool(url.scheme)}) and run there", url=str(url),
                    marker=marker)
            raise RemoteError(f"{url}: is a prefix (a directory), not an object", url=str(url))
        self.size = int(info["size"])
        etag = info.get("ETag") or info.get("etag")
        self.etag = str(etag) if etag else None
        # S3's version id in a versioned bucket; a GCS object's generation (always there); the Hub commit read
        self.version = commit or info.get("VersionId") or (str(info["generation"]) if info.get("generation") else None)

    def etag_now(self) -> str | None:
        TRANSFER.requests += 1
        with translated(self.url):
            self.fs.invalidate_cache(self.path)
            info = self.fs.info(self.path)
        etag = info.get("ETag") or info.get("etag")
        return str(etag) if etag else None

    def ranges(self, spans: list[tuple[int, int]]) -> list[bytes]:
        with translated(self.url):
            out = self.fs.cat_ranges([self.path] * len(spans), [s for s, _ in spans], [e for _, e in spans],
                                     on_error="raise", **read_options(self.url))
        return [bytes(b) for b in out]


def multi_file_marker(fs: Any, path: str, url: ObjectURL) -> str | None:
    """The file that makes the prefix ``path`` one multi-file checkpoint (a DCP ``.metadata``, a
    sharded model's ``*.index.json``), if there is one."""
    with translated(url, "list"):
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    if ".metadata" in names:
        return ".metadata"
    return next((n for n in sorted(names) if n.endswith(".index.json") and not n.startswith(".")), None)


class HttpObject:
    """An object behind ``http(s)://``, read with ``Range`` requests by the standard library: a server
    that ignores ``Range`` is refused at its first answer, whose body is never read."""

    def __init__(self, url: ObjectURL) -> None:
        self.url = url
        TRANSFER.requests += 1
        with self._open("HEAD") as response:
            length = response.headers.get("Content-Length")
            etag = response.headers.get("ETag")
        if length is None:
            raise RemoteError(f"{url}: the server does not say how long the object is (no Content-Length)",
                              url=str(url))
        self.size = int(length)
        self.etag = etag

    def _open(self, method: str, headers: dict[str, str] | None = None) -> Any:
        parts = urlsplit(self.url.full)
        headers = dict(headers or {})
        if parts.username is not None:  # user:pass@ in the URL: HTTP basic authentication, as curl does
            secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
        bare = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, parts.query, ""))
        request = urllib.request.Request(bare, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=60)  # noqa: S310 - http(s) only, checked by scheme
        except urllib.error.HTTPError as exc:
            reason = {404: "no such object", 403: "access denied", 401: "not authorised (credentials?)"}
            raise RemoteError(f"{self.url}: cannot read: HTTP {exc.code} {reason.get(exc.code, exc.reason)}",
                              url=str(self.url)) from None
        except (urllib.error.URLError, OSError) as exc:
            detail = getattr(exc, "reason", exc)
            raise RemoteError(f"{self.url}: cannot read: {detail}", url=str(self.url)) from None

    def etag_now(self) -> str | None:
        TRANSFER.requests += 1
        with self._open("HEAD") as response:
            return response.headers.get("ETag")

    def ranges(self, spans: list[tuple[int, int]]) -> list[bytes]:
        out = []
        for start, end in spans:
            with self._open("GET", {"Range": f"bytes={start}-{end - 1}"}) as response:
                if response.status != 206 and not (start == 0 and end == self.size):
                    raise RemoteError(f"{self.url}: the server ignores Range requests (HTTP {response.status} "
                                      "with the whole object); ckptmigrate reads remote checkpoints by range only",
                                      url=str(self.url))
                out.append(response.read(end - start + 1))
        return out


def open_object(url: ObjectURL) -> Fetcher:
    return HttpObject(url) if url.scheme in ("http", "https") else FsspecObject(url)


def appeared(url: ObjectURL, found: str | None) -> ObjectChanged:
    """The loser of a create-only write: another writer made the object first."""
    return ObjectChanged(f"{url}: an object appeared there since the output was checked (another writer got "
                         "there first); nothing was written", url=str(url), expected=None, found=found)


def changed(url: ObjectURL, expected: str | None, found: str | None) -> ObjectChanged:
    return ObjectChanged(f"{url}: the object changed since it was read (ETag {expected} -> {found}): another "
                         "writer got there first; nothing was written", url=str(url), expected=expected, found=found)


class RangeFile(io.RawIOBase):
    """A read-only file over a remote object: ``pread`` and ``prefetch`` for the zip reader, ``read``
    and ``seek`` for the others; each fetch checked to be as long as asked (a truncated or changed
    object is an error naming the URL, never short data)."""

    def __init__(self, url: ObjectURL, fetcher: Fetcher | None = None) -> None:
        super().__init__()
        self.url = url
        self.fetcher = fetcher or open_object(url)
        self.size = self.fetcher.size
        self.etag = self.fetcher.etag
        #: The version read: in a versioned bucket its version, on GCS its generation, on the Hub the commit.
        self.version: str | None = getattr(self.fetcher, "version", None)
        kept = _LAST.get(self._key) if self._key is not None else None
        self._starts: list[int] = list(kept[0]) if kept else []
        self._blocks: dict[int, bytes] = dict(kept[1]) if kept else {}
        self._pos = 0

    @property
    def _key(self) -> tuple[str, int, str, str | None] | None:
        if not self.etag or self.etag.startswith("W/"):
            return None
        return str(self.url), self.size, self.etag, self.version

    def close(self) -> None:
        """Keep what was fetched for the next open of the same object (:data:`_LAST`)."""
        key = self._key
        if key is not None and not self.closed and sum(map(len, self._blocks.values())) <= KEEP_AT_MOST:
            _LAST.clear()
            _LAST[key] = (self._starts, self._blocks)
        super().close()

    # -- the cache -----------------------------------------------------------------------------------

    def _cached(self, offset: int, n: int) -> bytes | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        start = self._starts[i]
        block = self._blocks[start]
        if offset + n <= start + len(block):
            return block[offset - start : offset - start + n]
        return None

    def _fetch(self, spans: list[tuple[int, int]]) -> None:
        data = self.fetcher.ranges(spans)
        for (start, end), block in zip(spans, data, strict=True):
            TRANSFER.requests += 1
            TRANSFER.bytes_received += len(block)
            if len(block) != end - start:
                self._short(f"asked for bytes {start}-{end - 1}, got {len(block)} bytes")
            if start not in self._blocks:
                bisect.insort(self._starts, start)
            self._blocks[start] = block

    def _short(self, what: str) -> None:
        """A read came back short: the object changed since it was opened (another writer), or is truncated."""
        found = self.fetcher.etag_now() if self.etag else None
        if found != self.etag:
            raise changed(self.url, self.etag, found)
        raise RemoteError(f"{self.url}: {what}: the object is truncated", url=str(self.url))

    def pread(self, n: int, offset: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        if n == 0:
            return b""
        hit = self._cached(offset, n)
        if hit is None:
            near_end = offset + MIN_READ >= self.size
            end = min(self.size, offset + max(n, MIN_READ if near_end else SMALL_READ))
            # near the end the window reaches back: a zip's end records, then its directory, in one request
            start = min(offset, max(0, end - MIN_READ)) if near_end else offset
            self._fetch([(start, end)])
            hit = self._cached(offset, n)
            assert hit is not None
        return hit

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch ``(offset, length)`` ranges not already held, neighbours merged, in one batch."""
        spans: list[tuple[int, int]] = []
        for offset, length in sorted(ranges):
            end = min(self.size, offset + length)
            if end <= offset or self._cached(offset, end - offset) is not None:
                continue
            if spans and offset - spans[-1][1] <= GAP:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((offset, end))
        if spans:
            self._fetch(spans)

    def stage(self) -> BinaryIO:
        """The whole object in a temporary file, streamed in :data:`CHUNK` ranges (memory stays bounded)."""
        fh = tempfile.TemporaryFile()  # noqa: SIM115 - the caller owns it
        try:
            for block in self.chunks():
                fh.write(block)
            fh.flush()
        except BaseException:
            fh.close()
            raise
        return fh

    def stream(self, begin: int, stop: int) -> Iterator[bytes]:
        """Bytes ``begin`` to ``stop`` in consecutive pieces: what the cache holds from it, the rest
        fetched in ranges of at most :data:`CHUNK` (not kept), so each byte crosses the network once."""
        pos, stop = begin, min(stop, self.size)
        while pos < stop:
            i = bisect.bisect_right(self._starts, pos) - 1
            if i >= 0 and pos < self._starts[i] + len(self._blocks[self._starts[i]]):
                start = self._starts[i]
                block = self._blocks[start]
                piece = block[pos - start:min(stop, start + len(block)) - start]
            else:
                following = self._starts[i + 1] if i + 1 < len(self._starts) else stop
                piece = next(self.chunks(pos, min(stop, following, pos + CHUNK)))
            yield piece
            pos += len(piece)

    def chunks(self, begin: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The object's bytes (``begin`` to ``stop``: all of them by default), :data:`CHUNK` at a time,
        bypassing the cache."""
        stop = self.size if stop is None else min(stop, self.size)
        for start in range(begin, stop, CHUNK):
            end = min(stop, start + CHUNK)
            (block,) = self.fetcher.ranges([(start, end)])
            TRANSFER.requests += 1
            TRANSFER.bytes_received += len(block)
            if len(block) != end - start:
                self._short(f"the object is shorter than its {self.size} bytes")
            yield block

    # -- a file for readers that read sequentially --------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        data = self.pread(len(buffer), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def fileno(self) -> int:
        raise io.UnsupportedOperation(f"{self.url} is a remote object")


def read_small_object(url: ObjectURL, limit: int, *, what: str) -> bytes:
    """A small object whole (a key file), refused past ``limit`` bytes before anything is read."""
    remote = RangeFile(url)
    if remote.size > limit:
        raise BadInput(f"{url}: a {what} of {remote.size} bytes is larger than {limit} bytes", path=str(url))
    return remote.pread(remote.size, 0)


class Spliced:
    """An object as it will be after a write that keeps its first ``keep`` bytes and appends ``tail``:
    read back (from the cache and the tail) before anything is sent, so a wrong tail is never written."""

    def __init__(self, base: RangeFile, keep: int, tail: bytes) -> None:
        self.base, self.keep, self.tail = base, keep, tail
        self.size = keep + len(tail)
        self.url = base.url

    def pread(self, n: int, offset: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        head = self.base.pread(min(n, max(0, self.keep - offset)), offset) if offset < self.keep else b""
        rest = n - len(head)
        start = max(0, offset - self.keep)
        return head + self.tail[start : start + rest]

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        self.base.prefetch([(o, min(n, self.keep - o)) for o, n in ranges if o < self.keep])

    def close(self) -> None:
        """Nothing of its own to close: the base belongs to the checkpoint read."""


class Prefixed(io.RawIOBase):
    """An object as it will be after a write that puts ``head`` in place of its first ``skip`` bytes
    (a safetensors header before the same data): read back before anything is sent."""

    def __init__(self, base: RangeFile, head: bytes, skip: int) -> None:
        super().__init__()
        self.base, self.head, self.skip = base, head, skip
        self.size = len(head) + base.size - skip
        self.url = base.url
        self.etag, self.version = base.etag, base.version
        self._pos = 0

    def pread(self, n: int, offset: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        front = self.head[offset : offset + n] if offset < len(self.head) else b""
        rest = n - len(front)
        start = self.skip + max(0, offset - len(self.head))
        return front + (self.base.pread(rest, start) if rest else b"")

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Nothing to fetch ahead: the readers of a safetensors header read it in one go."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self.size}[whence] + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        data = self.pread(len(buffer), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        """The base belongs to the checkpoint read; nothing of its own to close."""
        super().close()
