"""Hugging Face sharded checkpoints: ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``)
naming, for every tensor, the shard file that holds it.

The index is recognised by its content (a JSON object with a ``weight_map``), the shards by theirs
(safetensors or torch zip, all alike). The tensors of every shard are read as references into that
shard, so the checkpoint above this layer is one flat state dict. The envelope is an object under
the index's ``metadata["ckptmigrate"]``, which transformers and huggingface_hub ignore.

Writing produces a new set of shard files beside the old ones and a new index; switching to them
is :class:`~ckptmigrate.storage.shardset.ShardSet`'s job.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from ckptmigrate.formats import locations, safetensors_io, torchzip
from ckptmigrate.tensors.refs import (
    DTYPE_TO_SAFETENSORS,
    Deferred,
    Source,
    Storage,
    TensorRef,
    contiguous_stride,
    is_entry,
)

ENVELOPE_KEY = "ckptmigrate"
#: What transformers writes, and what a directory is searched for.
INDEX_SUFFIX = ".index.json"
MAX_INDEX = 64 << 20


class ShardedFormatError(ValueError):
    """The index or a shard is not what a sharded checkpoint must be; the message names the file."""


@dataclass
class Sharded:
    """How the checkpoint is split: which shard holds each key, the shards' own metadata."""

    index_path: Path
    index: dict[str, Any]
    shard_of: dict[str, str]
    shards: list[str]
    shard_format: str
    shard_metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    #: key -> the tensor read under that key (what "unchanged" is checked against)
    original: dict[str, Any] = field(default_factory=dict)
    #: The index as read, and (an object in a bucket) its ETag: what a write in its place is conditional on.
    index_raw: bytes = b""
    index_etag: str | None = None
    #: The version the index was read at (a GCS object's generation, an hf:// file's commit, a versioned
    #: bucket's version): what a write in its place is conditional on.
    index_version: str | None = None

    @property
    def directory(self) -> Path:
        return self.index_path.parent

    def files(self) -> set[str]:
        """The files of the checkpoint besides the index, relative to its directory."""
        return set(self.shards)


def looks_like_index(head: bytes) -> bool:
    return head.lstrip()[:1] == b"{"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ShardedFormatError(f"names {k!r} twice")
        out[k] = v
    return out


def read_index(path: Path) -> dict[str, Any]:
    """The index as JSON, validated: a weight_map of tensor names to plain shard file names."""
    return read_index_tagged(path)[0]


def read_index_tagged(path: Path) -> tuple[dict[str, Any], bytes, str | None, str | None]:
    """:func:`read_index`, with the bytes read and (an object) their ETag and version."""
    try:
        raw, etag, version = locations.read_tagged(path, MAX_INDEX)
    except locations.TooLarge as exc:
        raise ShardedFormatError(f"index of {exc.size:,} bytes exceeds the limit of {MAX_INDEX:,}") from None
    return parse_index(raw), raw, etag, version


def parse_index(raw: bytes) -> dict[str, Any]:
    """An index's bytes as JSON, validated (see :func:`read_index`)."""
    try:
        index = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ShardedFormatError("index is nested too deeply") from None
    except ShardedFormatError as exc:
        raise ShardedFormatError(f"index {exc}") from None
    except ValueError as exc:
        raise ShardedFormatError(f"index is not valid JSON ({exc})"[:300]) from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise ShardedFormatError("not a sharded-checkpoint index (no weight_map object)")
    for key, shard in index["weight_map"].items():
        if not isinstance(shard, str) or not _plain_name(shard):
            raise ShardedFormatError(f"index maps {key!r} to {shard!r}, not a file name in its directory")
    meta = index.get("metadata", {})
    if not isinstance(meta, dict):
        raise ShardedFormatError("index metadata is not a JSON object")
    if ENVELOPE_KEY in meta and not isinstance(meta[ENVELOPE_KEY], dict):
        raise ShardedFormatError("the ckptmigrate envelope in the index metadata is not a JSON object")
    return index


def _plain_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and "\0" not in name


