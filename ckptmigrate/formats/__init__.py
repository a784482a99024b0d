"""Containers: which format a file is in (from its bytes, not its name) and how to read and write it.

A checkpoint may also be a set of files named by one of them (a sharded model's index, a DCP
directory's ``.metadata``) or by their directory: :mod:`.multifile` reads and writes those, with
tensors as references into each shard, so everything above sees one container.

:func:`read` gives a :class:`Container` — the payload with tensors as references, the envelope and
the storages — having read only the zip directory and ``data.pkl``, or the safetensors header.
Nothing here imports torch; writing a tensor that must be computed does, lazily.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from ckptmigrate.errors import BadInput, one_line
from ckptmigrate.formats import legacy, multifile, safetensors_io, torchzip
from ckptmigrate.formats.zipio import ZipEntry
from ckptmigrate.tensors.refs import Source, Storage
from ckptmigrate.util.gcpause import pausing
from ckptmigrate.util.urls import ObjectURL, as_location, is_remote

Format = Literal["torch-zip", "torch-legacy", "safetensors", "hf-sharded", "dcp"]
FORMATS: tuple[str, ...] = ("torch-zip", "torch-legacy", "safetensors", "hf-sharded", "dcp")
#: Checkpoints made of several files, switched as one (storage/shardset).
MULTI_FORMATS: tuple[str, ...] = ("hf-sharded", "dcp")
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclass
class Container:
    """A checkpoint file as read: payload (tensors as references), envelope and where bytes are."""

    format: Format | Literal["memory"]
    path: Path
    source: Source | None
    payload: Any
    envelope: dict[str, Any] | None
    storages: dict[str, Storage]
    prefix: str = "archive"
    records: dict[str, ZipEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    #: Every global the file's pickles name, and whether they call it (``pickle_safety.assess``).
    pickle_globals: dict[str, bool] = field(default_factory=dict)
    #: A multi-file checkpoint: every shard's open file, and how the files fit (hf_sharded.Sharded, dcp.Dcp).
    sources: list[Source] = field(default_factory=list)
    parts: Any = None

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        for source in self.sources:
            source.close()


def _open_source(path: Path | ObjectURL) -> Source:
    if isinstance(path, ObjectURL):
        from ckptmigrate.storage.ranges import RangeFile

        remote = RangeFile(path)
        if remote.size == 0:
            raise BadInput(f"{path}: empty object, not a checkpoint", path=str(path))
        return Source(path, remote=remote)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{path}: is a directory, not a checkpoint file")
    if st.st_size == 0:
        raise BadInput(f"{path}: empty file, not a checkpoint")
    try:
        return Source(path)
    except OSError as exc:
        raise BadInput(f"{path}: cannot read ({exc.strerror})") from None


checkpoint_path = multifile.checkpoint_path
commit_file = multifile.commit_file
recover = multifile.recover
recovered = multifile.recovered


def sniff(head: bytes, size: int) -> Format | None:
    """The container format from the first bytes of a file."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if head.startswith(_LEGACY_MAGIC):
        return "torch-legacy"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n >= 2:
            return "safetensors"
    return None


def _detect(path: Path | ObjectURL, source: Source) -> Format:
    head = source.pread(16, 0)
    fmt = sniff(head, source.size)
    if fmt is None:
        raise BadInput(
            f"{path}: not a checkpoint (neither a torch zip, a legacy torch file nor safetensors)"
        )
    return fmt


def read(path: str | os.PathLike[str], *, remote: Any = None) -> Container:
    """Open a checkpoint and read everything but tensor bytes; BadInput names the file and the problem.
    A URL (``s3://...``, :class:`~ckptmigrate.util.urls.ObjectURL`) is read by range requests;
    ``remote`` reads it from that object (a :class:`~ckptmigrate.storage.ranges.Spliced` write-to-be)."""
    if remote is not None:
        return _read_one(as_location(path), Source(path, remote=remote))
    if is_remote(path):
        return _read_remote(as_location(path))
    path = Path(path)
    if path.is_dir():
        path = multifile.checkpoint_path(path)
    if multifile.kind(path) is not None:
        return Container(**multifile.read(path))
    return _read_one(path)


