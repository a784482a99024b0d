"""Ed25519 keys and signatures over canonical JSON: of a checkpoint's envelope (digest included)
and of a release manifest, each under its own context string so one can never pass for the other.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptmigrate.errors import BadInput
from ckptmigrate.storage.safe_open import create_new, read_small
from ckptmigrate.util.urls import ObjectURL, as_location, is_remote

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_ALG = "ed25519"
_ENVELOPE_CONTEXT = b"ckptmigrate-envelope-signature-v1\n"
_MANIFEST_CONTEXT = b"ckptmigrate-manifest-signature-v1\n"
KEY_FILE_LIMIT = 64 * 1024  # a PEM Ed25519 key is ~120 bytes


def canonical_json(data: Any) -> bytes:
    """The bytes signed and hashed: sorted keys, no spaces, UTF-8 (a lone surrogate a pickled string
    may hold encoded as such, not an error); tuples and lists alike."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


# --- keys and signatures --------------------------------------------------------------------------


def fingerprint(public_key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def keygen(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]) -> str:
    """Write a new Ed25519 key pair (PEM; the private file readable by its owner only); return the
    public key's fingerprint. Existing files are never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise BadInput(f"{private_path}: the private and public key files must differ")
    for p in (private_path, public_path):
        if p.exists():
            raise BadInput(f"{p}: already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for path, pem, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
        try:
            fd = create_new(path, mode, os.O_WRONLY)
        except FileExistsError:
            raise BadInput(f"{path}: already exists; not overwriting a key") from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    return fingerprint(key.public_key())


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"{path}: not an Ed25519 private key (make one with `ckptmigrate keygen`)")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path)
    if b"PRIVATE KEY" in data:
        raise BadInput(f"{path}: is a private key; verify with the public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadInput(f"{path}: not an Ed25519 public key (make one with `ckptmigrate keygen`)")
    return key


def _read_key_file(path: str | os.PathLike[str]) -> bytes:
    """A key file is a small regular file: a FIFO or ``/dev/zero`` is refused, not read forever.
    A public key named by URL (``s3://...``) is one object of the same bound."""
    if is_remote(path):
        from ckptmigrate.storage.ranges import read_small_object

        url = as_location(path)
        assert isinstance(url, ObjectURL)
        return read_small_object(url, KEY_FILE_LIMIT, what="key file")
    try:
        return read_small(path, KEY_FILE_LIMIT, what="key file")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such key file") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the key file ({exc.strerror})") from None


def _sign(context: bytes, document: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    value = key.sign(context + canonical_json(unsigned))
    return {"alg": SIGNATURE_ALG, "public_key_fingerprint": fingerprint(key.public_key()),
            "public_key": base64.b64encode(_raw(key.public_key())).decode(),
            "value": base64.b64encode(value).decode()}


def _raw(public_key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_envelope(envelope: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The signature record over the envelope (digest included, signature field excluded)."""
    return _sign(_ENVELOPE_CONTEXT, envelope, key)


def sign_manifest(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    return _sign(_MANIFEST_CONTEXT, manifest, key)


@dataclass
class SignatureCheck:
    """``status``: valid, invalid, absent or other-key; ``pinned`` when checked against a given key."""

    status: str
    signed_by: str | None = None
    pinned: bool = False
    problem: str | None = None


def check_signature(
    context: bytes, document: Mapping[str, Any], public_key: Ed25519PublicKey | None,
) -> SignatureCheck:
    """Check the ``signature`` of ``document``: against ``public_key`` when given, else against the
    key recorded beside it (which proves the document is intact, not who signed it)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    sig = document.get("signature")
    if sig is None:
        return SignatureCheck("absent", problem="unsigned" + ("; a signature is required" if public_key else ""))
    if not isinstance(sig, Mapping) or sig.get("alg") != SIGNATURE_ALG:
        alg = sig.get("alg") if isinstance(sig, Mapping) else None
        return SignatureCheck("invalid", problem=f"the signature record is malformed (alg {alg!r})")
    claimed = sig.get("public_key_fingerprint")
    try:
        value = base64.b64decode(str(sig.get("value")), validate=True)
        if public_key is None:
            public_key = Ed25519PublicKey.from_public_bytes(base64.b64decode(str(sig.get("public_key")),
                                                                             validate=True))
            pinned = False
        else:
            pinned = True
    except ValueError:
        return SignatureCheck("invalid", claimed, problem="the signature record is malformed")
    actual = fingerprint(public_key)
    if pinned and claimed != actual:
        return SignatureCheck("other-key", claimed, True,
                              f"signed by another key ({claimed}), not the given key ({actual})")
    if not pinned and claimed != actual:
        return SignatureCheck("invalid", claimed, problem="the recorded public key does not match its fingerprint")
    unsigned = {k: v for k, v in document.items() if k != "signature"}
    try:
        public_key.verify(value, context + canonical_json(unsigned))
    except InvalidSignature:
        return SignatureCheck("invalid", claimed, pinned,
                              "the signature does not match: the metadata or the recorded digest changed")
    return SignatureCheck("valid", claimed, pinned)


def check_envelope_signature(envelope: Mapping[str, Any], public_key: Ed25519PublicKey | None) -> SignatureCheck:
    return check_signature(_ENVELOPE_CONTEXT, envelope, public_key)


def check_manifest_signature(manifest: Mapping[str, Any], public_key: Ed25519PublicKey | None) -> SignatureCheck:
    return check_signature(_MANIFEST_CONTEXT, manifest, public_key)
