"""Replacing an Azure blob in one step, conditionally on the ETag read.

A block blob is a committed list of blocks: blocks are staged (uncommitted: invisible to readers)
and ``Put Block List`` commits them at once, so a reader sees the old blob or the new one, never a
half. The commit carries ``If-Match`` with the ETag read when the blob was opened (``If-None-Match:
*`` for a new blob: create only), and the ETag is checked once more right before it; the loser of
two runners raises :class:`~ckptmigrate.errors.ObjectChanged` and the blob is unchanged. A failed
write commits nothing (Azure discards uncommitted blocks after a week).

A torch zip whose metadata-only rewrite is the whole old blob and an appended tail (what a local
in-place append writes) is :func:`append` when the blob is made of committed blocks (written in
blocks, as ckptmigrate, azcopy and adlfs write): the tail is staged as one block and the commit
lists the blob's own committed blocks and it, so no old byte moves. A blob written by one ``Put
Blob`` has no blocks to list: then, and for any other metadata-only rewrite, the kept bytes are
read back in bounded blocks and staged again, with the new bytes as one more block: they cross the
network twice. (``Put Block From URL`` would keep them server-side, but Azurite, the emulator the
tests run, does not implement it: answers ``APINotImplemented``; so it is not used.) A blob
replaced meanwhile fails the commit's ``If-Match``, so bytes (or blocks) of another writer's blob
are never committed. The backup is a server-side copy (``Copy Blob From URL``, synchronous, the
source read through a short-lived read SAS signed with the account key, or the account's SAS) to
``KEY.bak`` (``.bak.1``, ...; never overwritten: ``If-None-Match: *``) conditional on the source
ETag.

Requests go through azure-storage-blob (what adlfs uses), with a BlobClient built from the adlfs
filesystem's own service client (its credentials and endpoint).
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ckptmigrate.errors import BadInput, ObjectChanged, RemoteError
from ckptmigrate.storage.bucket_object import BucketObject
from ckptmigrate.storage.pieces import Piece, read_through
from ckptmigrate.storage.ranges import TRANSFER, RangeFile, appeared, changed
from ckptmigrate.util.urls import ObjectURL, translated

WRITABLE = ("az", "abfs", "abfss")
#: Azure's largest block (``Put Block``: 4000 MiB; kept far below, memory holds a block).
MAX_BLOCK = 100 << 20
#: Bytes per block staged and per range read back (``CKPTMIGRATE_AZ_BLOCK_SIZE`` overrides it).
BLOCK = 16 << 20
#: Azure's most committed blocks in a blob.
MAX_BLOCKS = 50_000


def block_size() -> int:
    text = os.environ.get("CKPTMIGRATE_AZ_BLOCK_SIZE")
    if not text:
        return BLOCK
    if not text.isdigit() or not 0 < int(text) <= MAX_BLOCK:
        raise BadInput(f"CKPTMIGRATE_AZ_BLOCK_SIZE={text!r}: a block size in bytes, 1 to {MAX_BLOCK}")
    return int(text)


@dataclass
class AzureObject(BucketObject):
    """A blob to replace, conditionally on its ETag (a new one: ``If-None-Match: *``)."""

    @classmethod
    def of(cls, url: ObjectURL, etag: str | None) -> AzureObject:
        return cls(url, *cls.located(url), etag)

    def client(self, key: str | None = None) -> Any:
        """A synchronous BlobClient on the filesystem's account, credentials and endpoint."""
        from azure.storage.blob import BlobClient

        connection = getattr(self.fs, "connection_string", None)
        if connection:
            return BlobClient.from_connection_string(connection, self.bucket, key or self.key)
        with translated(self.url, "write"):
            service = self.fs.service_client
        credential = service.credential
        if credential is not None and hasattr(credential, "account_key"):
            credential = {"account_name": credential.account_name, "account_key": credential.account_key}
        elif credential is None and getattr(self.fs, "sas_token", None):
            credential = self.fs.sas_token
        return BlobClient(service.url, self.bucket, key or self.key, credential=credential,
                          api_version=getattr(service, "api_version", None))

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One request; a failed precondition (412, or 409 on a create-only) is the other writer's win."""
        from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError

        TRANSFER.requests += 1
        try:
            with translated(self.url, what):
                try:
                    return fn(*args, **kwargs)
                except (ResourceModifiedError, ResourceExistsError) as exc:
                    raise _Lost() from exc
                except HttpResponseError as exc:
                    if exc.status_code == 412:
                        raise _Lost() from exc
                    if exc.status_code == 404 and "ContainerNotFound" in str(exc):
                        raise FileNotFoundError("the bucket does not exist") from None
                    raise
        except RemoteError as exc:
            if isinstance(exc.__context__, _Lost):
                raise self.changed(self.head_etag()) from None
            raise

    def head_etag(self) -> str | None:
        """The blob's ETag now (None: there is no blob)."""
        from azure.core.exceptions import ResourceNotFoundError

        TRANSFER.requests += 1
        with translated(self.url):
            try:
                return str(self.client().get_blob_properties().etag)
            except ResourceNotFoundError:
                return None

    def changed(self, found: str | None) -> ObjectChanged:
        if self.create_only:
            return appeared(self.url, found)
        return changed(self.url, self.etag, found)

    def check_unchanged(self) -> None:
        if self.etag is None and not self.create_only:
            return  # an unconditional write (--overwrite)
        found = self.head_etag()
        if found != self.etag:
            raise self.changed(found)

    def precondition(self) -> dict[str, Any]:
        from azure.core import MatchConditions

        if self.etag is not None:
            return {"etag": self.etag, "match_condition": MatchConditions.IfNotModified}
        return {"match_condition": MatchConditions.IfMissing} if self.create_only else {}


