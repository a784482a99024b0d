"""Checkpoints named by URL (``s3://``, ``gs://``, ``az://``, ``hf://``, ``http(s)://``, ``file://``):
which fsspec filesystem reads them, the extra that installs its backend, and how a URL is shown.

A URL is shown without what could be a secret (``user:pass@``, a query string such as a presigned
URL's signature): :class:`ObjectURL` is that shown form, a path the layers above carry like a
local one, and only :func:`filesystem` sees the full URL.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path, PosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ckptmigrate.errors import BadInput, RemoteError

#: scheme -> (the pip extra, the module that backend needs).
BACKENDS: dict[str, tuple[str, str]] = {
    "s3": ("s3", "s3fs"), "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"), "abfs": ("azure", "adlfs"), "abfss": ("azure", "adlfs"),
    "hf": ("hf", "huggingface_hub"),
    "http": ("http", "aiohttp"), "https": ("http", "aiohttp"),
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: Full URLs (with their credentials or query) by the shown form; only :func:`filesystem` reads it.
_FULL: dict[str, str] = {}


def scheme_of(text: str) -> str | None:
    match = _URL.match(text)
    return match.group(1).lower() if match else None


#: The tool that copies a prefix down, per scheme, named where a command needs a local copy.
_SYNC = {"s3": "aws s3 sync", "s3a": "aws s3 sync", "gs": "gcloud storage rsync", "gcs": "gcloud storage rsync",
         "az": "azcopy sync", "abfs": "azcopy sync", "abfss": "azcopy sync", "hf": "hf download"}


def sync_tool(scheme: str) -> str:
    """How a user copies a prefix under ``scheme://`` to a local directory (for an error's advice)."""
    return _SYNC.get(scheme, "a copy tool")


def redact(url: str) -> str:
    """``url`` without ``user:pass@``, query or fragment (they may hold credentials or a signature)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class ObjectURL(PosixPath):
    """A remote object, carried where a path is (``name``, ``suffix``, ``with_name`` work; it names
    no local file: ``exists()`` is False); its
    ``str`` is the URL as shown, without credentials."""

    def __str__(self) -> str:
        head, *rest = self.parts
        return head + "//" + "/".join(rest)

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"ObjectURL({str(self)!r})"

    @property
    def scheme(self) -> str:
        return self.parts[0].rstrip(":").lower()

    @property
    def full(self) -> str:
        """The URL as given, credentials and query included: for the backend only, never shown."""
        return _FULL.get(str(self), str(self))


class ObjectVersion(ObjectURL):
    """One version of an object in a versioned bucket (a backup that costs no copy): shown with its
    ``?versionId=`` (an id, not a secret)."""

    version: str

    def __str__(self) -> str:
        return super().__str__() + f"?versionId={self.version}"

    @classmethod
    def of(cls, url: ObjectURL, version: str) -> ObjectVersion:
        out = cls(ObjectURL.__str__(url))
        out.version = version
        return out


class ObjectGeneration(ObjectVersion):
    """One generation of a GCS object in a bucket with versioning on: shown as gsutil does,
    ``gs://b/k#GENERATION``."""

    def __str__(self) -> str:
        return ObjectURL.__str__(self) + f"#{self.version}"


class CommitVersion(ObjectVersion):
    """A file at one commit of a Hugging Face Hub repository, ``hf://REPO@COMMIT/PATH``: the Hub's
    history keeps it, as a versioned bucket keeps a version, and it reads like any hf:// URL."""

    def __str__(self) -> str:
        return ObjectURL.__str__(self)


