"""A small Hugging Face Hub on 127.0.0.1: model repositories with a commit history, for the ``hf://``
tests (huggingface_hub's ``HfFileSystem`` and ``HfApi`` pointed at it by ``HF_ENDPOINT``).

Reads, as the Hub documents them (https://huggingface.co/docs/hub/api): ``GET
/api/models/{repo}[/revision/{rev}]`` (the repository and the commit a revision resolves to), ``GET
/api/models/{repo}/refs`` (branches and tags), ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (a
listing, with ``recursive``), ``POST /api/models/{repo}/paths-info/{rev}``, and ``GET``/``HEAD``
``/{repo}/resolve/{rev}/{path}`` (the file's bytes, ``Range`` honoured with ``206``).

Writes, as ``HfApi.create_commit`` speaks them without Xet (``HF_HUB_DISABLE_XET=1``):
``POST /api/models/{repo}/preupload/{rev}`` (which files go through LFS, and the oid of the file
there now), the LFS batch API ``POST /{repo}.git/info/lfs/objects/batch`` (the ``basic`` transfer:
an ``upload`` href the file is PUT to, checked against the announced sha256 and size, and a
``verify`` href), and ``POST /api/models/{repo}/commit/{rev}`` (ndjson: a header, then ``file``
lines, base64, and ``lfsFile`` lines naming uploaded objects). A commit whose ``parentCommit`` is not
the branch's head is refused with HTTP 412, as the Hub refuses it; a commit to a tag or a commit id
is refused (a commit needs a branch). The branch then points at the new commit, every older commit
stays readable by its id, and the repository's directory is rewritten to the new head.

Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``),
which is how huggingface_hub tells them apart. What the real Hub does and this does not: one page
per listing, no redirect of LFS files to a CDN (the bytes are served here, with the
``X-Linked-Etag``/``X-Linked-Size`` a redirect carries), no Xet (no ``xetHash``; the Xet token route
is not there), no multipart LFS transfer, no pull requests.

``root/NAMESPACE/NAME/`` is a repository; its files when the server first looks at it are the first
commit of ``main``. ``served`` counts the body bytes sent and received, ``store.uploads`` the LFS
objects uploaded, and ``tokens`` the bearer tokens seen.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.objectstores import Served

#: Files the Hub stores through LFS (its default ``.gitattributes`` for these suffixes).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5")


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Commit:
    files: dict[str, bytes]
    parent: str | None
    title: str
    description: str = ""

    @property
    def id(self) -> str:
        digest = hashlib.sha1((self.parent or "").encode() + b"\0" + self.title.encode(), usedforsecurity=False)
        for rel in sorted(self.files):
            digest.update(rel.encode() + b"\0" + _git_blob_oid(self.files[rel]).encode())
        return digest.hexdigest()

    def entry(self, rel: str) -> dict[str, Any] | None:
        """A tree entry (``paths-info``/``tree``) for the file or folder ``rel``."""
        if rel in self.files:
            data = self.files[rel]
            out: dict[str, Any] = {"type": "file", "oid": _git_blob_oid(data), "size": len(data), "path": rel}
            if rel.endswith(LFS_SUFFIXES):
                out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return out
        if rel and any(f.startswith(rel + "/") for f in self.files):
            oid = hashlib.sha1(rel.encode(), usedforsecurity=False).hexdigest()
            return {"type": "directory", "oid": oid, "size": 0, "path": rel}
        return None

    def tree(self, rel: str, recursive: bool) -> list[dict[str, Any]] | None:
        if rel and (self.entry(rel) or {}).get("type") != "directory":
            return None
        base = rel + "/" if rel else ""
        names: set[str] = set()
        for f in self.files:
            if not f.startswith(base):
                continue
            parts = f[len(base):].split("/")
            for depth in range(1, len(parts) + 1 if recursive else 2):
                names.add(base + "/".join(parts[:depth]))
        return [e for e in (self.entry(n) for n in sorted(names)) if e is not None]


@dataclass
class History:
    """A repository's commits, by id, and its refs."""

    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """The commit id a branch, tag or commit id names."""
        for refs in (self.branches, self.tags):
            if revision in refs:
                return refs[revision]
        return revision if revision in self.commits else None

    def add(self, commit: Commit, branch: str = "main") -> str:
        self.commits[commit.id] = commit
        self.branches[branch] = commit.id
        return commit.id