class _Lost(Exception):
    """A precondition failed (inside :meth:`AzureObject.call`)."""


def _source_url(obj: AzureObject, blob: Any) -> str:
    """The blob's URL as a copy source: with a read SAS signed by the account key (an hour), or
    the SAS the account was given; else the bare URL (a public container)."""
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    credential = blob.credential
    key = getattr(credential, "account_key", None)
    if key:
        signed = generate_blob_sas(blob.account_name, blob.container_name, blob.blob_name, account_key=key,
                                   permission=BlobSasPermissions(read=True),
                                   expiry=datetime.now(UTC) + timedelta(hours=1))
        return f"{blob.url}?{signed}"
    given = getattr(obj.fs, "sas_token", None)
    return f"{blob.url}?{str(given).lstrip('?')}" if given else str(blob.url)


def backup(obj: AzureObject) -> ObjectURL:
    """A server-side copy of the blob to the first free ``KEY.bak`` (``.bak.1``, ...), created only
    where nothing is, from the ETag read."""
    from azure.core import MatchConditions

    name = obj.free_backup_name()
    source = obj.client()
    target = obj.client(name)
    conditions: dict[str, Any] = {"source_etag": obj.etag, "source_match_condition": MatchConditions.IfNotModified} \
        if obj.etag is not None else {}
    copy = obj.call("back up", target.start_copy_from_url, _source_url(obj, source), requires_sync=True,
                    match_condition=MatchConditions.IfMissing, **conditions)
    if copy.get("copy_status") not in (None, "success"):
        raise RemoteError(f"{obj.url}: cannot back up: the copy to {name} is {copy.get('copy_status')}",
                          url=str(obj.url))
    TRANSFER.requests += 1
    with translated(obj.url, "back up"):
        TRANSFER.bytes_copied_server_side += int(target.get_blob_properties().size)
    return ObjectURL(f"{obj.url.scheme}://{obj.bucket}/{name}")