def read(index_path: Path, sniff: Any) -> tuple[Any, dict[str, Any] | None, dict[str, Storage], list[Source], Sharded]:
    """Read the index and every shard's header; return (flat state dict, envelope, storages, sources, layout).

    ``sniff(head, size)`` names a shard's container (safetensors or torch zip) from its first bytes.
    """
    index, raw, etag, version = read_index_tagged(index_path)
    weight_map: dict[str, str] = index["weight_map"]
    shards = list(dict.fromkeys(weight_map.values()))
    directory = index_path.parent
    sources: list[Source] = []
    storages: dict[str, Storage] = {}
    found: dict[str, tuple[str, Any]] = {}
    shard_metadata: dict[str, dict[str, str]] = {}
    shard_format = None
    try:
        for shard in shards:
            path = directory / shard
            try:
                source = locations.open_source(path)
            except FileNotFoundError:
                raise ShardedFormatError(f"names shard {shard}, which is missing from {directory}") from None
            except (IsADirectoryError, OSError) as exc:
                raise ShardedFormatError(f"shard {shard} cannot be read ({exc.strerror})") from None
            sources.append(source)
            fmt = sniff(source.pread(16, 0), source.size)
            if fmt not in ("safetensors", "torch-zip"):
                raise ShardedFormatError(f"shard {shard} is neither safetensors nor a torch zip file")
            if shard_format is not None and fmt != shard_format:
                raise ShardedFormatError(f"mixes {shard_format} and {fmt} shards ({shard})")
            shard_format = fmt
            tensors, shard_storages, meta = _read_shard(source, fmt, shard)
            shard_metadata[shard] = meta
            for key, storage in shard_storages.items():
                storages[f"{shard}/{key}"] = storage
            for key, ref in tensors.items():
                if key in found:
                    raise ShardedFormatError(f"tensor {key!r} is in two shards, {found[key][0]} and {shard}")
                found[key] = (shard, ref)
    except BaseException:
        for s in sources:
            s.close()
        raise
    for key, shard in weight_map.items():
        if key not in found:
            _close(sources)
            raise ShardedFormatError(f"maps {key!r} to {shard}, which does not hold it")
        if found[key][0] != shard:
            _close(sources)
            raise ShardedFormatError(f"maps {key!r} to {shard}, but it is in {found[key][0]}")
    stray = [k for k in found if k not in weight_map]
    if stray:
        _close(sources)
        raise ShardedFormatError(f"shard {found[stray[0]][0]} holds {stray[0]!r}, which the index does not name")
    payload = OrderedDict((k, found[k][1]) for k in weight_map)
    envelope = index.get("metadata", {}).get(ENVELOPE_KEY)
    layout = Sharded(index_path, index, dict(weight_map), shards, shard_format or "safetensors", shard_metadata,
                     dict(payload), raw, etag, version)
    return payload, envelope, storages, sources, layout


def _close(sources: list[Source]) -> None:
    for s in sources:
        s.close()


def _read_shard(source: Source, fmt: str, shard: str) -> tuple[dict[str, Any], dict[str, Storage], dict[str, str]]:
    try:
        if fmt == "safetensors":
            tensors, envelope, meta, storages = safetensors_io.read(source)
            return tensors, storages, meta
        payload, _env, storages, _prefix, _records = torchzip.read(source)
    except (safetensors_io.SafetensorsFormatError, torchzip.TorchZipError) as exc:
        raise ShardedFormatError(f"shard {shard}: {exc}") from None
    if not isinstance(payload, dict) or not all(isinstance(k, str) and is_entry(v) for k, v in payload.items()):
        raise ShardedFormatError(f"shard {shard} is not a flat dict of tensors")
    return payload, storages, {}


def read_envelope(index_path: Path) -> dict[str, Any] | None:
    env = read_index(index_path).get("metadata", {}).get(ENVELOPE_KEY)
    return env if isinstance(env, dict) else None


# --- writing ----------------------------------------------------------------------------------------


def stem_and_suffix(index_name: str, shard_format: str) -> tuple[str, str]:
    """``model`` and ``.safetensors`` for ``model.safetensors.index.json``, as transformers names shards."""
    base = index_name.removesuffix(INDEX_SUFFIX)
    suffix = ".safetensors" if shard_format == "safetensors" else ".bin"
    return base.removesuffix(suffix), suffix