class Store:
    """Every repository's history, made from its directory when first asked for; LFS objects uploaded
    and not yet committed, by sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.repos: dict[str, History] = {}
        self.lfs: dict[str, bytes] = {}
        #: The size of each LFS object uploaded (PUT and kept), in order.
        self.uploads: list[int] = []

    def history(self, repo_id: str) -> History | None:
        path = self.root / repo_id
        if repo_id.count("/") != 1 or ".." in repo_id or not path.is_dir():
            return None
        with self.lock:
            if repo_id not in self.repos:
                files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
                history = History()
                history.add(Commit(files, None, "initial commit"))
                self.repos[repo_id] = history
            return self.repos[repo_id]

    def mirror(self, repo_id: str, old: dict[str, bytes], new: dict[str, bytes]) -> None:
        """The repository's directory rewritten to ``main``'s new head."""
        path = self.root / repo_id
        for rel in old.keys() - new.keys():
            (path / rel).unlink()
        for rel, data in new.items():
            if old.get(rel) != data:
                (path / rel).parent.mkdir(parents=True, exist_ok=True)
                (path / rel).write_bytes(data)


class _HubHandler(http.server.BaseHTTPRequestHandler):
    store: Store
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

    def _body(self) -> bytes:
        """The request body, by ``Content-Length`` or chunked."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
            body = bytes(out)
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.served.lock:
            self.served.body_bytes_received += len(body)
        return body

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
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        self._send(status, body, headers | ({"X-Error-Code": code} if code else {}), head=head)

    def _history(self, repo_id: str, *, head: bool = False) -> History | None:
        history = self.store.history(repo_id)
        if history is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
        return history

    def _commit(self, repo_id: str, revision: str | None, *, head: bool = False) -> tuple[str, Commit] | None:
        """The commit ``revision`` names (``main``'s head when None), or an error answered (and None)."""
        history = self._history(repo_id, head=head)
        if history is None:
            return None
        sha = history.resolve(revision or "main")
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return None
        return sha, history.commits[sha]

    # -- the routes ----------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self._route(head=True)

    def _route(self, *, head: bool) -> None:
        self._note()
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            self._model_info(match.group(1), match.group(2), head=head)
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs", path):
            history = self._history(match.group(1), head=head)
            if history is not None:
                self._json({"branches": self._refs(history.branches, "heads"), "tags": self._refs(history.tags, "tags"),
                            "converts": []})
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            found = self._commit(match.group(1), match.group(2), head=head)
            if found is None:
                return
            tree = found[1].tree(match.group(3) or "", query.get("recursive", ["false"])[0].lower() == "true")
            if tree is None:
                self._error(404, "EntryNotFound", f"{match.group(3)} does not exist on \"{match.group(2)}\"", head=head)
                return
            self._json(tree)
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            self._resolve(match.group(1), match.group(2), match.group(3), head=head)
        else:
            self._error(404, "", "no such route", head=head)

    @staticmethod
    def _refs(refs: dict[str, str], kind: str) -> list[dict[str, str]]:
        return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(refs.items())]

    def _model_info(self, repo_id: str, revision: str | None, *, head: bool) -> None:
        found = self._commit(repo_id, revision, head=head)
        if found is None:
            return
        sha, commit = found
        self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "gated": False,
                    "disabled": False, "tags": [], "siblings": [{"rfilename": f} for f in sorted(commit.files)]})

    def _resolve(self, repo_id: str, revision: str, rel: str, *, head: bool) -> None:
        found = self._commit(repo_id, revision, head=head)
        if found is None:
            return
        sha, commit = found
        entry = commit.entry(rel)
        if entry is None or entry["type"] != "file":
            self._error(404, "EntryNotFound", f"{rel} does not exist on \"{revision}\"", head=head)
            return
        data = commit.files[rel]
        etag = f'"{entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]}"'
        headers = {"ETag": etag, "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
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

    # -- writes --------------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self._note()
        body = self._body()
        path = urlsplit(self.path).path
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path):
            found = self._commit(match.group(1), unquote(match.group(2)))
            if found is None:
                return
            form = parse_qs(body.decode()) if "json" not in self.headers.get("Content-Type", "") \
                else json.loads(body or b"{}")
            paths = form.get("paths", [])
            entries = [found[1].entry(p.strip("/")) for p in ([paths] if isinstance(paths, str) else paths)]
            self._json([e for e in entries if e is not None])
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
            self._preupload(match.group(1), unquote(match.group(2)), json.loads(body))
        elif match := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
            self._lfs_batch(match.group(1), json.loads(body))
        elif match := re.fullmatch(r"/lfs-verify/([0-9a-f]{64})", path):
            if match.group(1) in self.store.lfs:
                self._json({"oid": match.group(1)})
            else:
                self._error(404, "", "no such LFS object")
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
            self._create_commit(match.group(1), unquote(match.group(2)), body)
        else:
            self._error(404, "", "no such route")

    def do_PUT(self) -> None:  # noqa: N802 - the stdlib's name
        """The LFS ``basic`` upload: the object's bytes, kept only if they are the sha256 and size announced."""
        self._note()
        data = self._body()
        match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})/(\d+)", urlsplit(self.path).path)
        if match is None:
            self._error(404, "", "no such route")
            return
        if hashlib.sha256(data).hexdigest() != match.group(1) or len(data) != int(match.group(2)):
            self._error(400, "", "the object's bytes are not the sha256 and size announced")
            return
        with self.store.lock:
            self.store.lfs[match.group(1)] = data
            self.store.uploads.append(len(data))
        self._send(200, b"")

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> None:
        found = self._commit(repo_id, revision)
        if found is None:
            return
        files = []
        for f in payload["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 << 20
            entry = found[1].entry(f["path"])
            oid = None if entry is None else (entry["lfs"]["oid"] if "lfs" in entry else entry["oid"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json({"files": files, "commitOid": found[0]})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        if self._history(repo_id) is None:
            return
        if "basic" not in payload.get("transfers", ["basic"]):
            self._error(422, "", "this Hub speaks the basic LFS transfer only")
            return
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            out: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.store.lfs:
                out["actions"] = {"upload": {"href": f"http://{self.headers['Host']}/lfs-upload/{oid}/{size}"},
                                  "verify": {"href": f"http://{self.headers['Host']}/lfs-verify/{oid}"}}
            objects.append(out)
        self._json({"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _create_commit(self, repo_id: str, revision: str, body: bytes) -> None:
        history = self._history(repo_id)
        if history is None:
            return
        if revision not in history.branches:
            what = "a tag" if revision in history.tags else "not a branch"
            self._error(400, "RevisionNotFound" if revision not in history.commits and what != "a tag" else "",
                        f"Invalid rev id: {revision} is {what}: a commit needs a branch")
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        with self.store.lock:
            head = history.branches[revision]
            parent = header.get("parentCommit")
            if parent is not None and not head.startswith(parent):
                self._error(412, "", "A commit has happened since. Please refresh and try again.")
                return
            files = dict(history.commits[head].files)
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if value["oid"] not in self.store.lfs:
                        self._error(422, "", f"LFS object {value['oid']} was never uploaded")
                        return
                    files[value["path"]] = self.store.lfs[value["oid"]]
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
            old = history.commits[head].files
            sha = history.add(Commit(files, head, header["summary"], header.get("description", "")), revision)
            if revision == "main":
                self.store.mirror(repo_id, old, files)
        self._json({"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}", "commitOid": sha,
                    "pullRequestUrl": None})


class HubServer:
    """Repositories under ``root`` (``root/NAMESPACE/NAME/``) as a Hub on 127.0.0.1; ``env`` points
    huggingface_hub (and a ckptmigrate subprocess) at it. ``HF_HUB_DISABLE_XET=1``: huggingface_hub
    uploads through Xet whenever hf_xet is installed, without asking the server; this Hub has no Xet."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.served = Served()
        self.tokens: list[str] = []
        self.store = Store(root)
        handler = type("Handler", (_HubHandler,), {"store": self.store, "served": self.served, "tokens": self.tokens})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
                    "HF_HUB_DISABLE_XET": "1"}

    def history(self, repo_id: str) -> History:
        found = self.store.history(repo_id)
        assert found is not None, repo_id
        return found

    def commit(self, repo_id: str, revision: str = "main") -> str:
        """The commit id ``revision`` of ``repo_id`` resolves to."""
        sha = self.history(repo_id).resolve(revision)
        assert sha is not None, revision
        return sha

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        history = self.history(repo_id)
        return history.commits[self.commit(repo_id, revision)].files[path]

    def tag(self, repo_id: str, name: str, revision: str = "main") -> None:
        self.history(repo_id).tags[name] = self.commit(repo_id, revision)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
