"""Stamping: write the envelope into a checkpoint without touching a tensor, and, for a release,
record the commit, the content digest and an Ed25519 signature."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptmigrate import formats
from ckptmigrate.checkpoint.envelope import Envelope, git_info, now_utc, superseded
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput
from ckptmigrate.storage.locking import file_lock
from ckptmigrate.util.urls import ObjectURL, as_location


def _listed(names: tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def require_clean(repo: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The git state of ``repo`` (default: the working directory's), which must be a committed,
    clean working tree: a release names the exact code that goes with its checkpoints."""
    where = os.fspath(repo) if repo is not None else os.getcwd()
    info = git_info(repo)
    if info is None:
        error = BadInput(f"{where}: not in a git repository; a release records the commit (name the repository, "
                         "or allow_dirty to stamp without one)")
        error.cli_hint = "pass --repo DIR, or --allow-dirty"
        raise error
    if info.get("note"):
        error = BadInput(f"{info.get('root') or where}: {info['note']}; a release records the commit (mark the "
                         "repository safe with `git config --global --add safe.directory DIR`, or allow_dirty "
                         "to stamp without one)")
        error.cli_hint = "pass --allow-dirty to stamp without a commit"
        raise error
    if info.get("commit") is None:
        raise BadInput(f"{info.get('root') or where}: the repository has no commit yet")
    if info.get("dirty") is not False:
        error = BadInput(f"{info.get('root') or where}: the working tree has uncommitted changes; commit them")
        error.cli_hint = "pass --allow-dirty to stamp anyway"
        raise error
    return info


def _require_text(values: Mapping[str, list[str | None]]) -> None:
    """What goes into the envelope must be text every reader can print: an argument the terminal
    passed as undecodable bytes (a lone surrogate once decoded) is refused here, not at read-back."""
    for option, items in values.items():
        for value in items:
            if value is None:
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                shown = value.encode("utf-8", "backslashreplace").decode()
                raise BadInput(f"{option} {shown!r}: not UTF-8 text") from None


def stamp(
    path: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None,
    tags: Mapping[str, str] | None = None, repo: str | os.PathLike[str] | None = None,
    key: str | None = None, lineage: str | None = None, revision: str | None = None,
    release: str | None = None, sign: Any = None, digest: bool = False, allow_dirty: bool = False,
    allow_unsafe_pickle: bool = False,
) -> Path:
    """Write the envelope into ``path`` (or ``output``) without changing any tensor.

    A legacy torch file is rewritten as a torch zip file; a zip or safetensors file keeps its
    tensor records byte for byte. An existing envelope's lineage, revision, history and tags carry
    over; ``lineage``/``revision`` set them (``stamp --revision`` in the CLI).

    ``release`` records a release (tag ``release``, a ``release`` history entry with the commit)
    and refuses a dirty working tree unless ``allow_dirty``; ``sign`` (an Ed25519 private key or
    its PEM file) signs the envelope. Either, or ``digest``, records the content digest — the only
    case that reads tensor bytes. An earlier digest and signature go into the new history entry.

    A release or a signature vouches for a file, so neither is given to a file whose pickle names
    globals outside torch's ``weights_only`` allow-list (it runs code on ``torch.load(weights_only=False)``)
    unless ``allow_unsafe_pickle``.
    """
    from ckptmigrate.release import integrity, signing

    _require_text({"--tag": [t for kv in (tags or {}).items() for t in kv], "--lineage": [lineage],
                   "--revision": [revision], "--release": [release]})
    if release is not None and not allow_dirty:
        require_clean(repo)
    private_key = signing.load_private_key(sign) if isinstance(sign, (str, os.PathLike)) else sign
    location = as_location(path)
    lock: contextlib.AbstractContextManager[Any]
    source: Path | ObjectURL
    if isinstance(location, ObjectURL) and output is None:  # an object stamped where it is: no lock file
        path, lock, source = location, contextlib.nullcontext(), location
    else:
        path = formats.checkpoint_path(path)
        # a multi-file checkpoint a killed run left mid-switch is finished or undone under its own lock
        lock, source = file_lock(output if output is not None else path), (
            path if output is not None else formats.recovered(path))
    with lock, Checkpoint.open(source, key=key) as ckpt:
        ckpt.schema()  # two keys with one text (``{0: a, "0": b}``) are refused here, naming the file
        safety = ckpt.pickle_safety()
        if (release is not None or private_key is not None) and not safety.weights_only and not allow_unsafe_pickle:
            raise BadInput(
                f"{ckpt.path}: its pickle names {_listed(safety.unsafe)}, outside torch's weights_only allow-list "
                "(torch.load(weights_only=False) would run them); refusing to "
                f"{'sign' if private_key is not None else 'release'} it — pass --allow-unsafe-pickle to vouch for it"
            )
        all_tags = {**(tags or {}), **({"release": release} if release is not None else {})}
        env = Envelope.build(
            ckpt.state_dict.entries, layout=ckpt.output_layout().name, repo=repo,
            tags=all_tags, previous=ckpt.envelope,
        )
        env.state_dicts = ckpt.recorded_locations()
        if lineage is not None:
            env.lineage = lineage
        if revision is not None:
            env.revision = revision
        entry: dict[str, Any] = {
            "action": "stamp" if release is None else "release", "at": now_utc(), "revision": env.revision,
            "tags": dict(tags or {}), "from_container": ckpt.format,
        }
        if release is not None:
            entry.update(release=release, commit=(env.git or {}).get("commit"))
        old_provenance = superseded(ckpt.envelope)
        if old_provenance is not None:
            entry["superseded"] = old_provenance
        env.history.append(entry)
        if digest or release is not None or private_key is not None:
            env.digest = integrity.compute(ckpt)
            entry["digest"] = env.digest["overall"]
        if private_key is not None:
            entry["signed_by"] = signing.fingerprint(private_key.public_key())
            env.signature = signing.sign_envelope(env.to_dict(), private_key)
        if isinstance(path, ObjectURL) and output is None:
            from ckptmigrate.chain.objects import write_object

            write_object(ckpt, path, env, backup=False)  # only the tail is sent when only metadata changed
            return path
        return ckpt.write(output if output is not None else path, env)