def plan_shards(payload: dict[str, Any], layout: Sharded | None, max_bytes: int | None = None) -> list[list[str]]:
    """Keys grouped into shards: each tensor stays with the shard it came from; a tensor an op
    computes (a split, a merge, a transpose) goes to the shard of the tensor it is computed from, or
    else of the key it replaces, or else of the key before it. ``max_bytes`` re-plans the shards
    (filled in order, a new shard when the next tensor would pass it, as huggingface_hub does)."""
    groups: dict[str, list[str]] = OrderedDict((s, []) for s in (layout.shards if layout else []))
    previous = next(iter(groups), "")
    for key, value in payload.items():
        shard = _home(value, layout, groups) if layout is not None else None
        if shard is None and layout is not None and layout.shard_of.get(key) in groups:
            shard = layout.shard_of[key]
        shard = shard or previous
        groups.setdefault(shard, []).append(key)
        previous = shard
    plan = [keys for keys in groups.values() if keys]
    if max_bytes is not None:
        plan = _rebalance(payload, plan, max_bytes)
    return plan


def _home(value: Any, layout: Sharded, groups: dict[str, list[str]], depth: int = 0) -> str | None:
    """The shard of the layout whose bytes ``value`` is, or is computed from: an op's tensor is a
    :class:`Deferred` whose ``compute`` is a ``functools.partial`` over the tensors it reads."""
    if isinstance(value, TensorRef):
        source = value.storage.source
        if source is not None and Path(source.path).parent == layout.directory:
            name = os.path.basename(source.path)
            return name if name in groups else None
        return None
    if depth > 8:
        return None
    if isinstance(value, Deferred):
        value = value.compute
    if isinstance(value, partial):
        value = value.args
    if isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (TensorRef, Deferred, partial, list, tuple)):
                found = _home(item, layout, groups, depth + 1)
                if found is not None:
                    return found
    return None