def _read_remote(url: Path | ObjectURL) -> Container:
    """An object, or a multi-file checkpoint named by its prefix or its index / ``.metadata`` object."""
    from ckptmigrate.errors import MultiFileObject

    assert isinstance(url, ObjectURL)
    if url.name == multifile.dcp.METADATA or url.name.endswith(multifile.hf_sharded.INDEX_SUFFIX):
        return Container(**multifile.read_remote(url.parent, url.name))
    try:
        return _read_one(url)
    except MultiFileObject as exc:
        return Container(**multifile.read_remote(url, exc.marker))


@pausing
def _read_one(path: Path | ObjectURL, source: Source | None = None) -> Container:
    source = source or _open_source(path)
    named: dict[str, bool] = {}
    try:
        fmt = _detect(path, source)
        if fmt == "torch-zip":
            payload, envelope, storages, prefix, records = torchzip.read(source, named)
            return Container(fmt, path, source, payload, envelope, storages, prefix, records, pickle_globals=named)
        if fmt == "torch-legacy":
            payload, storages = legacy.read(source, named)
            return Container(fmt, path, source, payload, None, storages, pickle_globals=named)
        tensors, envelope, metadata, storages = safetensors_io.read(source)
        return Container(fmt, path, source, tensors, envelope, storages, metadata=metadata)
    except (torchzip.TorchZipError, legacy.LegacyFormatError, safetensors_io.SafetensorsFormatError) as exc:
        source.close()
        raise BadInput(f"{path}: {_describe(fmt)} {one_line(exc)}") from None
    except BaseException:
        source.close()
        raise


def _describe(fmt: str) -> str:
    return {"torch-zip": "torch zip file:", "torch-legacy": "legacy torch file:",
            "safetensors": "safetensors file:"}[fmt]


def read_envelope(path: str | os.PathLike[str]) -> tuple[Format, dict[str, Any] | None]:
    """Only the envelope: the zip directory and one record, or the safetensors header."""
    location = as_location(path)
    if isinstance(location, ObjectURL):
        from ckptmigrate.errors import MultiFileObject

        if location.name == multifile.dcp.METADATA or location.name.endswith(multifile.hf_sharded.INDEX_SUFFIX):
            return multifile.read_envelope_remote(location.parent, location.name)
        try:
            return _read_envelope(location)
        except MultiFileObject as exc:
            return multifile.read_envelope_remote(location, exc.marker)
    path = Path(path)
    if path.is_dir():
        path = multifile.checkpoint_path(path)
    if multifile.kind(path) is not None:
        return multifile.read_envelope(path)
    return _read_envelope(path)


def _read_envelope(path: Path | ObjectURL) -> tuple[Format, dict[str, Any] | None]:
    source = _open_source(path)
    try:
        fmt = _detect(path, source)
        if fmt == "torch-zip":
            return fmt, torchzip.read_envelope(source)
        if fmt == "safetensors":
            return fmt, safetensors_io.read_envelope(source)
        return fmt, None
    except (torchzip.TorchZipError, safetensors_io.SafetensorsFormatError) as exc:
        raise BadInput(f"{path}: {_describe(fmt)} {one_line(exc)}") from None
    finally:
        source.close()


def write_container(
    fh: BinaryIO, fmt: Format, payload: Any, envelope: dict[str, Any] | None, *,
    template: Container | None = None,
) -> None:
    """Write ``payload`` in ``fmt``; with a template of the same file, reuse what did not change."""
    if fmt == "safetensors":
        metadata = template.metadata if template is not None else {}
        safetensors_io.write(fh, payload, envelope, metadata)
        return
    if fmt != "torch-zip":
        raise BadInput(f"cannot write the {fmt} format; write torch-zip or safetensors")
    prefix = template.prefix if template is not None and template.format == "torch-zip" else "archive"
    torchzip.write(fh, payload, envelope, prefix=prefix)