def as_location(spec: str | os.PathLike[str]) -> Path | ObjectURL:
    """A PATH argument as a local path (``file://`` URLs too) or an :class:`ObjectURL`."""
    if isinstance(spec, (ObjectURL, Path)):
        return spec
    text = os.fspath(spec)
    scheme = scheme_of(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        return Path(urlsplit(text).path)
    shown = redact(text)
    url = ObjectURL(shown)
    if str(url) != shown.rstrip("/"):
        raise BadInput(f"{shown}: not a URL ckptmigrate can name an object by (empty or '.' parts)", path=shown)
    if shown != text:
        _FULL[shown] = text
    return url


def names_many(text: str) -> bool:
    """A URL that is a pattern (``*``, ``?``, ``[``) or a prefix (ending in ``/``), not one object; an
    ``http(s)://`` URL names one object (its ``?`` starts a query)."""
    if scheme_of(text) in ("http", "https"):
        return False
    return text.endswith("/") or any(ch in text for ch in "*?[")


def is_remote(spec: object) -> bool:
    return isinstance(spec, ObjectURL) or (isinstance(spec, str) and scheme_of(spec) not in (None, "file"))


def filesystem(url: ObjectURL) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the object's path in it. A scheme with no backend, or
    whose backend is not installed, is one line naming the extra to install.

    ``s3://`` takes its endpoint from ``AWS_ENDPOINT_URL`` (or ``CKPTMIGRATE_S3_ENDPOINT_URL``) as
    the AWS CLI does, and its credentials from botocore's usual sources."""
    scheme = url.scheme
    if scheme not in BACKENDS:
        raise RemoteError(f"{url}: no backend reads {scheme}:// URLs (ckptmigrate reads s3://, gs://, az://, "
                          "hf://, http(s):// and file://)", url=str(url))
    extra, module = BACKENDS[scheme]
    if importlib.util.find_spec(module) is None:
        raise RemoteError(f"{url}: reading {scheme}:// needs {module}, which is not installed: "
                          f"pip install 'ckptmigrate[{extra}]'", url=str(url), extra=extra)
    import fsspec

    options: dict[str, Any] = {}
    # named explicitly even when botocore would read it itself: fsspec caches a filesystem by its
    # options, and a process whose endpoint changes must not reuse one that talks to the old endpoint
    endpoint = os.environ.get("CKPTMIGRATE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if scheme in ("s3", "s3a") and endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    options.update(_endpoint_options(scheme))
    with translated(url):
        fs, path = fsspec.core.url_to_fs(url.full, **options)
    return fs, path


def _endpoint_options(scheme: str) -> dict[str, str]:
    """What gcsfs and adlfs would read from the environment when made, passed as options (the same
    values) so that fsspec, which caches a filesystem by its options, makes another when they change:
    the GCS emulator's host, an Azure account host (fsspec reads ``FSSPEC_AZ_ACCOUNT_HOST`` only at
    import) and connection string."""
    options: dict[str, str] = {}
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if scheme in ("gs", "gcs") and host and host != "default":
        options["endpoint_url"] = host if host.startswith(("http://", "https://")) else f"http://{host}"
    if scheme in ("az", "abfs", "abfss"):
        for variable, option in (("FSSPEC_AZ_ACCOUNT_HOST", "account_host"),
                                 ("AZURE_STORAGE_CONNECTION_STRING", "connection_string")):
            if os.environ.get(variable):
                options[option] = os.environ[variable]
    return options


def read_options(url: ObjectURL) -> dict[str, Any]:
    """What a backend's ``cat_ranges`` needs to fetch exactly the bytes asked for. huggingface_hub's
    ``HfFileSystem`` reads through a buffered file whose read-ahead cache fetches 5 MiB past every
    read (a whole small checkpoint for its 4 KiB header): its cache is turned off. s3fs, gcsfs and
    adlfs fetch ranges exactly already."""
    return {"cache_type": "none"} if url.scheme == "hf" else {}


@contextlib.contextmanager
def translated(url: ObjectURL | str, action: str = "read") -> Iterator[None]:
    """Backend exceptions as one :class:`RemoteError` line naming the URL (without credentials)."""
    shown = str(url) if isinstance(url, ObjectURL) else redact(url)
    try:
        yield
    except BadInput:
        raise
    except FileNotFoundError as exc:
        detail = _not_found(exc)
        raise RemoteError(f"{shown}: cannot {action}: {_clean(detail, shown)}", url=shown) from None
    except PermissionError:
        raise RemoteError(f"{shown}: cannot {action}: access denied (check the credentials' permissions)",
                          url=shown) from None
    except Exception as exc:
        name = type(exc).__name__
        if "Must provide either a connection_string or account_name" in str(exc):  # adlfs
            raise RemoteError(f"{shown}: cannot {action}: no credentials found (set AZURE_STORAGE_CONNECTION_STRING, "
                              "or AZURE_STORAGE_ACCOUNT_NAME with a key, SAS token or service principal)",
                              url=shown) from None
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            raise RemoteError(f"{shown}: cannot {action}: no credentials found (set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role)", url=shown) from None
        detail = _clean(_service_message(exc) or name, shown)
        if getattr(exc, "status_code", None) == 403:  # azure-core's errors carry the HTTP status
            raise RemoteError(f"{shown}: cannot {action}: access denied (check the credentials' permissions): "
                              f"{detail}", url=shown) from None
        raise RemoteError(f"{shown}: cannot {action}: {detail}", url=shown) from None


def _service_message(exc: Exception) -> str:
    """What the service said: Azure's first line and error code, not the request id, time and XML
    body azure-core appends; any other backend's message whole."""
    text = str(exc)
    code = getattr(exc, "error_code", None)
    if code is None or not text:
        return text
    return f"{text.splitlines()[0]} ({code})"


#: What huggingface_hub's ``HfFileSystem`` says a missing file is missing for (the error it chains).
_HUB_NOT_FOUND = {
    "RepositoryNotFoundError": "no such repository (a private or gated one needs HF_TOKEN with access to it)",
    "RevisionNotFoundError": "no such revision (branch, tag or commit) in the repository",
    "HFValidationError": "not a repository id (namespace/name)",
}


def _not_found(exc: FileNotFoundError) -> str:
    if "bucket does not exist" in str(exc).lower():
        return "the bucket does not exist"
    cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else ""
    return _HUB_NOT_FOUND.get(cause, "no such object")


def _clean(text: str, shown: str) -> str:
    """One line, with any URL in a backend's message shown without credentials."""
    line = " ".join(text.split())
    line = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: redact(m.group(0)), line)
    line = re.sub(r"(?i)(signature|credential|token|x-amz-[a-z-]+)=[^&\s]+", r"\1=<redacted>", line)
    return line[:300]