def put(obj: AzureObject, body: bytes) -> str:
    """Replace (or create) a small blob by ``body`` in one Put Blob carrying the precondition
    (``If-Match`` on the ETag read, ``If-None-Match: *`` for create-only; checked right before as
    well); the new ETag."""
    obj.check_unchanged()
    out = obj.call("write", obj.client().upload_blob, body, length=len(body), overwrite=True,
                   **obj.precondition())
    TRANSFER.bytes_sent += len(body)
    return str(out["etag"])


def delete(obj: AzureObject) -> None:
    """Delete the blob, conditionally on the ETag read (if one was)."""
    obj.call("delete", obj.client().delete_blob, **obj.precondition() if obj.etag is not None else {})


def _block_id(n: int, run: str) -> str:
    return base64.b64encode(f"{run}-{n:08d}".encode()).decode()


class _Blocks:
    """Blocks staged for one commit, in order."""

    def __init__(self, obj: AzureObject) -> None:
        self.obj = obj
        self.blob = obj.client()
        self.run = uuid.uuid4().hex
        self.ids: list[str] = []

    def _next_id(self) -> str:
        self.ids.append(_block_id(len(self.ids), self.run))
        return self.ids[-1]

    def data(self, data: bytes) -> None:
        step = block_size()
        for start in range(0, len(data), step):
            part = data[start:start + step]
            self.obj.call("write", self.blob.stage_block, self._next_id(), part, length=len(part))
            TRANSFER.bytes_sent += len(part)

    def copied(self, old: RangeFile, begin: int, end: int) -> None:
        """Bytes ``begin``..``end`` of the old blob, read back a block at a time (each counted and
        checked for length) and staged again. A blob replaced meanwhile fails the commit's
        ``If-Match``, so what was read from it is never committed."""
        step = block_size()
        for start in range(begin, end, step):
            stop = min(end, start + step)
            (block,) = old.fetcher.ranges([(start, stop)])
            TRANSFER.requests += 1
            TRANSFER.bytes_received += len(block)
            if len(block) != stop - start:
                old._short(f"asked for bytes {start}-{stop - 1}, got {len(block)} bytes")
            self.data(block)

    def commit(self) -> None:
        """The one step: the block list committed, if the blob is still the one read."""
        from azure.storage.blob import BlobBlock

        self.obj.check_unchanged()
        _commit(self.obj, self.blob, [BlobBlock(i) for i in self.ids], self.ids)


def _commit(obj: AzureObject, blob: Any, blocks: list[Any], ids: list[str]) -> None:
    """``Put Block List``, on the precondition. A commit refused as stale after it succeeded (its
    answer lost, the request retried by the SDK) is known as ours: the blob's committed blocks are
    exactly ``ids``, one of them at least staged by this run under an ID of its own."""
    try:
        obj.call("write", blob.commit_block_list, blocks, **obj.precondition())
    except ObjectChanged:
        if not ids or _committed_ids(obj) != ids:
            raise


def _committed_ids(obj: AzureObject) -> list[str] | None:
    TRANSFER.requests += 1
    try:
        with translated(obj.url):
            committed, _uncommitted = obj.client().get_block_list("committed")
    except RemoteError:
        return None
    return [str(b.id) for b in committed]


@dataclass
class Block:
    """A committed block: its ID as the SDK takes it (the text whose base64 is its name) and size."""

    id: str
    size: int


