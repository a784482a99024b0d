"""Coverage-guided fuzzing of ckptmigrate's readers with atheris (libFuzzer), when it is installed.

    .venv/bin/python scripts/fuzz_atheris.py CORPUS_DIR [libFuzzer options, e.g. -max_total_time=600]

The first byte of an input picks the target (0: the SafeUnpickler on the rest; 1: the rest as a
``.pt`` file; 2: as a ``.safetensors`` file) and the file goes through ``formats.read``,
``formats.read_envelope`` and ``api.inspect``. Success and ``BadInput`` (``PickleFormatError`` for the
unpickler) are fine; any other exception, a hang past ``-timeout``, a crash, or the sentinel file
that the seed corpus' booby-trapped pickles would touch, is a finding: libFuzzer stops and writes the
input to ``-artifact_prefix``. An empty CORPUS_DIR is seeded with real files (torch zip and legacy,
safetensors, stamped, booby-trapped) first. ``scripts/fuzz.sh`` runs this after the hypothesis tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch  # imported before instrumentation: only ckptmigrate is instrumented

try:
    import atheris
except ImportError:  # pragma: no cover - the script is optional
    sys.exit("atheris is not installed (pip install atheris)")

with atheris.instrument_imports():
    from ckptmigrate import api, formats
    from ckptmigrate.errors import BadInput
    from ckptmigrate.formats import pickled

WORK = Path(tempfile.mkdtemp(prefix="ckptmigrate-atheris-"))
SENTINEL = WORK / "sentinel"


class RunsAShellCommand:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {SENTINEL}",))


def seed_corpus(corpus: Path) -> None:
    """Real files, each behind the byte that picks its target."""
    from safetensors.torch import save_file

    made = WORK / "seed"
    state = {"w": torch.randn(4, 3), "b": torch.arange(4), "h": torch.ones(2, dtype=torch.float16)}
    payload = {"state_dict": state, "epoch": 3, "hook": RunsAShellCommand()}
    seeds: dict[str, tuple[int, bytes]] = {}
    for name, legacy in (("zip", False), ("legacy", True)):
        torch.save(payload, made, _use_new_zipfile_serialization=not legacy)
        seeds[name] = (1, made.read_bytes())
    torch.save(state, made)
    api.stamp(made, digest=True)
    seeds["stamped-zip"] = (1, made.read_bytes())
    save_file(state, str(made), metadata={"format": "pt"})
    seeds["safetensors"] = (2, made.read_bytes())
    api.stamp(made, digest=True)
    seeds["stamped-safetensors"] = (2, made.read_bytes())
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(seeds["zip"][1])) as zf:
        seeds["data.pkl"] = (0, zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl"))))
    corpus.mkdir(parents=True, exist_ok=True)
    for name, (target, data) in seeds.items():
        (corpus / f"seed-{name}").write_bytes(bytes([target]) + data)
    made.unlink()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target, body = data[0] % 3, data[1:]
    if target == 0:
        with contextlib.suppress(pickled.PickleFormatError):
            pickled.load(body, {})
    else:
        path = WORK / ("candidate.safetensors" if target == 2 else "candidate.pt")
        path.write_bytes(body)
        for read in (formats.read, formats.read_envelope, lambda p: api.inspect(p, keys=True)):
            try:
                result = read(path)
            except BadInput:
                continue
            if isinstance(result, formats.Container):
                result.close()
    if SENTINEL.exists():
        raise RuntimeError("a pickled command ran")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not args:
        sys.exit(__doc__)
    corpus = Path(args[0])
    if not corpus.is_dir() or not any(corpus.iterdir()):
        seed_corpus(corpus)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
