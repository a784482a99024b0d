"""What a command's PATH arguments name: files, directories searched for checkpoints, glob patterns."""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckptmigrate.errors import BadInput

#: The suffixes a directory is searched for (a file named explicitly may have any).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


def expand_paths(specs: Iterable[str | Path]) -> Iterator[Path]:
    """Files, directories (searched recursively for checkpoint suffixes; backups skipped) and glob patterns."""
    for spec in specs:
        text = str(spec)
        path = Path(text)
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and ".bak" not in p.name
            )
        elif any(ch in text for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            if not matches:
                raise BadInput(f"{text}: the pattern matches no file", path=text)
            yield from matches
        else:
            yield path
