"""The envelope: what a checkpoint knows about itself, as plain JSON with its own format version.

Which torch/CUDA/Python wrote it and from which git commit, the architecture hash and schema of its
state dict, the lineage and revision of the migration chain it is at, and the history of what was
applied to it. Building one needs no tensor bytes and does not import torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import marshal
import operator
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Any

from ckptmigrate.tensors.refs import Entry, TensorRef, device_of, dtype_of, is_entry, shape_of

FORMAT_VERSION = 1

Schema = dict[str, dict[str, Any]]


def key_text(key: Any) -> str:
    """A state-dict key as text for the schema, the envelope and the terminal: a string as it is,
    any other key (``torch.save({0: t})``, a tuple) as its ``repr``; a lone surrogate escaped."""
    text = key if isinstance(key, str) else repr(key)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def schema_of(state_dict: Mapping[Any, Any]) -> Schema:
    """key → {"shape": [...], "dtype": "float32"} for every tensor, in the state dict's order (keys
    as :func:`key_text`; two keys with one text are refused: the schema could not tell them apart)."""
    schema: Schema = {}
    for key, value in state_dict.items():
        if type(value) is TensorRef and type(key) is str and key.isascii() and key not in schema:
            schema[key] = {"shape": list(value.shape), "dtype": value.dtype}  # what a file holds, at once
            continue
        if not is_entry(value):
            continue
        text = key_text(key)
        if text in schema:
            from ckptmigrate.errors import BadInput

            raise BadInput(f"the state dict has two keys that read {text!r}; rename one of them")
        schema[text] = {"shape": list(shape_of(value)), "dtype": dtype_of(value)}
    return schema


def architecture_hash(schema: Mapping[str, Mapping[str, Any]]) -> str:
    """A digest of the sorted (key, shape, dtype) triples: equal for equal definitions, anywhere."""
    h = hashlib.sha256()
    keys = sorted(schema)
    for start in range(0, len(keys), 4096):  # hashed in runs: one update call per few thousand keys
        lines = []
        for key in keys[start : start + 4096]:
            entry = schema[key]
            lines.append(f"{key}\t{','.join(map(str, entry['shape']))}\t{entry['dtype']}\n")
        h.update("".join(lines).encode())
    return "sha256:" + h.hexdigest()


def architecture_hash_of(state_dict: Mapping[Any, Any]) -> str:
    """``architecture_hash(schema_of(state_dict))`` without building the schema: a state dict of
    ASCII string keys and tensor references (as a file is read) is hashed from the references, the
    text of each shape and dtype made once; any other goes the schema's way."""
    lines = _lines_of_refs(state_dict)
    if lines is None:
        return architecture_hash(schema_of(state_dict))
    keys, tails = lines
    order = sorted(range(len(keys)), key=keys.__getitem__)  # keys are distinct: the schema's order
    h = hashlib.sha256()
    for start in range(0, len(order), 4096):  # hashed in runs: one update call per few thousand keys
        run = order[start : start + 4096]
        h.update("".join(chain.from_iterable(zip(map(keys.__getitem__, run), map(tails.__getitem__, run),
                                                 strict=True))).encode())
    return "sha256:" + h.hexdigest()


def _lines_of_refs(state_dict: Mapping[Any, Any]) -> tuple[list[str], list[str]] | None:
    """The keys and each one's line tail (``\t{shape}\t{dtype}\n``) for :func:`architecture_hash_of`,
    in C loops when every value is a TensorRef (as a file is read); None when the schema must be built."""
    keys, values = list(state_dict), list(state_dict.values())
    if set(map(type, values)) == {TensorRef} and set(map(type, keys)) <= {str} and "".join(keys).isascii():
        shapes, kinds = list(map(_SHAPE, values)), list(map(_DTYPE, values))
        # a file's references share their shape tuples and dtype strings: each distinct object is
        # checked and written once, found by its id (all are alive in ``shapes`` and ``kinds``)
        shape_ids, kind_ids = list(map(id, shapes)), list(map(id, kinds))
        distinct_shapes = dict(zip(shape_ids, shapes, strict=True))
        distinct_kinds = dict(zip(kind_ids, kinds, strict=True))
        # only exact ints are looked up: (1,) == (True,), whose text differs
        if set(map(type, distinct_shapes.values())) <= {tuple} and set(map(type, distinct_kinds.values())) <= {str} \
                and set(map(type, chain.from_iterable(distinct_shapes.values()))) <= {int}:
            shape_texts = {i: f"\t{','.join(map(str, shape))}\t" for i, shape in distinct_shapes.items()}
            kind_texts = {i: f"{kind}\n" for i, kind in distinct_kinds.items()}
            return keys, list(map(operator.add, map(shape_texts.__getitem__, shape_ids),
                                  map(kind_texts.__getitem__, kind_ids)))
    tails: dict[tuple[Any, str], str] = {}
    keys, lines = [], []
    for key, value in state_dict.items():
        if type(value) is not TensorRef:
            if is_entry(value):
                return None
            continue
        shape, dtype = value.shape, value.dtype
        if type(key) is not str or not key.isascii() or type(dtype) is not str or type(shape) is not tuple:
            return None
        for d in shape:  # only exact ints are looked up: (1,) == (True,), whose text differs
            if type(d) is not int:
                return None
        tail = tails.get((shape, dtype))
        if tail is None:
            tail = tails[(shape, dtype)] = f"\t{','.join(map(str, shape))}\t{dtype}\n"
        keys.append(key)
        lines.append(tail)
    return keys, lines


