"""A small Hugging Face Hub on 127.0.0.1: model repositories served from a directory, for the ``hf://``
tests (huggingface_hub's ``HfFileSystem`` pointed at it by ``HF_ENDPOINT``).

It answers the calls ``HfFileSystem`` makes to read a file, as the Hub documents them
(https://huggingface.co/docs/hub/api): ``GET /api/models/{repo}[/revision/{rev}]`` (the repository
and the commit a revision resolves to), ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (a listing, with
``recursive``), ``POST /api/models/{repo}/paths-info/{rev}``, and ``GET``/``HEAD``
``/{repo}/resolve/{rev}/{path}`` (the file's bytes, ``Range`` honoured with ``206``). Errors carry the
Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), which is how
huggingface_hub tells them apart. What the real Hub does and this does not: one page per listing
(the Hub pages at 1,000 entries), no redirect of LFS files to a CDN (the bytes are served here, with
the ``X-Linked-Etag``/``X-Linked-Size`` a redirect carries), no Xet storage (no ``xetHash``: clients
read over HTTP), no writes.

``root/NAMESPACE/NAME/`` is a repository; it has one branch, ``main``, whose commit id is a hash of
its files. ``served`` counts the body bytes sent, by the server, and ``tokens`` the bearer tokens seen.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.objectstores import Served

#: Files the Hub stores through LFS (its default ``.gitattributes`` for these suffixes).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5")


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


class _Repo:
    def __init__(self, path: Path) -> None:
        self.path = path
        files = sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha1(usedforsecurity=False)
        for f in files:
            digest.update(f.relative_to(path).as_posix().encode() + b"\0" + _git_blob_oid(f.read_bytes()).encode())
        self.commit = digest.hexdigest()
        self.files = [f.relative_to(path).as_posix() for f in files]

    def resolves(self, revision: str) -> bool:
        return revision in ("main", self.commit)

    def entry(self, rel: str) -> dict[str, Any] | None:
        """A tree entry (``paths-info``/``tree``) for the file or folder ``rel``."""
        target = self.path / rel
        if target.is_file():
            data = target.read_bytes()
            out: dict[str, Any] = {"type": "file", "oid": _git_blob_oid(data), "size": len(data), "path": rel}
            if rel.endswith(LFS_SUFFIXES):
                out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return out
        if target.is_dir() and rel:
            oid = hashlib.sha1(rel.encode(), usedforsecurity=False).hexdigest()
            return {"type": "directory", "oid": oid, "size": 0, "path": rel}
        return None

    def tree(self, rel: str, recursive: bool) -> list[dict[str, Any]] | None:
        base = self.path / rel if rel else self.path
        if not base.is_dir():
            return None
        children = sorted(base.rglob("*") if recursive else base.iterdir())
        entries = [self.entry(p.relative_to(self.path).as_posix()) for p in children]
        return [e for e in entries if e is not None]


class _HubHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    served: Served
    tokens: list[str]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Quiet: the tests read ``served``, not stderr."""

    # -- plumbing ------------------------------------------------------------------------------------

    def _note(self) -> None:
        auth = self.headers.get("Authorization", "")
        with self.served.lock:
            self.served.requests += 1
            self.served.log.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".rstrip())
            if auth.startswith("Bearer "):
                self.tokens.append(auth[len("Bearer "):])

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
            with self.served.lock:
                self.served.body_bytes_sent += len(body)

    def _json(self, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, *, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                  "X-Error-Message": message}, head=head)

    def _repo(self, repo_id: str, revision: str | None, *, head: bool = False) -> _Repo | None:
        """The repository at ``revision``, or an error answered (and None)."""
        path = self.root / repo_id
        if repo_id.count("/") != 1 or ".." in repo_id or not path.is_dir():
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return None
        repo = _Repo(path)
        if revision is not None and not repo.resolves(revision):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return None
        return repo

    # -- the routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self._route(head=True)

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self._note()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", urlsplit(self.path).path)
        if match is None:
            self._error(404, "NotFound", "no such route")
            return
        repo = self._repo(match.group(1), unquote(match.group(2)))
        if repo is None:
            return
        form = parse_qs(body) if "json" not in self.headers.get("Content-Type", "") else json.loads(body or "{}")
        paths = form.get("paths", [])
        entries = [repo.entry(p.strip("/")) for p in ([paths] if isinstance(paths, str) else paths)]
        self._json([e for e in entries if e is not None])

    def _route(self, *, head: bool) -> None:
        self._note()
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            self._model_info(match.group(1), match.group(2), head=head)
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            repo = self._repo(match.group(1), match.group(2), head=head)
            if repo is None:
                return
            tree = repo.tree(match.group(3) or "", query.get("recursive", ["false"])[0].lower() == "true")
            if tree is None:
                self._error(404, "EntryNotFound", f"{match.group(3)} does not exist on \"{match.group(2)}\"", head=head)
                return
            self._json(tree)
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            self._resolve(match.group(1), match.group(2), match.group(3), head=head)
        else:
            self._error(404, "NotFound", "no such route", head=head)

    def _model_info(self, repo_id: str, revision: str | None, *, head: bool) -> None:
        repo = self._repo(repo_id, revision, head=head)
        if repo is None:
            return
        self._json({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "gated": False,
                    "disabled": False, "tags": [], "siblings": [{"rfilename": f} for f in repo.files]})

    def _resolve(self, repo_id: str, revision: str, rel: str, *, head: bool) -> None:
        repo = self._repo(repo_id, revision, head=head)
        if repo is None:
            return
        entry = repo.entry(rel)
        if entry is None or entry["type"] != "file":
            self._error(404, "EntryNotFound", f"{rel} does not exist on \"{revision}\"", head=head)
            return
        data = (repo.path / rel).read_bytes()
        etag = f'"{entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]}"'
        headers = {"ETag": etag, "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if "lfs" in entry:
            headers |= {"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match is None:
            self._send(200, data, headers, head=head)
            return
        start = int(match.group(1))
        end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
        if start >= len(data):
            self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
            return
        self._send(206, data[start:end], headers | {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"},
                   head=head)


class HubServer:
    """Repositories under ``root`` (``root/NAMESPACE/NAME/``) as a Hub on 127.0.0.1; ``env`` points
    huggingface_hub (and a ckptmigrate subprocess) at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.served = Served()
        self.tokens: list[str] = []
        handler = type("Handler", (_HubHandler,), {"root": root, "served": self.served, "tokens": self.tokens})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
                    "HF_HUB_DISABLE_XET": "1"}

    def commit(self, repo_id: str) -> str:
        return _Repo(self.root / repo_id).commit

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