def _rebalance(payload: dict[str, Any], plan: list[list[str]], max_bytes: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for key in (k for group in plan for k in group):
        n = _nbytes(payload[key])
        if out[-1] and size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(key)
        size += n
    return out


def _nbytes(value: Any) -> int:
    if isinstance(value, (TensorRef, Deferred)):
        return value.nbytes
    return int(value.numel() * value.element_size())


def shard_names(index_name: str, shard_format: str, count: int, tag: str | None) -> list[str]:
    stem, suffix = stem_and_suffix(index_name, shard_format)
    middle = f"-{tag}" if tag else ""
    return [f"{stem}{middle}-{i:05d}-of-{count:05d}{suffix}" for i in range(1, count + 1)]


#: Header room left in every safetensors shard ckptmigrate writes (see :func:`header_edits`).
SLACK = 1024


def write_shard(fh: BinaryIO, shard_format: str, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    if shard_format == "safetensors":
        safetensors_io.write(fh, tensors, None, metadata, slack=SLACK)
    else:
        torchzip.write(fh, tensors, None)


#: The one shard the index names while shard headers are rewritten in place: a file that does not
#: exist, so a reader in that window refuses the checkpoint (the name says why) rather than mix shards.
REWRITE_IN_PROGRESS = "ckptmigrate-header-rewrite-in-progress--run-ckptmigrate-on-this-directory.safetensors"


def index_bytes(
    layout: Sharded | None, weight_map: dict[str, str], total_size: int, envelope: dict[str, Any] | None,
) -> bytes:
    """The new index: the old one's other fields kept, the envelope under metadata.ckptmigrate."""
    index: dict[str, Any] = dict(layout.index) if layout is not None else {}
    meta = dict(index.get("metadata") or {})
    meta["total_size"] = total_size
    meta.pop(ENVELOPE_KEY, None)
    if envelope is not None:
        meta[ENVELOPE_KEY] = envelope
    index["metadata"] = meta
    index["weight_map"] = weight_map
    return (json.dumps(index, indent=2, sort_keys=False) + "\n").encode()


def shard_sizes(payload: dict[str, Any], plan: list[list[str]]) -> Iterator[int]:
    for keys in plan:
        yield sum(_nbytes(payload[k]) for k in keys)


def header_edits(
    layout: Sharded, payload: dict[str, Any], plan: list[list[str]],
) -> tuple[dict[str, bytes], dict[str, str]] | None:
    """New headers for safetensors shards whose tensors all stay where they are (renames, a reshape
    of a stored tensor): shard name -> the bytes after the length prefix, padded with spaces to
    exactly the old header's length; and the new weight map. None when a shard would change
    otherwise or a header does not fit its room (then the shard is rewritten)."""
    if layout.shard_format != "safetensors" or len(plan) != len(layout.shards):
        return None
    edits: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    for keys in plan:
        first = payload[keys[0]]
        if not isinstance(first, TensorRef) or first.storage.source is None:
            return None
        shard = os.path.basename(first.storage.source.path)
        path = layout.directory / shard
        refs = [payload[k] for k in keys]
        if shard not in layout.shards or not all(_whole_stored(r, path) for r in refs):
            return None
        weight_map.update((k, shard) for k in keys)
        storages = {id(r.storage) for r in refs}
        wanted = {k for k, s in layout.shard_of.items() if s == shard}
        if len(storages) != len(refs) or len(refs) != len(wanted):
            return None
        with open(path, "rb") as fh:
            old_len = int.from_bytes(fh.read(8), "little")
            old = fh.read(old_len)
        data_start = 8 + old_len
        try:
            old_header = json.loads(old)
        except ValueError:
            return None
        for key, ref in zip(keys, refs, strict=True):
            was = old_header.get(key) if key in layout.shard_of else None
            if key in layout.shard_of and (not isinstance(was, dict) or layout.shard_of[key] != shard
                                           or was.get("data_offsets", [None])[0] != ref.storage.offset - data_start):
                # a name that meant another tensor before (a swap): a reader of the old index with the
                # new header would get the wrong bytes under it, so such a shard is rewritten instead
                return None
        header: dict[str, Any] = {}
        meta = layout.shard_metadata.get(shard) or {}
        if meta:
            header["__metadata__"] = meta
        for key, ref in zip(keys, refs, strict=True):
            begin = ref.storage.offset - data_start
            header[key] = {"dtype": DTYPE_TO_SAFETENSORS[ref.dtype], "shape": list(ref.shape),
                           "data_offsets": [begin, begin + ref.nbytes]}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        if len(encoded) > old_len:
            return None
        encoded += b" " * (old_len - len(encoded))
        if encoded != old:
            edits[shard] = encoded
    return edits, {k: weight_map[k] for k in payload}


def _whole_stored(ref: Any, path: Path) -> bool:
    """A tensor that is exactly one stored safetensors tensor of the shard at ``path``."""
    return (
        isinstance(ref, TensorRef) and ref.storage.source is not None and Path(ref.storage.source.path) == path
        and ref.storage_offset == 0 and ref.nbytes == ref.storage.nbytes and ref.dtype in DTYPE_TO_SAFETENSORS
        and ref.stride == contiguous_stride(ref.shape) and ref.storage.offset is not None
    )


def object_headers(
    layout: Sharded, payload: dict[str, Any], storages: dict[str, Storage],
) -> tuple[dict[str, tuple[bytes, int]], dict[str, str]] | None:
    """For shards in object storage, where a header of any length is written before the same data
    (a new object assembled server-side): shard -> (new header with its length prefix, where the
    data starts), for each shard whose header changes, and the new weight map. None when a tensor
    would leave its shard or change its bytes, or torch ``.bin`` shards would change."""
    if layout.shard_format != "safetensors":  # torch .bin shards: only a change of the index alone (a stamp)
        same = len(payload) == len(layout.shard_of) and all(payload[k] is layout.original.get(k) for k in payload)
        return ({}, {k: layout.shard_of[k] for k in payload}) if same else None
    plan = plan_shards(payload, layout)
    sources = {os.path.basename(s.source.path): s.source for s in storages.values() if s.source is not None}
    headers: dict[str, tuple[bytes, int]] = {}
    weight_map: dict[str, str] = {}
    for keys in plan:
        first = payload[keys[0]]
        shard = os.path.basename(first.storage.source.path) if isinstance(first, TensorRef) and \
            first.storage.source is not None else None
        if shard not in layout.shards or shard not in sources:
            return None
        own = {k[len(shard) + 1:]: s for k, s in storages.items() if k.startswith(shard + "/")}
        found = safetensors_io.new_header(sources[shard], {k: payload[k] for k in keys}, own,
                                          layout.shard_metadata.get(shard) or {}, None)
        if found is None:
            return None
        weight_map.update((k, shard) for k in keys)
        head, data_start = found
        if head != sources[shard].pread(data_start, 0):
            headers[shard] = found
    return headers, {k: weight_map[k] for k in payload}