def devices_of(entries: Iterable[Entry]) -> list[str]:
    return sorted({device_of(e) for e in entries})


def _state_dict_devices(state_dict: Mapping[Any, Any]) -> list[str]:
    """:func:`devices_of` the state dict's tensors; a file's references in one C loop."""
    values = state_dict.values()
    if set(map(type, values)) == {TensorRef}:  # a file as read: C loops only
        return sorted(set(map(_LOCATION, values)))
    found = {v.storage.location for v in values if type(v) is TensorRef}
    found.update(device_of(v) for v in values if type(v) is not TensorRef and is_entry(v))
    return sorted(found)


_LOCATION = attrgetter("storage.location")
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")


def _torch_versions() -> dict[str, str | None]:
    """torch, CUDA and cuDNN versions, without importing torch when it is not imported yet."""
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None:
        cudnn = None
        try:
            if torch_mod.backends.cudnn.is_available():
                cudnn = str(torch_mod.backends.cudnn.version())
        except Exception:  # noqa: BLE001 - a broken CUDA install must not stop a stamp
            cudnn = None
        return {"torch": torch_mod.__version__, "cuda": torch_mod.version.cuda, "cudnn": cudnn}
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {"torch": None, "cuda": None, "cudnn": None}
    # torch/version.py is written when torch is built: reading it costs well under a millisecond,
    # importing torch over a second, importlib.metadata ~40 ms (it scans every installed distribution)
    version_py = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_py.read_text()
    except OSError:
        text = ""
    version = re.search(r"^__version__(?:: \S+)? = '([^']+)'", text, re.M)
    cuda = re.search(r"^cuda(?:: \S+)? = '([^']+)'", text, re.M)
    return {"torch": version.group(1) if version else None, "cuda": cuda.group(1) if cuda else None,
            "cudnn": None}


_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def _without_credentials(url: str | None) -> str | None:
    """The remote URL minus any ``user:token@`` part: CI checkouts put access tokens there, and
    the envelope travels with the checkpoint."""
    return None if url is None else _USERINFO.sub(r"\g<scheme>", url)