def committed_blocks(obj: AzureObject, size: int) -> list[Block] | None:
    """The blob's committed blocks when they are the whole blob of ``size`` bytes (a blob written in
    blocks: by ckptmigrate, azcopy, adlfs, the SDK's large uploads), so that a commit of them and one
    more block appends to it without its bytes moving; else None (a blob written by one ``Put Blob``
    has no committed blocks; too many blocks; a block name the SDK cannot commit again)."""
    from xml.etree import ElementTree  # the service's own answer, read for two fields

    if obj.etag is None:
        return None
    names: list[tuple[str, int]] = []
    etags: list[str] = []

    def raw(response: Any) -> None:
        """The names as the service sent them (the SDK hands back some decoded, some not), and the
        blob's ETag."""
        etag = response.http_response.headers.get("ETag")  # sent when the blob has committed blocks
        if etag:
            etags.append(str(etag))
        found = ElementTree.fromstring(response.http_response.body()).find("CommittedBlocks")
        names.extend((str(b.findtext("Name")), int(b.findtext("Size") or -1)) for b in found or ())

    TRANSFER.requests += 1
    with translated(obj.url):
        obj.client().get_block_list("committed", raw_response_hook=raw)
    if etags and etags[-1] != obj.etag:  # the other writer's win, found before any byte moves
        raise obj.changed(etags[-1])
    if not names or len(names) >= MAX_BLOCKS or sum(n for _name, n in names) != size:
        return None
    blocks = []
    for name, n in names:
        try:  # the SDK names a block by the base64 of the ID's UTF-8: an ID of other bytes is not sayable
            blocks.append(Block(base64.b64decode(name, validate=True).decode(), n))
        except ValueError:
            return None
    if len({len(b.id.encode()) for b in blocks}) != 1 or len(blocks[0].id.encode()) < 8:
        return None  # one ID length per blob; ours must fit it and still be unique
    return blocks


def append(obj: AzureObject, committed: list[Block], tail: bytes) -> None:
    """Replace the blob by itself followed by ``tail``: ``tail`` staged as one block (an ID as long
    as the others: Azure wants one length per blob), then the committed blocks and it committed
    conditionally on the ETag read. No byte of the old blob crosses the network."""
    from azure.storage.blob import BlobBlock, BlockState

    taken = {b.id for b in committed}
    length = len(committed[0].id.encode())
    new = ""
    while not new or new in taken:
        new = (uuid.uuid4().hex * (1 + length // 32))[:length]
    blob = obj.client()
    obj.call("write", blob.stage_block, new, tail, length=len(tail))
    TRANSFER.bytes_sent += len(tail)
    obj.check_unchanged()
    blocks = [BlobBlock(b.id, BlockState.COMMITTED) for b in committed]
    _commit(obj, blob, [*blocks, BlobBlock(new, BlockState.LATEST)], [*(b.id for b in committed), new])
    TRANSFER.bytes_copied_server_side += sum(b.size for b in committed)


def compose(obj: AzureObject, old: RangeFile, keep: int, tail: bytes) -> None:
    """Replace the blob by its first ``keep`` bytes (streamed through) and ``tail``."""
    blocks = _Blocks(obj)
    blocks.copied(old, 0, keep)
    blocks.data(tail)
    blocks.commit()


def replace_head(obj: AzureObject, old: RangeFile, head: bytes, skip: int) -> None:
    """Replace the blob by ``head`` and its bytes from ``skip`` on (streamed through)."""
    blocks = _Blocks(obj)
    blocks.data(head)
    blocks.copied(old, skip, old.size)
    blocks.commit()


def stream(obj: AzureObject, old: RangeFile, pieces: Iterable[Piece], before: Callable[[], None]) -> None:
    """Replace the blob by ``pieces`` as they come, staged in blocks of :func:`block_size` (kept
    ranges read from ``old`` and staged again: Azurite has no ``Put Block From URL``); ``before``
    (the read-back of the blob to be) runs before the one commit."""
    step = block_size()
    blocks = _Blocks(obj)
    pending = bytearray()
    for data in read_through(old, pieces, step):
        pending += data
        if len(pending) >= step:
            blocks.data(bytes(pending[:step]))
            del pending[:step]
    blocks.data(bytes(pending))
    before()
    blocks.commit()


def upload(obj: AzureObject, path: str | os.PathLike[str]) -> None:
    """Replace (or create) the blob with a local file, staged a block at a time; one commit."""
    step = block_size()
    blocks = _Blocks(obj)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(step), b""):
            blocks.data(block)
    blocks.commit()  # an empty file: an empty block list

