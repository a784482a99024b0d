"""Real servers for the object-storage tests and bench, on 127.0.0.1 at a free port: moto's S3 server
(the same WSGI app as ``ThreadedMotoServer``) and a small HTTP server that honours ``Range`` (or not).

Both count the bytes they actually serve and receive, in the server, so a test of "reads only the
directory" does not trust ckptmigrate's own counter.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Dummy credentials: moto accepts any; a real account is never reached (the endpoint is 127.0.0.1).
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """What a server sent (response bodies) and received (request bodies), and how many requests."""

    requests: int = 0
    body_bytes_sent: int = 0
    body_bytes_received: int = 0
    log: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.requests = self.body_bytes_sent = self.body_bytes_received = 0
            self.log.clear()


class _Counting:
    """WSGI middleware: counts request and response body bytes as they cross the server."""

    def __init__(self, app: Any, served: Served) -> None:
        self.app, self.served = app, served

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        with self.served.lock:
            self.served.requests += 1
            self.served.body_bytes_received += length
            self.served.log.append(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO')}?"
                                   f"{environ.get('QUERY_STRING', '')} {environ.get('HTTP_RANGE', '')}")
        for chunk in self.app(environ, start_response):
            with self.served.lock:
                self.served.body_bytes_sent += len(chunk)
            yield chunk


class S3Server:
    """moto's S3 server in a thread; ``env`` points botocore (and a ckptmigrate subprocess) at it."""

    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log(self, type: str, message: str, *args: Any) -> None:  # noqa: A002 - werkzeug's name
                """The tests read ``served``, not a line per request."""

        self.served = Served()
        self.port = free_port()
        app = _Counting(DomainDispatcherApplication(create_backend_app), self.served)
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**DUMMY_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()

    def new_bucket(self, tag: str, test_dir: Path) -> str:
        """A bucket of the test's own (named after its temporary directory, as S3 names may be)."""
        name = f"{tag}-{test_dir.name.lower().replace('_', '-')[-(62 - len(tag)):]}"
        self.client().create_bucket(Bucket=name)
        return name

    def client(self) -> Any:
        """A plain boto3 client, for the tests' own looks at the bucket (not what ckptmigrate uses)."""
        import boto3
        from botocore.config import Config

        # moto keeps a multipart object's composite checksum on a server-side copy, which then fails
        # botocore's check of the whole body: the tests compare bytes themselves
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(response_checksum_validation="when_required"))


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    served: Served
    honour_range: bool = True
    forbidden: str | None = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Quiet: the tests read ``served``, not stderr."""

    def _target(self) -> Path | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        if self.forbidden is not None and rel.startswith(self.forbidden):
            return None
        path = self.root / rel
        return path if path.is_file() else None

    def _refuse(self) -> None:
        forbidden = self.forbidden is not None and self.path.lstrip("/").startswith(self.forbidden)
        self.send_error(403 if forbidden else 404)

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        target = self._target()
        if target is None:
            self._refuse()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(target.stat().st_size))
        self.send_header("Accept-Ranges", "bytes" if self.honour_range else "none")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        target = self._target()
        with self.served.lock:
            self.served.requests += 1
            self.served.log.append(f"GET {self.path} {self.headers.get('Range', '')}")
        if target is None:
            self._refuse()
            return
        size = target.stat().st_size
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start, end = 0, size
        if match and self.honour_range:
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        with open(target, "rb") as fh:
            fh.seek(start)
            left = end - start
            try:
                while left:
                    chunk = fh.read(min(left, 1 << 20))
                    self.wfile.write(chunk)
                    with self.served.lock:
                        self.served.body_bytes_sent += len(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client stopped reading (what ckptmigrate does with a server that ignores Range)


class HttpServer:
    """Files under ``root`` over HTTP on 127.0.0.1; ``honour_range=False`` answers every GET whole;
    paths under ``forbidden`` are answered 403."""

    def __init__(self, root: Path, *, honour_range: bool = True, forbidden: str | None = None) -> None:
        self.served = Served()
        handler = type("Handler", (_RangeHandler,), {"root": root, "served": self.served,
                                                     "honour_range": honour_range, "forbidden": forbidden})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> HttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


@contextlib.contextmanager
def running_s3() -> Iterator[S3Server]:
    """A moto server on 127.0.0.1, with this process's AWS settings pointing at it."""
    server = S3Server().start()
    old = set_env(server.env)
    try:
        yield server
    finally:
        restore_env(old)
        server.stop()


@contextlib.contextmanager
def running_gcs(bucket: str = "ckpts", **settings: str) -> Iterator[tuple[dict[str, str], Any]]:
    """gcp-storage-emulator (GCS's JSON API, in memory) on 127.0.0.1 with ``bucket``, this process's
    gcsfs settings pointing at it (plus ``settings``): the settings and the tests' own client's bucket."""
    from gcp_storage_emulator.server import create_server
    from google.cloud import storage  # the tests' own look at the bucket, not what ckptmigrate uses

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           **settings}
    old = set_env(env)
    try:
        client = storage.Client.create_anonymous_client()
        client._connection.API_BASE_URL = env["STORAGE_EMULATOR_HOST"]
        yield env, client.bucket(bucket)
    finally:
        restore_env(old)
        server.stop()


def set_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set ``env`` in this process; returns what to restore."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class CountingProxy:
    """A TCP forwarder on 127.0.0.1 to a server's port that counts the bytes crossing it each way
    (HTTP headers included), as the network would: for servers that count nothing themselves
    (the GCS emulator, Azurite). ``up``: client to server; ``down``: server to client."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0

    def stop(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.target)) as server:
            up = threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True)
            up.start()
            self._pump(server, client, "down")
            up.join()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass  # the other side closed
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
