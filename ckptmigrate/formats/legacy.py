"""The pre-1.6 torch format: a run of pickles followed by the raw storages, in key order.

Read only; anything that rewrites such a file writes the zip format.
"""

from __future__ import annotations

import struct
from typing import Any

from ckptmigrate.formats.pickled import PickleFormatError, load
from ckptmigrate.tensors.refs import Source, Storage

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


class LegacyFormatError(ValueError):
    pass


def read(source: Source, named: dict[str, bool] | None = None) -> tuple[Any, dict[str, Storage]]:
    fh = source._fh
    if source.remote is not None:  # an object: the pickles are read through to the end, so it is staged whole
        source.fileno()
        fh = source._staged
    fh.seek(0)
    try:
        magic = load(fh, None, named)
        if magic != MAGIC_NUMBER:
            raise LegacyFormatError("a pickle, but not one written by torch.save")
        if load(fh, None, named) != PROTOCOL_VERSION:
            raise LegacyFormatError("written by torch.save with an unknown legacy protocol")
        sys_info = load(fh, None, named)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise LegacyFormatError("saved on a big-endian machine, which is not supported")
        storages: dict[str, Storage] = {}
        payload = load(fh, storages, named)
        keys = load(fh, None, named)
    except PickleFormatError as exc:
        raise LegacyFormatError(str(exc)) from None
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise LegacyFormatError("the list of storages does not match the tensors in the pickle")
    pos = fh.tell()
    for key in map(str, keys):
        storage = storages[key]
        header = fh.read(8)
        if len(header) != 8:
            raise LegacyFormatError(f"truncated: storage {key} is missing")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise LegacyFormatError(f"storage {key} holds {numel} elements, its tensors need {storage.numel}")
        pos += 8
        if pos + storage.nbytes > source.size:
            raise LegacyFormatError(f"truncated: storage {key} ends past the end of the file")
        storage.source, storage.offset = source, pos
        pos += storage.nbytes
        fh.seek(pos)
    return payload, storages
