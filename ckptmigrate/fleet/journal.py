"""The results journal of a fleet run (``--journal FILE``): one JSON line per finished file, appended
and fsynced as each result arrives, so a run stopped anywhere leaves a record of what is done.

Only the driver writes it (workers return results; they never touch the journal), so no two
writers interleave. A line torn by a crash mid-write is ignored when the journal is read back (and ended, so the
next record starts on a line of its own).

A re-run with the same journal skips a file only when the journal says it was done *and* the file
agrees: a line is a claim, not a proof. Before skipping, the driver reads the file's envelope (the
zip directory and the envelope record, or the safetensors header; no tensor bytes) and skips only
when its revision is the one the line recorded, the chain's heads are the ones the line was
written under (a new head makes ``--to head`` mean another revision), and, for ``verify``, the
file's size and modification time (an object's size and ETag) are the ones recorded (a multi-file
checkpoint's directory has none worth trusting: it is verified again). Relative targets (``+N``, ``-N``) name a
different revision on every run and are never skipped.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ckptmigrate.errors import BadInput, one_line
from ckptmigrate.fleet.tasks import DONE


def path_key(path: str) -> str:
    """How a path is compared across runs: absolute for a local path, as written for a URL."""
    return path if "://" in path else os.path.abspath(path)


def _stat(path: str) -> list[int | str] | None:
    """Size and mtime of a regular file, size and ETag of an object (one HEAD); None otherwise (a
    directory's mtime misses an edited shard)."""
    if "://" in path:
        return _object_stat(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def _object_stat(url: str) -> list[int | str] | None:
    from ckptmigrate.errors import CkptMigrateError
    from ckptmigrate.storage.ranges import open_object
    from ckptmigrate.util.urls import ObjectURL, as_location

    location = as_location(url)
    if not isinstance(location, ObjectURL):
        return None
    try:
        found = open_object(location)
    except CkptMigrateError:
        return None
    return [found.size, found.etag] if found.etag else None


class Journal:
    """An append-only JSONL file of results, read once when opened."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.done: dict[tuple[str, str, str], dict[str, Any]] = {}
        for record in self._read():
            key = (path_key(str(record.get("path"))), str(record.get("command")), str(record.get("target")))
            if record.get("result") in DONE:
                self.done[key] = record
            else:
                self.done.pop(key, None)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BadInput(f"{self.path}: cannot open the journal ({exc.strerror})", path=self.path) from None

        if self._torn:
            os.write(self._fd, b"\n")  # end the torn line, or the next record would be glued to it

    def _read(self) -> Iterator[dict[str, Any]]:
        self._torn = False
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{self.path}: cannot read the journal ({one_line(exc)})", path=self.path) from None
        self._torn = bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash: that file is simply done again
            if isinstance(record, dict):
                yield record

    def record(self, **fields: Any) -> None:
        """Append one result line and fsync it before returning."""
        line = {**fields, "time": datetime.now(UTC).isoformat(timespec="milliseconds")}
        if line.get("result") in DONE:
            line["stat"] = _stat(str(line["path"]))
        data = (json.dumps(line, default=str, sort_keys=False) + "\n").encode()
        os.write(self._fd, data)
        os.fsync(self._fd)

    def skips(self, path: str, command: str, target: str, chain: str | None) -> dict[str, Any] | None:
        """The record that lets ``path`` be skipped, after checking the file agrees with it; else None."""
        if target.startswith(("+", "-")):
            return None
        record = self.done.get((path_key(path), command, target))
        if record is None or record.get("chain") != chain:
            return None
        if command == "verify" and (record.get("stat") is None or record.get("stat") != _stat(path)):
            return None
        from ckptmigrate import formats
        from ckptmigrate.errors import CkptMigrateError

        try:
            envelope = formats.read_envelope(path)[1]  # a str: a URL stays whole (Path folds s3:// to s3:/)
        except (CkptMigrateError, OSError):
            return None
        if envelope is None or envelope.get("revision") != record.get("after"):
            return None
        return record

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
