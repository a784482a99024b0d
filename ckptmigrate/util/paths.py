"""What a command's PATH arguments name: files, directories searched for checkpoints, glob patterns;
and the same for URLs (``s3://bucket/runs/**/*.pt``, a prefix ending in ``/``) through fsspec."""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckptmigrate.errors import BadInput
from ckptmigrate.util.urls import ObjectURL, as_location, filesystem, names_many, translated

#: The suffixes a directory is searched for (a file named explicitly may have any).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


def expand_paths(specs: Iterable[str | Path]) -> Iterator[Path]:
    """Files, directories (searched recursively for checkpoint suffixes; backups skipped) and glob patterns."""
    for spec in specs:
        location = as_location(spec)
        if isinstance(location, ObjectURL):
            yield from _objects(location, str(spec)) if names_many(str(spec)) else [location]
            continue
        text = str(location)
        path = Path(text)
        if path.is_dir():
            yield from _checkpoints_under(path)
        elif any(ch in text for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            if not matches:
                raise BadInput(f"{text}: the pattern matches no file", path=text)
            yield from matches
        else:
            yield path


def multi_file_checkpoint(directory: Path) -> bool:
    """A directory that is one checkpoint of several files: a DCP ``.metadata``, or a sharded model's
    ``*.index.json`` (formats/multifile reads them and says what is wrong with one)."""
    try:
        names = {p.name for p in directory.iterdir()}
    except OSError:
        return False
    return ".metadata" in names or any(n.endswith(".index.json") and not n.startswith(".") for n in names)


def _checkpoints_under(directory: Path) -> Iterator[Path]:
    """Checkpoints in a directory tree; a sharded model or DCP directory is one checkpoint (the
    directory), never its shards one by one."""
    if multi_file_checkpoint(directory):
        yield directory
        return
    for p in sorted(directory.iterdir()):
        if p.is_dir():
            yield from _checkpoints_under(p)
        elif p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and ".bak" not in p.name:
            yield p


def _objects(url: ObjectURL, spec: str) -> Iterator[Path]:
    """The objects a pattern matches, or the checkpoints under a prefix (``spec`` ends in ``/``)."""
    prefix = spec.endswith("/")
    fs, path = filesystem(url)
    with translated(url, "list"):
        if prefix:
            every = fs.find(path)
            multi = _multi_file_directories(every)
            found = [p for p in every if p.endswith(CHECKPOINT_SUFFIXES) and ".bak" not in p.rsplit("/", 1)[-1]
                     and p.rsplit("/", 1)[0] not in multi] + sorted(multi)
        else:
            found = [p for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"]
    if not found:
        what = "/: the prefix holds no checkpoint" if prefix else ": the pattern matches no object"
        raise BadInput(f"{url}{what}", path=str(url))
    for p in sorted(found):
        yield as_location(f"{url.scheme}://{p}")


def _multi_file_directories(names: list[str]) -> set[str]:
    """The prefixes among ``names`` that hold a multi-file checkpoint (a DCP ``.metadata``, a sharded
    model's index): each is one checkpoint, never its shards one by one."""
    out = set()
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base == ".metadata" or (base.endswith(".index.json") and not base.startswith(".")):
            out.add(name.rsplit("/", 1)[0])
    return out
