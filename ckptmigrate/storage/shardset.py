"""Switching a multi-file checkpoint (shards + one index or metadata file) atomically, as one.

(:class:`HeaderRewrite` is the metadata-only variant: shard headers rewritten in place, journalled.)

A reader finds every shard through one *commit file* (a sharded model's index, a DCP directory's
``.metadata``), so the checkpoint is whatever that file names. A rewrite therefore:

1. writes a journal ``.<commit>.ckptmigrate-journal`` naming the old files and the new ones, fsynced;
2. creates every new shard under a name no file has yet, beside the old shards, each fsynced;
3. writes the new commit file to a temporary sibling, fsyncs it, records its digest in the journal,
   reads it back (``check``), and renames it over the commit file — the one atomic step;
4. removes the old files the new set does not name, then the journal.

A crash before step 3's rename leaves the old commit file, which names only old shards, all intact;
after it, the new one, whose shards were all on disk before it was. The next writer (holding the
checkpoint's lock) replays the journal: the commit file's digest says which side won, and the
other side's files are removed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ckptmigrate.storage.atomic import TEMP_PREFIX, WriteFailed, atomic_write, fsync_dir, remove_stale_temps
from ckptmigrate.storage.rawio import write_all


def digest_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class ShardSet:
    """One switch of the files of a checkpoint whose commit file is ``directory / commit``."""

    def __init__(self, directory: Path, commit: str) -> None:
        self.directory = directory
        self.commit_path = directory / commit
        self.journal = directory / f".{commit}.ckptmigrate-journal"
        self.old: set[str] = set()
        self.new: list[str] = []
        self._digest: str | None = None
        self._syncer = _Syncer()

    def recover(self) -> list[str]:
        """Finish or undo the switch a killed writer left (call holding the checkpoint's lock);
        return the files removed."""
        removed = [p.name for p in [*remove_stale_temps(self.commit_path), *remove_stale_temps(self.journal)]]
        for name in os.listdir(self.directory):  # envelope files written beside a DCP .metadata
            if name.startswith(f"{TEMP_PREFIX}.ckptmigrate-") and name.endswith(".part"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
                    removed.append(name)
        try:
            state = json.loads(self.journal.read_text())
        except FileNotFoundError:
            return removed
        except ValueError:  # a journal torn while being written: nothing was created yet
            self.journal.unlink(missing_ok=True)
            return removed
        old, new = set(state.get("old", [])), set(state.get("new", []))
        committed = state.get("digest") is not None and digest_file(self.commit_path) == state["digest"]
        doomed = old - new if committed else new - old
        for name in sorted(doomed):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
                removed.append(name)
        fsync_dir(self.directory)
        self.journal.unlink(missing_ok=True)
        return removed

    def begin(self, old: set[str], new: list[str], *, keep_old: bool = False, commit: bytes | None = None) -> None:
        """Record the switch before any new file exists; ``keep_old`` keeps the old shards after it
        (a backup index names them). ``commit``, the new commit file when it is known already,
        puts its digest in this first journal, so :meth:`commit` need not write it again."""
        self.old = set() if keep_old else set(old)
        self.new = list(new)
        self._digest = None if commit is None else hashlib.sha256(commit).hexdigest()
        self._write_journal(self._digest)

    def add(self, name: str) -> None:
        """One more new file, named in the journal before it is created."""
        self.new.append(name)
        self._write_journal(self._digest)

    def _write_journal(self, digest: str | None) -> None:
        body = {"commit": self.commit_path.name, "old": sorted(self.old), "new": self.new, "digest": digest}
        with atomic_write(self.journal) as fh:
            fh.write(json.dumps(body).encode())

    @contextlib.contextmanager
    def create(self, name: str) -> Iterator[BinaryIO]:
        """A new shard: created exclusively (never over an existing file), fsynced when complete."""
        if name not in self.new:
            raise ValueError(f"{name} is not one of the new files of this switch")
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise WriteFailed(f"{path}: could not create a new shard: {exc.strerror}; nothing was switched") from exc
        try:
            with os.fdopen(fd, "w+b") as fh:
                yield fh
                fh.flush()
                self._syncer.start(os.dup(fh.fileno()), path)
        except OSError as exc:
            raise WriteFailed(f"{path}: could not write a new shard: {exc.strerror}; nothing was switched") from exc

    def commit(self, data: bytes, check: Callable[[Path], None] | None = None) -> None:
        """Switch: the new commit file replaces the old by one rename, then the old files go."""
        self._syncer.wait()
        fsync_dir(self.directory)
        digest = hashlib.sha256(data).hexdigest()
        if digest != self._digest:
            self._digest = digest
            self._write_journal(digest)
        with atomic_write(self.commit_path, check=check) as fh:
            fh.write(data)
        self.finish()

    def abort(self) -> None:
        """Undo a switch that failed before its commit: remove the new files and the journal (if the
        rename did happen, only syncing the directory failed: finish instead)."""
        with contextlib.suppress(WriteFailed):
            self._syncer.wait()
        if self._digest is not None and digest_file(self.commit_path) == self._digest:
            self.finish()
            return
        for name in self.new:
            if name not in self.old:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)
        self.journal.unlink(missing_ok=True)

    def finish(self) -> None:
        for name in sorted(self.old - set(self.new)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
        fsync_dir(self.directory)
        self.journal.unlink(missing_ok=True)


class _Syncer:
    """The fsync of each new shard, in a thread of its own while the next shard is written: the
    disk writes one file back while the kernel copies the next. One fsync is outstanding at a time,
    and :meth:`wait` (before the switch) returns only once every file is on disk."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: tuple[Path, OSError] | None = None

    def start(self, fd: int, path: Path) -> None:
        """fsync then close ``fd`` (a duplicate the syncer owns) in the background."""
        try:
            self.wait()
        except BaseException:
            os.close(fd)
            raise

        def run() -> None:
            try:
                os.fsync(fd)
            except OSError as exc:
                self._error = (path, exc)
            finally:
                os.close(fd)

        self._thread = threading.Thread(target=run, name=f"fsync {path.name}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            path, exc = self._error
            self._error = None
            raise WriteFailed(f"{path}: could not write a new shard: {exc.strerror}; nothing was switched") from exc


class HeaderRewrite:
    """Metadata-only switch of shards whose headers are rewritten in place (each one's bytes, of the
    same length, at a fixed offset), with the commit file switched after them.

    The old bytes of every region and the old commit file are journalled
    (``.<commit>.ckptmigrate-headers``, fsynced) before anything changes. Then the commit file is
    replaced (one rename) by a *placeholder* that names no readable shard, each region is rewritten
    and fsynced, and the commit file is replaced by the new one. The next writer replays the
    journal: if the commit file is the new one, the switch is complete; otherwise every region and
    the commit file get their old bytes back. Between a crash and that run, a plain reader finds the
    old commit file with every shard as it was, the placeholder (and refuses the checkpoint: it
    names a file that does not exist), or the new one — never a commit file beside shards of which
    some were rewritten and some not; nothing is lost.
    """

    def __init__(self, directory: Path, commit: str) -> None:
        self.directory = directory
        self.commit_path = directory / commit
        self.journal = directory / f".{commit}.ckptmigrate-headers"

    def run(
        self, edits: dict[str, tuple[int, bytes]], data: bytes, check: Callable[[Path], None] | None,
        placeholder: bytes,
    ) -> None:
        """Rewrite the regions ``edits`` (shard -> (offset, new bytes)), then switch the commit file
        to ``data``; ``placeholder`` stands in for the commit file meanwhile."""
        old: dict[str, list[Any]] = {}
        for name, (offset, new) in edits.items():
            with open(self.directory / name, "rb") as fh:
                old[name] = [offset, base64.b64encode(os.pread(fh.fileno(), len(new), offset)).decode()]
        old_commit = self.commit_path.read_bytes()
        body = {"commit": self.commit_path.name, "digest": hashlib.sha256(data).hexdigest(), "old": old,
                "old_commit": base64.b64encode(old_commit).decode()}
        with atomic_write(self.journal) as fh:  # synced, with its directory, before anything changes
            fh.write(json.dumps(body).encode())
        try:
            with atomic_write(self.commit_path) as fh:
                fh.write(placeholder)
            for name, (offset, new) in edits.items():
                _overwrite(self.directory / name, offset, new)
            with atomic_write(self.commit_path, check=check) as fh:
                fh.write(data)
        except BaseException:
            if digest_file(self.commit_path) != body["digest"]:
                self._restore(old, old_commit)
            self.journal.unlink(missing_ok=True)
            raise
        self.journal.unlink(missing_ok=True)  # if a crash brings it back, the next run sees the new index and drops it

    def recover(self) -> bool:
        """Complete or undo what a killed run left; True if there was a journal."""
        remove_stale_temps(self.journal)
        try:
            body = json.loads(self.journal.read_text())
        except FileNotFoundError:
            return False
        except ValueError:  # torn while it was written: no region was touched yet
            self.journal.unlink(missing_ok=True)
            return True
        if digest_file(self.commit_path) != body.get("digest"):
            old_commit = body.get("old_commit")
            self._restore(body.get("old", {}), None if old_commit is None else base64.b64decode(old_commit))
        self.journal.unlink(missing_ok=True)
        fsync_dir(self.directory)
        return True

    def _restore(self, old: dict[str, list[Any]], old_commit: bytes | None) -> None:
        """The old bytes of every region, then the old commit file (which names them) back."""
        for name, (offset, encoded) in old.items():
            data = base64.b64decode(encoded)
            with contextlib.suppress(FileNotFoundError):
                with open(self.directory / name, "rb") as fh:
                    if os.pread(fh.fileno(), len(data), int(offset)) == data:
                        continue  # never rewritten (the write that failed, those after it)
                _overwrite(self.directory / name, int(offset), data)
        if old_commit is not None and digest_file(self.commit_path) != hashlib.sha256(old_commit).hexdigest():
            with atomic_write(self.commit_path) as fh:
                fh.write(old_commit)


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        write_all(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
