"""Writing a file of a Hugging Face Hub repository: one commit, on top of the commit it was read at.

A Hub repository is written by commits, not objects: the new file is staged locally (the kept bytes
of a rename streamed down by range, the new header or tail after them) and committed with
huggingface_hub's ``HfApi.create_commit`` (one ``CommitOperationAdd`` per file: a sharded model's
index and shards go in one commit, atomically). The bytes go up through LFS (or Xet, when hf_xet is
installed and not disabled by ``HF_HUB_DISABLE_XET``), and the branch moves only when the commit
lands: a reader sees the old commit or the new one. The commit carries ``parentCommit``, the commit
the file was read at (storage/hub_revisions): if the branch moved meanwhile, the Hub refuses it
(HTTP 412); when the files written are the same at the branch's new head as at the commit read
(another writer committed other files), the commit is made again on the new head, else the loser
raises :class:`~ckptmigrate.errors.ObjectChanged` and commits nothing. A commit needs a branch: a
tag or a commit id is refused before anything is read or sent.

The backup is the Hub's own history: the file at the commit read, ``hf://REPO@COMMIT/PATH``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptmigrate.errors import ObjectChanged, RemoteError
from ckptmigrate.storage import hub_revisions
from ckptmigrate.storage.ranges import TRANSFER, RangeFile
from ckptmigrate.util.urls import CommitVersion, ObjectURL, filesystem, translated
from ckptmigrate.version import __version__

WRITABLE = ("hf",)
#: How many times a commit is made again on a branch that moved under it without touching its files.
REBASES = 5


@dataclass
class HubFile:
    """A file to write: its repository, branch and path, and the commit it was read at (named
    ``etag`` as the other writers name their precondition). ``bucket``/``key`` are the repository at
    that commit and the path in it, as ``HfFileSystem`` names them."""

    url: ObjectURL
    fs: Any
    where: Any
    etag: str
    #: A new file: written only if there is none at the branch's head when the commit lands.
    create_only: bool = False
    #: The commit's summary and description (set by who knows the migration; else a generic one).
    title: str | None = None
    description: str = ""

    @classmethod
    def of(cls, url: ObjectURL, commit: str | None) -> HubFile:
        """The file at ``url``, on top of ``commit`` (None: the branch's head now); a revision that
        is not a branch is one line."""
        fs, path = filesystem(url)
        with translated(url, "write"):
            where = hub_revisions.resolved(fs, path)
            if where is None:
                raise RemoteError(f"{url}: Hub buckets are not written (only files of model, dataset and space "
                                  "repositories, by commits)", url=str(url))
            refs = fs._api.list_repo_refs(where.repo_id, repo_type=where.repo_type)
        TRANSFER.requests += 1
        branches = {b.name: b.target_commit for b in refs.branches}
        if where.revision not in branches:
            what = "a tag" if any(t.name == where.revision for t in refs.tags) else "not a branch"
            raise RemoteError(f"{url}: revision {where.revision} is {what}, and a Hub commit needs a branch "
                              "(name one: hf://REPO@BRANCH/PATH); nothing was written", url=str(url))
        return cls(url, fs, where, commit or branches[where.revision])

    @property
    def bucket(self) -> str:
        return hub_revisions.repo_root(self.where, self.etag)

    @property
    def key(self) -> str:
        return str(self.where.path_in_repo)

    def head_etag(self) -> str:
        """The commit the branch points at now."""
        TRANSFER.requests += 1
        with translated(self.url):
            info = self.fs._api.repo_info(self.where.repo_id, repo_type=self.where.repo_type,
                                          revision=self.where.revision)
        return str(info.sha)

    def changed(self, found: str | None) -> ObjectChanged:
        what = "a file appeared at" if self.create_only else "another commit changed"
        return ObjectChanged(f"{self.url}: {what} {self.key} on {self.where.revision} since commit {self.etag[:12]} "
                             f"(now {str(found)[:12]}): another writer got there first; nothing was committed",
                             url=str(self.url), expected=self.etag, found=found)


def describe(obj: HubFile, what: str, paths: list[str]) -> None:
    """The commit's message: ckptmigrate, the change (``upgrade c1 -> c2``) and where the files as
    they were stay."""
    more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
    obj.title = f"ckptmigrate: {what} ({paths[0]}{more})"
    obj.description = (f"{', '.join(paths)} rewritten by ckptmigrate {__version__}: {what}. The files as they were "
                       f"are at commit {obj.etag} (hf://{obj.bucket}/{paths[0]}).")


def backup(obj: HubFile) -> ObjectURL:
    """The file as read stays in the repository's history: ``hf://REPO@COMMIT/PATH``."""
    return CommitVersion.of(ObjectURL(f"hf://{obj.bucket}/{obj.key}"), obj.etag)


def upload(obj: HubFile, path: str | os.PathLike[str]) -> None:
    commit(obj, {obj.key: Path(path)})


def compose(obj: HubFile, old: RangeFile, keep: int, tail: bytes) -> None:
    """The file as its first ``keep`` bytes and ``tail``, staged (LFS has no server-side splice)."""
    with tempfile.TemporaryDirectory(prefix="ckptmigrate-") as tmp:
        staged = Path(tmp) / "new"
        with open(staged, "wb") as fh:
            copy_range(old, fh, 0, keep)
            fh.write(tail)
        upload(obj, staged)


def replace_head(obj: HubFile, old: RangeFile, head: bytes, skip: int) -> None:
    """The file as ``head`` before its bytes from ``skip`` on (a safetensors header rewritten), staged."""
    with tempfile.TemporaryDirectory(prefix="ckptmigrate-") as tmp:
        staged = Path(tmp) / "new"
        with open(staged, "wb") as fh:
            fh.write(head)
            copy_range(old, fh, skip, old.size)
        upload(obj, staged)


def copy_range(old: RangeFile, fh: Any, begin: int, end: int) -> None:
    """The file's bytes ``begin``..``end`` (at the commit read) into ``fh``, a chunk at a time."""
    for block in old.chunks(begin, end):
        fh.write(block)


def commit(obj: HubFile, files: Mapping[str, Path | None]) -> str:
    """One commit of ``files`` (path in the repository -> local file, or None: deleted) on ``obj``'s
    branch, on top of the commit read; made again on a moved branch only where none of ``files``
    changed. Returns the new commit's id."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    parent = obj.etag
    title = obj.title or f"ckptmigrate: write {', '.join(sorted(files))}"
    description = obj.description or (f"Written by ckptmigrate {__version__}; the files as they were are at "
                                      f"commit {obj.etag}.")
    # made once: an LFS object uploaded for a refused commit is not sent again for the next
    ops: list[Any] = [CommitOperationDelete(path_in_repo=name) if local is None
                      else CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local))
                      for name, local in files.items()]
    try:
        for _attempt in range(REBASES + 1):
            made = _create(obj, ops, title, description, parent)
            if made is not None:
                obj.fs.invalidate_cache()
                return made
            head = obj.head_etag()
            if not _untouched(obj, files, parent, head):
                raise obj.changed(head)
            parent = head
    finally:
        _count(ops)
    raise obj.changed(parent)


def _create(obj: HubFile, ops: list[Any], title: str, description: str, parent: str) -> str | None:
    """``HfApi.create_commit`` on top of ``parent`` (its progress bars off); None: the branch is no
    longer at ``parent`` (HTTP 412)."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        with translated(obj.url, "write"):
            try:
                info = obj.fs._api.create_commit(
                    obj.where.repo_id, ops, commit_message=title, commit_description=description,
                    repo_type=obj.where.repo_type, revision=obj.where.revision, parent_commit=parent)
            except HfHubHTTPError as exc:
                if exc.response is not None and exc.response.status_code == 412:
                    return None
                raise
            except Exception as exc:
                if "xet-write-token" in str(exc) and "404" in str(exc):
                    raise RemoteError(f"{obj.url}: cannot write: this Hub has no Xet storage (its Xet token route "
                                      "answers 404), and huggingface_hub uploads through Xet whenever hf_xet is "
                                      "installed: set HF_HUB_DISABLE_XET=1 to upload through LFS",
                                      url=str(obj.url)) from None
                raise
    finally:
        if not quiet:
            enable_progress_bars()
    return str(info.oid)


def _untouched(obj: HubFile, files: Iterable[str], before: str, after: str) -> bool:
    """Whether ``files`` are the same at commit ``after`` as at ``before`` (another writer's commit
    between them wrote other files)."""
    def entries(revision: str) -> dict[str, Any]:
        TRANSFER.requests += 1
        with translated(obj.url):
            found = obj.fs._api.get_paths_info(obj.where.repo_id, list(files), repo_type=obj.where.repo_type,
                                               revision=revision)
        return {f.path: (getattr(f, "blob_id", None), getattr(f, "lfs", None)) for f in found}

    return entries(before) == entries(after)


def _count(ops: list[Any]) -> None:
    """What a commit sent: each file uploaded (LFS: the whole file, however little changed; Xet sends
    only chunks the Hub lacks, so this is its upper bound), a regular file's base64 in the commit,
    and the requests (preupload, LFS batch, upload and verify, commit)."""
    added = [op for op in ops if hasattr(op, "upload_info")]
    uploaded = [op for op in added if op._upload_mode == "lfs" and op._is_uploaded]
    TRANSFER.requests += 2 + 2 * len(uploaded) + (1 if uploaded else 0)
    TRANSFER.bytes_sent += sum(op.upload_info.size for op in uploaded)
    TRANSFER.bytes_sent += sum(op.upload_info.size * 4 // 3 for op in added if op._upload_mode == "regular")