def git_info(repo: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """Commit, branch, dirty flag and remote of the repository at (or above) ``repo``; None outside one."""
    start = Path(os.fspath(repo or os.getcwd())).absolute()
    if "GIT_DIR" not in os.environ and not any((p / ".git").exists() for p in (start, *start.parents)):
        return None  # outside any repository: not worth importing GitPython (a third of a second) to learn it
    try:
        import git
    except Exception:  # noqa: BLE001 - GitPython raises ImportError when the git binary is missing
        return None
    try:
        r = git.Repo(start, search_parent_directories=True)
    except (git.exc.InvalidGitRepositoryError, git.exc.NoSuchPathError, git.exc.GitError):
        return None
    with r:
        try:
            r.git.rev_parse("--git-dir")  # git itself may refuse the repository (safe.directory)
            return _describe(r)
        except Exception as exc:  # noqa: BLE001 - a refusing or dying git must never fail a write
            return {"commit": None, "branch": None, "dirty": None, "remote": None, "root": r.working_tree_dir,
                    "note": f"git could not describe the repository ({_first_line(exc)}); no commit recorded"}


def _first_line(exc: Exception) -> str:
    """What git said (``fatal: detected dubious ownership ...``), or the error's name."""
    text = str(getattr(exc, "stderr", "") or exc).replace("stderr:", "")
    for line in text.splitlines():
        line = line.strip().strip("'").strip()
        if line:
            return line[:200]
    return type(exc).__name__


def _describe(r: Any) -> dict[str, Any]:
    import git

    try:
        commit: str | None = r.head.commit.hexsha
    except ValueError:
        commit = None
    try:
        branch: str | None = r.active_branch.name
    except TypeError:
        branch = None
    try:
        dirty = r.is_dirty(untracked_files=False)
    except git.exc.GitError:
        dirty = None
    remote = None
    if r.remotes:
        names = [rm.name for rm in r.remotes]
        chosen = r.remote("origin") if "origin" in names else r.remotes[0]
        try:
            remote = _without_credentials(next(iter(chosen.urls), None))
        except git.exc.GitError:
            remote = None
    return {"commit": commit, "branch": branch, "dirty": dirty, "remote": remote,
            "root": r.working_tree_dir}


def platform_name() -> str:
    """``platform.platform()`` without its cost on Linux: it reads the interpreter's binary to find
    the C library's version (~6 ms a write), which glibc reports directly."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") if sys.platform == "linux" else None
    except (AttributeError, ValueError, OSError):  # not glibc (musl), or no confstr
        libc = None
    if not libc or not libc.startswith("glibc "):
        return platform.platform()
    uname = os.uname()
    return f"{uname.sysname}-{uname.release}-{uname.machine}-with-glibc{libc.removeprefix('glibc ')}"


def ckptmigrate_version() -> str:
    from ckptmigrate.version import __version__

    return __version__


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class Envelope:
    """The metadata record stored next to the tensors (see docs/format.md)."""

    schema: Schema
    arch_hash: str
    layout: str
    devices: list[str]
    torch: str | None = None
    cuda: str | None = None
    cudnn: str | None = None
    python: str = field(default_factory=platform.python_version)
    platform: str = field(default_factory=platform_name)
    git: dict[str, Any] | None = None
    lineage: str | None = None
    revision: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=now_utc)
    ckptmigrate_version: str = field(default_factory=ckptmigrate_version)
    format_version: int = FORMAT_VERSION
    #: Content digest and Ed25519 signature (ckptmigrate.release.integrity); absent in older envelopes.
    digest: dict[str, Any] | None = None
    signature: dict[str, Any] | None = None
    #: Every state dict a migration follows, the main one first (absent: only the main one).
    state_dicts: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls, state_dict: Mapping[str, Any], *, layout: str, repo: str | os.PathLike[str] | None = None,
        tags: Mapping[str, str] | None = None, previous: Envelope | None = None, describe_code: bool = True,
    ) -> Envelope:
        """A fresh envelope for ``state_dict``; lineage, revision, history and tags carry over.

        The digest and signature never do: they vouch for the bytes of the previous write.
        ``describe_code=False`` (an upgrade in memory, nothing written) keeps the previous git
        description instead of asking git about the working directory.
        """
        schema = schema_of(state_dict)
        versions = _torch_versions()
        env = cls(
            schema=schema, arch_hash=architecture_hash_of(state_dict), layout=layout,
            devices=_state_dict_devices(state_dict),
            git=git_info(repo) if describe_code else (previous.git if previous is not None else None),
            torch=versions["torch"], cuda=versions["cuda"], cudnn=versions["cudnn"],
        )
        if previous is not None:
            env.lineage, env.revision = previous.lineage, previous.revision
            env.history = list(previous.history)
            env.tags = dict(previous.tags)
        env.tags.update(tags or {})
        return env

    def to_dict(self, *, copy: bool = True, schema: bool = True) -> dict[str, Any]:
        """A deep copy as plain data. The schema holds a dict per tensor: ``marshal`` copies it in C
        (``asdict`` walks it in Python, ~50 µs per hundred keys); anything marshal does not take
        (a value of another type) goes the ``asdict`` way. A file with one state dict keeps the
        envelope it always had (no ``state_dicts``).

        ``copy=False`` gives the fields as they are, for a caller that only encodes them (a copy of
        the schema of 100,000 tensors is ~40 MB); ``schema=False`` leaves the schema out (a summary)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if schema or f.name != "schema"}
        if copy:
            try:
                out = marshal.loads(marshal.dumps(out))
            except ValueError:
                out = {k: v for k, v in asdict(self).items() if schema or k != "schema"}
        if not out["state_dicts"]:
            del out["state_dicts"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "checkpoint") -> Envelope:
        """Parse a stored envelope; newer format versions are refused rather than misread, and a field
        of the wrong type (:mod:`~ckptmigrate.checkpoint.envelope_schema`) is one line naming it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{origin}: the envelope is not a JSON object")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"{origin}: the envelope's format_version is not an integer ({version!r})")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{origin}: envelope format_version {version!r} is newer than this ckptmigrate "
                f"understands ({FORMAT_VERSION}); upgrade ckptmigrate"
            )
        from ckptmigrate.checkpoint.envelope_schema import validate

        try:
            validate(data)
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def superseded(previous: Any) -> dict[str, Any] | None:
    """What a rewrite must not carry over as valid: the old overall digest and signature, for the
    history entry of the step that invalidated them; None when there were none."""
    if previous is None or (previous.digest is None and previous.signature is None):
        return None
    digest = previous.digest or {}
    return {"digest": digest.get("overall"), "signature": previous.signature,
            "note": "made over the bytes before this step; stamp again to sign the result"}
