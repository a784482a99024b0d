"""What the fleet tests share: a chain of renames whose first step can kill the worker running it.

``c2``'s upgrade renames ``a`` to ``b`` and then, if the ``kill-once`` marker exists beside the
chain, claims it (an atomic rename: exactly one worker wins) and SIGKILLs its own process — a
worker dying mid-migration, before anything is written, arranged through the file system so it
happens once in whichever process gets there first, local or on a Ray node.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ckptmigrate import formats

C2 = '''"""Rename a to b; die once if asked to."""
import os
import signal
from pathlib import Path

revision = "c2"
down_revision = "c1"

MARKER = Path(__file__).resolve().parent.parent / "kill-once"


def upgrade(ckpt):
    ckpt.rename("a", "b")
    try:
        os.rename(MARKER, MARKER.with_name("kill-once.taken"))
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def downgrade(ckpt):
    ckpt.rename("b", "a")
'''


def make_chain(root: Path) -> Path:
    """c1 (base) -> c2 (a -> b, may kill its worker) -> c3 (b -> c), under ``root/chain``."""
    versions = root / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "c1.py").write_text('"""Base."""\nrevision = "c1"\ndown_revision = None\n\n\n'
                                    "def upgrade(ckpt):\n    pass\n")
    (versions / "c2.py").write_text(C2)
    (versions / "c3.py").write_text('"""Rename b to c."""\nrevision = "c3"\ndown_revision = "c2"\n\n\n'
                                    "def upgrade(ckpt):\n    ckpt.rename('b', 'c')\n\n\n"
                                    "def downgrade(ckpt):\n    ckpt.rename('c', 'b')\n")
    return versions.parent


def arm_kill(chain: Path) -> Path:
    """Make the next c2 upgrade, in whatever worker runs it first, kill that worker."""
    marker = chain / "kill-once"
    marker.write_text("")
    return marker


def make_fleet(directory: Path, n: int) -> dict[Path, torch.Tensor]:
    """``n`` small checkpoints at c1 (unstamped, given ``--from c1``), each with its own ``a``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(n):
        path = directory / f"run{i:03d}.pt"
        tensors[path] = torch.arange(6.0).reshape(2, 3) + i
        torch.save({"a": tensors[path], "other": torch.full((2,), i)}, path)
    return tensors


def applications(path: Path, revision: str) -> int:
    """How often the envelope's history says ``revision`` was applied to the file."""
    envelope = formats.read_envelope(path)[1] or {}
    history = envelope.get("history") or []
    return sum(1 for e in history if e.get("action") == "upgrade" and e.get("revision") == revision)


def revision_of(path: Path) -> str | None:
    return (formats.read_envelope(path)[1] or {}).get("revision")
