"""Version checks at load time: the torch and CUDA that wrote a checkpoint against the running ones.

Versions are compared with :mod:`packaging`, never as strings. A difference becomes a warning when
it can matter, CUDA tensors on a CPU-only machine are loaded on the CPU with a note, and nothing
here refuses a load that would work.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from packaging.version import InvalidVersion, Version


def _release(text: str | None) -> Version | None:
    if not text:
        return None
    try:
        return Version(Version(text).base_version)
    except InvalidVersion:
        return None


def version_notes(envelope: dict[str, Any] | None, devices: Iterable[str], *, torch_version: str,
                  cuda_available: bool, cuda_version: str | None) -> list[str]:
    """Human-readable notes about this checkpoint on this machine (empty when nothing matters)."""
    notes: list[str] = []
    written = _release((envelope or {}).get("torch"))
    running = _release(torch_version)
    if written is not None and running is not None:
        if (written.major, written.minor) > (running.major, running.minor):
            notes.append(
                f"written by torch {written}, newer than the running {running}: "
                "dtypes or pickled classes it uses may be unknown here"
            )
        elif written.major < running.major:
            notes.append(f"written by torch {written}, a major version older than the running {running}")
    cuda_devices = sorted({d for d in devices if d.startswith("cuda")})
    if cuda_devices and not cuda_available:
        notes.append(f"tensors were saved on {', '.join(cuda_devices)}; loaded on the CPU (no CUDA here)")
    written_cuda = _release((envelope or {}).get("cuda"))
    running_cuda = _release(cuda_version)
    if cuda_devices and cuda_available and written_cuda and running_cuda and written_cuda.major != running_cuda.major:
        notes.append(f"written with CUDA {written_cuda}, running CUDA {running_cuda}")
    return notes
