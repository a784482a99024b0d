"""Which commit an ``hf://`` file is read at. A branch (or tag) is resolved once, when the file is
opened, to the commit it points at, and every read is made at that commit: a checkpoint is read
from one commit however the branch moves meanwhile, and a write knows the commit it builds on (its
``parentCommit``, storage/hf_commit)."""

from __future__ import annotations

from typing import Any

#: How ``HfFileSystem`` names a repository of each type (huggingface_hub's ``REPO_TYPES_URL_PREFIXES``).
PREFIXES = {"dataset": "datasets/", "space": "spaces/"}


def resolved(fs: Any, path: str) -> Any | None:
    """``path`` as ``HfFileSystem`` resolves it: ``repo_type``, ``repo_id``, ``revision``,
    ``path_in_repo`` (None: a Hub bucket, which has no commits). huggingface_hub is imported only
    by who reads ``hf://``: it is an optional extra."""
    out = fs.resolve_path(path)
    return out if getattr(out, "repo_id", None) else None


def repo_root(where: Any, revision: str) -> str:
    """The repository at ``revision`` as ``HfFileSystem`` names it (``datasets/a/b@REV``)."""
    return f"{PREFIXES.get(where.repo_type, '')}{where.repo_id}@{revision}"


def pinned(fs: Any, path: str) -> tuple[str | None, str]:
    """The commit ``path``'s revision points at now, and ``path`` at that commit."""
    where = resolved(fs, path)
    if where is None:
        return None, path
    sha = fs._api.repo_info(where.repo_id, repo_type=where.repo_type, revision=where.revision).sha
    return sha, f"{repo_root(where, sha)}/{where.path_in_repo}".rstrip("/")
