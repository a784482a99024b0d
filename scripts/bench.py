"""Benchmark ckptmigrate on a ~1 GiB GPT-2-medium-like checkpoint: upgrade, inspect and load.

Run it from the repository root with the project's virtualenv::

    .venv/bin/python scripts/bench.py                  # ~1 GiB checkpoint, 3 repeats, medians
    .venv/bin/python scripts/bench.py --quick          # 64 MiB, 1 repeat: a smoke run
    .venv/bin/python scripts/bench.py --workdir /tmp/bench --size-mb 2048 --repeat 5 --json bench.json
    .venv/bin/python scripts/bench.py --sweep --json docs/bench-sweep.json   # count and size sweep, PNG plot

Options: ``--workdir DIR`` (default: a fresh temporary directory under /tmp, removed at the end
unless ``--keep``), ``--size-mb N`` (default 1024), ``--repeat N`` (default 3), ``--json PATH``
(write every figure, raw runs included), ``--quick`` (size 64 MiB and repeat 1 unless given).
The work directory needs about six times ``--size-mb`` of free disk.

What one run does:

1. Builds a GPT-2-medium-like state dict (d=1024, fused ``attn.c_attn`` qkv ``[3072, 1024]``,
   ``attn.c_proj`` ``[1024, 1024]``, ``mlp.c_fc`` ``[4096, 1024]``, ``mlp.c_proj`` ``[1024, 4096]``,
   layer norms, ``wte``, ``wpe``), every key under ``module.``; the layer count is scaled to
   ``--size-mb`` (24 float32 layers would be 1.3 GiB, so 1024 MiB gives 17). Tensors are generated
   one chunk at a time and streamed into a safetensors file (the twin); ``torch.save`` then writes
   the torch zip file from a memory map of it, so the builder never holds the checkpoint in private
   memory.
2. Writes three migration chains (script directories) in the work directory: (a) ``unwrap("module.")``
   then ``rename_regex`` of ``h.N.`` to ``layers.N.``; (b) the same, then ``split`` of the fused
   ``c_attn`` weight and bias into q/k/v along dim 0 and a ``reshape`` of ``mlp.c_fc.weight`` into a
   1x1-conv weight ``[4096, 1024, 1]``; (c) the same as (b), then a ``transpose(…, 0, 1)`` of every
   ``attn.c_proj.weight`` (``[1024, 1024]``, same shape) and ``mlp.c_proj.weight`` (``[1024, 4096]``
   → ``[4096, 1024]``), the Conv1D ↔ nn.Linear layout swap. The base revision has a schema
   snapshot, so unstamped files are recognised without ``--from``.
   Chains (a) and (b) are metadata-only: a split along the leading dimension of a stored contiguous
   tensor is a view of the stored bytes (as ``torch.split`` gives) and a reshape of one is free, so
   every output tensor is still a record of the source; in place (``--no-backup``) a torch zip file
   gets its new metadata appended, ``-o`` and safetensors copy the records by the kernel, no tensor
   is materialised and torch need not be imported. Chain (c) is the streaming path: each transposed
   tensor is materialised from the memory map, one at a time, and written to a new file, so private
   memory should stay near the size of the largest changed tensor (``mlp.c_proj.weight``, 16 MiB).
3. Measures, round-robin over the cases, ``--repeat`` times each: ``cp`` (the floor), a naive
   ``torch.load`` → edit keys (and split, reshape, ``transpose(0, 1).contiguous()``) → ``torch.save``
   script, ``ckptmigrate upgrade`` in place (``--no-backup``, on a fresh copy each run, the copy
   untimed) and out of place (``-o``) for the three chains and both containers,
   ``ckptmigrate inspect``, and ``ckptmigrate.load_state_dict`` with automatic upgrade against
   ``torch.load(mmap=True)`` + ``model.load_state_dict`` of the already-upgraded file.

How it measures: every case is a child process. CLI and script cases are timed by wall clock
around the whole process (interpreter start-up included: what a user waits for); the load cases
print the time of the load call alone, measured inside the child. A sampler thread in this
process reads the child's ``/proc/<pid>/status`` every 5 ms from just after its ``exec``: peak RSS
is the last ``VmHWM`` seen (a high-water mark, so only growth in the last 5 ms of life escapes it;
``ru_maxrss`` from ``wait4`` is not used because Linux folds the pre-``exec`` image of the forking
benchmark into it), peak anonymous (private) memory the largest ``RssAnon`` seen (a spike shorter
than 5 ms can be missed). Times are medians over the repeats, memory the maximum over them.
Children run with bytecode caching on and ``PYTHONPYCACHEPREFIX`` in the work directory (so a
``PYTHONDONTWRITEBYTECODE`` environment does not make every start-up recompile ckptmigrate, and
the repository gets no ``__pycache__``); a warm-up pass fills that cache before anything is timed.
The children import whatever ``ckptmigrate`` the environment gives them (``PYTHONPATH`` can point
them at a frozen copy); its location, git commit and a digest of its sources are printed, and a
run during which those sources changed is flagged. The page cache cannot be dropped without
root, so every figure is warm-cache: each case's input files are read (untimed) just before each
run, because this kind of VM's host reclaims cached pages at will and a cold 1 GiB read takes
seconds; ``sync`` runs (untimed) before each run so no write-back left by an earlier run is
pending. Each output is checked once (keys, shapes, a few tensors against the source) and a
failing case is reported, not hidden.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import mmap
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

MiB = 1 << 20
D = 1024
N_CTX = 1024
GPT2_VOCAB = 50257
FLOAT32 = 4
CHUNK_ELEMS = 4 << 20  # the builder generates at most 16 MiB of float32 at a time
SAMPLE_INTERVAL = 0.005

ZIP = "torch-zip"
ST = "safetensors"

# -- the checkpoint ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Layer count and vocabulary of the synthetic GPT-2-medium-like model."""

    layers: int
    vocab: int
    d: int = D
    n_ctx: int = N_CTX

    @classmethod
    def for_size(cls, size_mb: int) -> Geometry:
        budget = size_mb * MiB // FLOAT32
        per_layer = 12 * D * D + 13 * D
        fixed = N_CTX * D + 2 * D
        layers = round((budget - fixed - GPT2_VOCAB * D) / per_layer)
        if layers >= 1:
            return cls(layers, GPT2_VOCAB)
        # Too small for GPT-2's embedding: one layer, the vocabulary takes what is left.
        return cls(1, max(256, (budget - fixed - per_layer) // D))

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Keys (without ``module.``) and shapes, in a GPT-2 state dict's order."""
        d = self.d
        out: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (self.vocab, d)), ("wpe.weight", (self.n_ctx, d))]
        for i in range(self.layers):
            p = f"h.{i}."
            out += [
                (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
                (p + "attn.c_attn.weight", (3 * d, d)), (p + "attn.c_attn.bias", (3 * d,)),
                (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
                (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
                (p + "mlp.c_fc.weight", (4 * d, d)), (p + "mlp.c_fc.bias", (4 * d,)),
                (p + "mlp.c_proj.weight", (d, 4 * d)), (p + "mlp.c_proj.bias", (d,)),
            ]
        out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
        return out

    def source_schema(self) -> dict[str, tuple[int, ...]]:
        return {"module." + k: s for k, s in self.tensors()}

    def nbytes(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors()) * FLOAT32

    def largest_changed_tensor(self) -> int:
        """Bytes of the largest tensor chain (b) or (c) splits, reshapes or transposes (4d × d: ``mlp.c_fc.weight``,
        and ``mlp.c_proj.weight``, the largest one (c) materialises)."""
        changed = ("attn.c_attn.weight", "mlp.c_fc.weight", "attn.c_proj.weight", "mlp.c_proj.weight")
        return max(math.prod(shape) for key, shape in self.tensors() if key.endswith(changed)) * FLOAT32


def renamed(key: str) -> str:
    """A source key after chain (a): no ``module.``, ``h.N.`` → ``layers.N.``."""
    key = key.removeprefix("module.")
    return re.sub(r"^h\.(\d+)\.", r"layers.\1.", key)


def expected_schema(geom: Geometry, chain: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes the head of ``chain`` ("a", "b" or "c") should produce, in order."""
    out: dict[str, tuple[int, ...]] = {}
    split = chain in ("b", "c")
    for key, shape in geom.source_schema().items():
        new = renamed(key)
        qkv = re.fullmatch(r"(layers\.\d+\.attn\.)c_attn\.(weight|bias)", new)
        if split and qkv:
            for name in ("q_proj", "k_proj", "v_proj"):
                out[f"{qkv[1]}{name}.{qkv[2]}"] = (shape[0] // 3, *shape[1:])
        elif split and re.fullmatch(r"layers\.\d+\.mlp\.c_fc\.weight", new):
            out[new] = (*shape, 1)
        elif chain == "c" and re.fullmatch(r"layers\.\d+\.(attn|mlp)\.c_proj\.weight", new):
            out[new] = (shape[1], shape[0])
        else:
            out[new] = shape
    return out


def write_safetensors(path: Path, geom: Geometry, seed: int = 0) -> None:
    """Stream the checkpoint into a safetensors file, one chunk of one tensor at a time."""
    specs = list(geom.source_schema().items())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in specs:
        size = math.prod(shape) * FLOAT32
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in specs:
            rows = max(1, CHUNK_ELEMS // max(1, math.prod(shape[1:])))
            for start in range(0, shape[0], rows):
                block = torch.randn((min(rows, shape[0] - start), *shape[1:]), generator=gen) * 0.02
                if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    block += 1.0
                fh.write(block.numpy().tobytes())


def _save_mapped(buf: mmap.mmap, header: dict[str, Any], data_start: int, dest: Path) -> None:
    state: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        flat = torch.frombuffer(buf, dtype=torch.float32, count=(end - begin) // FLOAT32, offset=data_start + begin)
        state[key] = flat.view(info["shape"])
    torch.save(state, dest)


def torch_save_from(st_path: Path, dest: Path) -> None:
    """``torch.save`` the safetensors file's tensors, each its own storage, read through a memory map."""
    with open(st_path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop("__metadata__", None)
    _save_mapped(buf, header, 8 + n, dest)
    gc.collect()
    buf.close()


def check_twins(pt_path: Path, st_path: Path, geom: Geometry) -> None:
    from safetensors import safe_open

    sd = torch.load(pt_path, mmap=True, map_location="cpu", weights_only=True)
    if list(sd) != list(geom.source_schema()):
        raise SystemExit(f"{pt_path}: unexpected keys")
    with safe_open(str(st_path), framework="pt") as f:
        if set(f.keys()) != set(sd):
            raise SystemExit(f"{st_path}: keys differ from {pt_path}")
        for key in ("module.wte.weight", "module.h.0.attn.c_attn.weight", "module.ln_f.weight"):
            if not torch.equal(f.get_tensor(key), sd[key]):
                raise SystemExit(f"{st_path}: {key} differs from {pt_path}")


# -- migration chains and helper scripts ------------------------------------------------------

_BASE = '''\
"""GPT-2-medium-like checkpoint as trained under nn.DataParallel.

Revision ID: b001
Revises: <base>
"""

revision = "b001"
down_revision = None
lineage = "bench"


def upgrade(ckpt):
    """The base describes checkpoints as they were; nothing to change."""
'''

_UNWRAP = '''\
"""Unwrap nn.DataParallel: drop the module. prefix.

Revision ID: b002
Revises: b001
"""

revision = "b002"
down_revision = "b001"


def upgrade(ckpt):
    ckpt.unwrap("module.")
'''

_RENAME = '''\
"""Rename the h.N. blocks to layers.N.

Revision ID: b003
Revises: b002
"""

revision = "b003"
down_revision = "b002"


def upgrade(ckpt):
    ckpt.rename_regex(r"h\\.(\\d+)\\.(.+)", r"layers.\\1.\\2")
'''

_SPLIT = '''\
"""Split the fused qkv projection into q, k and v; the MLP input weight becomes a 1x1 conv.

Revision ID: b004
Revises: b003
"""

revision = "b004"
down_revision = "b003"


def upgrade(ckpt):
    for part in ("weight", "bias"):
        ckpt.split(
            rf"layers\\.(\\d+)\\.attn\\.c_attn\\.{part}",
            [rf"layers.\\1.attn.{name}.{part}" for name in ("q_proj", "k_proj", "v_proj")],
            dim=0,
        )
    ckpt.reshape(r"layers\\.\\d+\\.mlp\\.c_fc\\.weight", [-1, 1024, 1])
'''

_TRANSPOSE = '''\
"""GPT-2 Conv1D to nn.Linear layout: transpose the output projections' weights.

Revision ID: b005
Revises: b004
"""

revision = "b005"
down_revision = "b004"


def upgrade(ckpt):
    ckpt.transpose(r"layers\\.\\d+\\.attn\\.c_proj\\.weight", 0, 1)
    ckpt.transpose(r"layers\\.\\d+\\.mlp\\.c_proj\\.weight", 0, 1)
'''

NAIVE_SCRIPT = '''\
"""Naive migration: torch.load everything, edit the keys in Python, torch.save."""
import json
import re
import sys
import time

import torch

src, dst, chain = sys.argv[1:4]
t0 = time.perf_counter()
state = torch.load(src, map_location="cpu")
out = {}
for key, value in state.items():
    key = re.sub(r"^h\\.(\\d+)\\.", r"layers.\\1.", key.removeprefix("module."))
    if chain in ("b", "c"):
        qkv = re.fullmatch(r"(layers\\.\\d+\\.attn\\.)c_attn\\.(weight|bias)", key)
        if qkv:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{qkv[1]}{name}.{qkv[2]}"] = part.clone()
            continue
        if re.fullmatch(r"layers\\.\\d+\\.mlp\\.c_fc\\.weight", key):
            value = value.reshape(-1, value.shape[1], 1)
    if chain == "c" and re.fullmatch(r"layers\\.\\d+\\.(attn|mlp)\\.c_proj\\.weight", key):
        value = value.transpose(0, 1).contiguous()
    out[key] = value
torch.save(out, dst)
print(json.dumps({"seconds": time.perf_counter() - t0}))
'''

LOAD_SCRIPT = '''\
"""Load a checkpoint into a model built to match; time the load call alone and print JSON."""
import gc
import hashlib
import json
import sys
import time

import torch
from torch import nn

import ckptmigrate
import ckptmigrate.api
import ckptmigrate.integrations.loading

mode, path, schema_path, migrations = sys.argv[1:5]


def status_mib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


model = nn.Module()
with open(schema_path) as fh:
    schema = json.load(fh)
for key, shape in schema.items():
    *path_parts, name = key.split(".")
    module = model
    for part in path_parts:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    module.register_parameter(name, nn.Parameter(torch.zeros(shape), requires_grad=False))
gc.collect()
anon_before = status_mib("RssAnon")
t0 = time.perf_counter()
if mode == "plain":
    result = model.load_state_dict(torch.load(path, mmap=True, map_location="cpu"))
    ok = not (result.missing_keys or result.unexpected_keys)
    applied = []
else:
    report = ckptmigrate.load_state_dict(model, path, migrations=migrations)
    ok = report.ok
    applied = list(report.applied)
seconds = time.perf_counter() - t0
probe = {k: float(model.get_parameter(k).double().sum()) for k in sys.argv[5:]}
print(json.dumps({"seconds": seconds, "ok": ok, "applied": applied, "probe": probe,
                  "anon_before_load_mib": anon_before}))
'''


def write_chain(root: Path, geom: Geometry, chain: str) -> Path:
    """Write chain ``chain`` ("a", "b" or "c") as a script directory at ``root``."""
    versions = root / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    scripts = {"b001_base.py": _BASE, "b002_unwrap.py": _UNWRAP, "b003_rename_layers.py": _RENAME}
    if chain in ("b", "c"):
        scripts["b004_split_qkv.py"] = _SPLIT
    if chain == "c":
        scripts["b005_transpose_c_proj.py"] = _TRANSPOSE
    for name, text in scripts.items():
        (versions / name).write_text(text)
    schema = {k: {"shape": list(s), "dtype": "float32"} for k, s in geom.source_schema().items()}
    (versions / "b001_base.schema.json").write_text(json.dumps(schema, indent=1))
    return root


# -- measuring a child process ----------------------------------------------------------------


class Sampler(threading.Thread):
    """Reads ``/proc/<pid>/status`` every few milliseconds; keeps the largest VmHWM and RssAnon."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        super().__init__(daemon=True)
        self.path = f"/proc/{pid}/status"
        self.interval = interval
        self.done = threading.Event()
        self.hwm_kib = 0
        self.anon_kib = 0
        self.samples = 0

    def run(self) -> None:
        while True:
            try:
                with open(self.path, "rb") as fh:
                    text = fh.read()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith(b"VmHWM:"):
                    self.hwm_kib = max(self.hwm_kib, int(line.split()[1]))
                elif line.startswith(b"RssAnon:"):
                    self.anon_kib = max(self.anon_kib, int(line.split()[1]))
                    self.samples += 1
            if self.done.wait(self.interval):
                return


@dataclass
class Sample:
    """One run of one case."""

    seconds: float
    wall_seconds: float
    peak_rss_mib: float
    peak_anon_mib: float
    anon_samples: int
    returncode: int
    stdout: str = ""
    stderr: str = ""
    inner: dict[str, Any] | None = None
    #: user + system CPU seconds of the process: what a busy machine changes least
    cpu_seconds: float = 0.0


CHILD_ENV: dict[str, str] = dict(os.environ)


def child_env(work: Path) -> None:
    """Bytecode caching on for the children, with the cache in the work directory."""
    CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
    CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")


def run_child(cmd: Sequence[str], cwd: Path) -> Sample:
    """Run one command; wall time, peak RSS (VmHWM) and peak anonymous memory (RssAnon), sampled."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=CHILD_ENV)
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.done.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return Sample(wall, wall, sampler.hwm_kib / 1024, sampler.anon_kib / 1024, sampler.samples, proc.returncode,
                  stdout, stderr, cpu_seconds=usage.ru_utime + usage.ru_stime)


def run_sequence(cmds: Sequence[Sequence[str]], cwd: Path) -> Sample:
    """Run commands one after the other (``cp`` then ``sync FILE``): times add, memory is the max."""
    parts = [run_child(cmd, cwd) for cmd in cmds]
    total = sum(p.wall_seconds for p in parts)
    failed = next((p for p in parts if p.returncode != 0), parts[-1])
    return Sample(total, total, max(p.peak_rss_mib for p in parts), max(p.peak_anon_mib for p in parts),
                  sum(p.anon_samples for p in parts), failed.returncode,
                  "".join(p.stdout for p in parts), "".join(p.stderr for p in parts),
                  cpu_seconds=sum(p.cpu_seconds for p in parts))


def ckptmigrate_source(cwd: Path) -> dict[str, Any]:
    """Where the children import ckptmigrate from, its git commit and a digest of its sources."""
    probe = "import os, ckptmigrate; print(os.path.dirname(os.path.abspath(ckptmigrate.__file__)))"
    pkg = Path(subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=CHILD_ENV, capture_output=True,
                              text=True, check=True).stdout.strip())
    digest = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(path.relative_to(pkg).as_posix().encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--", ".") if commit else None
    return {"path": str(pkg), "sources_sha256": digest.hexdigest()[:16], "git_commit": commit,
            "git_dirty": bool(status) if status is not None else None}


# -- cases and targets ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal from the issue; a row meets it when every bound it sets holds."""

    label: str
    max_seconds: float | None = None
    max_cp_ratio: float | None = None
    max_anon_mib: float | None = None
    max_ratio_to: tuple[str, float] | None = None


@dataclass
class Case:
    name: str
    container: str
    commands: list[list[str]]
    prepare: Callable[[], None] | None = None
    cleanup: Callable[[], None] | None = None
    verify: Callable[[Sample], None] | None = None
    inner_time: bool = False
    target: Target | None = None
    inputs: list[Path] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    verified: str = "not checked"

    @property
    def median(self) -> float | None:
        return statistics.median(s.seconds for s in self.samples) if self.samples else None

    @property
    def peak_rss(self) -> float | None:
        return max(s.peak_rss_mib for s in self.samples) if self.samples else None

    @property
    def peak_anon(self) -> float | None:
        return max(s.peak_anon_mib for s in self.samples) if self.samples else None


def run_case(case: Case, cwd: Path, first: bool) -> None:
    if case.error is not None:
        return
    try:
        if case.prepare is not None:
            case.prepare()
        for path in case.inputs:
            warm(path)
        os.sync()
        sample = run_sequence(case.commands, cwd)
        if sample.returncode != 0:
            tail = (sample.stderr.strip() or sample.stdout.strip()).splitlines()[-3:]
            case.error = f"exit {sample.returncode}: " + " / ".join(tail)
            return
        if case.inner_time:
            sample.inner = json.loads(sample.stdout.strip().splitlines()[-1])
            sample.seconds = float(sample.inner["seconds"])
        if first and case.verify is not None:
            try:
                case.verify(sample)
                case.verified = "ok"
            except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
                case.verified = f"FAILED: {type(exc).__name__}: {exc}"
        case.samples.append(sample)
    finally:
        if case.cleanup is not None:
            case.cleanup()


class VerifyError(AssertionError):
    pass


def read_output(path: Path, container: str) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """Keys with shapes, and a tensor getter, for an output file (via torch or safetensors)."""
    if container == ST:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict

        def get(key: str) -> torch.Tensor:
            with safe_open(str(path), framework="pt") as f:
                tensor: torch.Tensor = f.get_tensor(key)
            return tensor

        return shapes, get
    state = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__


def verify_output(path: Path, container: str, chain: str, geom: Geometry, source: Path) -> None:
    shapes, get = read_output(path, container)
    want = expected_schema(geom, chain)
    if set(shapes) != set(want):
        extra, missing = sorted(set(shapes) - set(want)), sorted(set(want) - set(shapes))
        raise VerifyError(f"keys differ: unexpected {extra[:3]}, missing {missing[:3]}")
    bad = [k for k in want if shapes[k] != want[k]]
    if bad:
        raise VerifyError(f"shape of {bad[0]}: {shapes[bad[0]]}, expected {want[bad[0]]}")
    src = torch.load(source, mmap=True, map_location="cpu", weights_only=True)
    last = geom.layers - 1
    mlp_proj = src[f"module.h.{last}.mlp.c_proj.weight"]
    checks = {
        "wte.weight": src["module.wte.weight"],
        f"layers.{last}.mlp.c_proj.weight": mlp_proj.t() if chain == "c" else mlp_proj,
    }
    if chain == "c":
        checks["layers.0.attn.c_proj.weight"] = src["module.h.0.attn.c_proj.weight"].t()
    if chain in ("b", "c"):
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            checks[f"layers.0.attn.{name}.weight"] = src["module.h.0.attn.c_attn.weight"].chunk(3)[i]
            checks[f"layers.{last}.attn.{name}.bias"] = src[f"module.h.{last}.attn.c_attn.bias"].chunk(3)[i]
        checks["layers.0.mlp.c_fc.weight"] = src["module.h.0.mlp.c_fc.weight"].unsqueeze(-1)
    else:
        checks["layers.0.attn.c_attn.weight"] = src["module.h.0.attn.c_attn.weight"]
    for key, expected in checks.items():
        if not torch.equal(get(key), expected):
            raise VerifyError(f"{key} differs from the source")


def check_file(path: Path, container: str, chain: str, geom: Geometry, source: Path, _sample: Sample) -> None:
    verify_output(path, container, chain, geom, source)


# -- the benchmark ----------------------------------------------------------------------------


@dataclass
class Files:
    work: Path
    pt: Path
    st: Path
    chain_a: Path
    chain_b: Path
    chain_c: Path
    naive: Path
    loader: Path
    schema_a: Path
    upgraded_a: Path


def cli_command() -> list[str]:
    exe = Path(sys.executable).with_name("ckptmigrate")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ckptmigrate"]


def fresh_copy(src: Path, dest: Path) -> Callable[[], None]:
    def prepare() -> None:
        remove(dest)
        shutil.copyfile(src, dest)

    return prepare


def warm(path: Path) -> None:
    """Read ``path`` so the timed run finds it in the page cache: this VM's host reclaims cached
    pages at will, and a cold 1 GiB read (~2 s) would swamp what is being measured."""
    buf = bytearray(16 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def remover(*paths: Path) -> Callable[[], None]:
    def cleanup() -> None:
        remove(*paths)
        for path in paths:
            for leftover in path.parent.glob(".ckptmigrate-tmp-*"):
                leftover.unlink(missing_ok=True)

    return cleanup


def remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def build_cases(f: Files, geom: Geometry) -> list[Case]:
    cli = cli_command()
    py = sys.executable
    src = {ZIP: f.pt, ST: f.st}
    suffix = {ZIP: ".pt", ST: ".safetensors"}
    chains = {"a": f.chain_a, "b": f.chain_b, "c": f.chain_c}
    anon_budget = 300 + 2 * geom.largest_changed_tensor() / MiB
    streaming = Target(f"≤ 1.5× cp, anon ≤ {anon_budget:.0f} MiB", max_cp_ratio=1.5, max_anon_mib=anon_budget)
    targets = {
        ("a", "in place"): Target("≤ 0.1 s", max_seconds=0.1),
        ("a", "-o"): Target("≤ 1.2× cp", max_cp_ratio=1.2),
        ("b", "in place"): streaming,
        ("b", "-o"): streaming,
        ("c", "in place"): streaming,
        ("c", "-o"): streaming,
    }
    cp_zip_out = f.work / "cp-out.pt"
    cases = [
        Case("cp (zip)", ZIP, [["cp", str(f.pt), str(cp_zip_out)]],
             prepare=remover(cp_zip_out), cleanup=remover(cp_zip_out), inputs=[f.pt]),
        Case("cp + sync FILE (zip)", ZIP, [["cp", str(f.pt), str(cp_zip_out)], ["sync", str(cp_zip_out)]],
             prepare=remover(cp_zip_out), cleanup=remover(cp_zip_out), inputs=[f.pt]),
        Case("cp (safetensors)", ST, [["cp", str(f.st), str(f.work / "cp-out.safetensors")]],
             prepare=remover(f.work / "cp-out.safetensors"), cleanup=remover(f.work / "cp-out.safetensors"),
             inputs=[f.st]),
        Case("start-up: ckptmigrate --version", ZIP, [[*cli, "--version"]]),
        Case("start-up: python -c 'import torch'", ZIP, [[py, "-c", "import torch"]]),
    ]
    for chain in ("a", "b", "c"):
        out = f.work / f"naive-{chain}.pt"
        cases.append(Case(
            f"naive torch.load→edit→torch.save ({chain})", ZIP, [[py, str(f.naive), str(f.pt), str(out), chain]],
            prepare=remover(out), cleanup=remover(out),
            verify=partial(check_file, out, ZIP, chain, geom, f.pt), inputs=[f.pt],
        ))
    for chain in ("a", "b", "c"):
        for container in (ZIP, ST):
            label = "zip" if container == ZIP else "safetensors"
            work = f.work / f"inplace-{chain}{suffix[container]}"
            out = f.work / f"out-{chain}{suffix[container]}"
            upgrade = [*cli, "upgrade", "--migrations", str(chains[chain])]
            cases.append(Case(
                f"upgrade ({chain}) in place, {label}", container, [[*upgrade, "--no-backup", str(work)]],
                prepare=fresh_copy(src[container], work), cleanup=remover(work),
                verify=partial(check_file, work, container, chain, geom, f.pt),
                target=targets[chain, "in place"], inputs=[work],
            ))
            cases.append(Case(
                f"upgrade ({chain}) -o, {label}", container, [[*upgrade, str(src[container]), "-o", str(out)]],
                prepare=remover(out), cleanup=remover(out),
                verify=partial(check_file, out, container, chain, geom, f.pt),
                target=targets[chain, "-o"], inputs=[src[container]],
            ))
    for container in (ZIP, ST):
        label = "zip" if container == ZIP else "safetensors"
        cases.append(Case(f"inspect, {label}", container, [[*cli, "inspect", str(src[container])]],
                          target=Target("≤ 0.15 s", max_seconds=0.15), inputs=[src[container]]))
    probes = ["wte.weight", "layers.0.attn.c_attn.weight", f"layers.{geom.layers - 1}.mlp.c_proj.weight"]
    expected_probe = expected_probes(f.pt, probes)
    load = [py, str(f.loader)]
    plain_name = "load: torch.load(mmap) + load_state_dict, upgraded file"

    def check_load(sample: Sample) -> None:
        inner = sample.inner or {}
        if not inner.get("ok"):
            raise VerifyError(f"the load reported missing/unexpected keys: {inner}")
        probe = inner.get("probe") or {}
        if set(probe) != set(expected_probe) or not all(
            math.isclose(probe[k], v, rel_tol=1e-9, abs_tol=1e-9) for k, v in expected_probe.items()
        ):
            raise VerifyError(f"loaded values differ from the source: {inner.get('probe')} != {expected_probe}")

    cases += [
        Case(plain_name, ZIP, [[*load, "plain", str(f.upgraded_a), str(f.schema_a), "-", *probes]],
             inner_time=True, verify=check_load, inputs=[f.upgraded_a]),
        Case("load: ckptmigrate.load_state_dict, auto-upgrade (a)", ZIP,
             [[*load, "auto", str(f.pt), str(f.schema_a), str(f.chain_a), *probes]],
             inner_time=True, verify=check_load, target=Target("≤ 1.1× plain load", max_ratio_to=(plain_name, 1.1)),
             inputs=[f.pt]),
        Case("load: ckptmigrate.load_state_dict, upgraded file", ZIP,
             [[*load, "auto", str(f.upgraded_a), str(f.schema_a), str(f.chain_a), *probes]],
             inner_time=True, verify=check_load, inputs=[f.upgraded_a]),
    ]
    return cases


def expected_probes(source: Path, keys: Sequence[str]) -> dict[str, float]:
    src = torch.load(source, mmap=True, map_location="cpu", weights_only=True)
    by_new = {renamed(k): v for k, v in src.items()}
    return {k: float(by_new[k].double().sum()) for k in keys}


def evaluate(case: Case, by_name: dict[str, Case], cp: dict[str, float | None]) -> str:
    t = case.target
    median = case.median
    if case.error is not None or median is None:
        return "ERROR"
    if case.verified.startswith("FAILED"):
        return "BROKEN (wrong output)"
    if t is None:
        return "—"
    missed = []
    if t.max_seconds is not None and median > t.max_seconds:
        missed.append("time")
    floor = cp.get(case.container)
    if t.max_cp_ratio is not None and floor and median / floor > t.max_cp_ratio:
        missed.append("× cp")
    if t.max_anon_mib is not None and (case.peak_anon or 0) > t.max_anon_mib:
        missed.append("anon")
    if t.max_ratio_to is not None:
        other = by_name[t.max_ratio_to[0]].median
        if other is None:
            return "n/a"
        if median / other > t.max_ratio_to[1]:
            missed.append(f"{median / other:.2f}×")
    return "met" if not missed else "missed (" + ", ".join(missed) + ")"


def cp_floors(by_name: dict[str, Case]) -> dict[str, float | None]:
    return {ZIP: by_name["cp (zip)"].median, ST: by_name["cp (safetensors)"].median}


def table(cases: list[Case]) -> str:
    by_name = {c.name: c for c in cases}
    cp = cp_floors(by_name)
    lines = [
        "| case | median s | × cp | peak RSS MiB | peak anon MiB | target | status |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for c in cases:
        med = c.median
        floor = cp.get(c.container)
        ratio = f"{med / floor:.2f}" if med is not None and floor else "—"
        cells = [
            c.name,
            f"{med:.3f}" if med is not None else "—",
            ratio,
            f"{c.peak_rss:.0f}" if c.peak_rss is not None else "—",
            f"{c.peak_anon:.0f}" if c.peak_anon is not None else "—",
            c.target.label if c.target else "—",
            evaluate(c, by_name, cp),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(geom: Geometry, f: Files, build_seconds: dict[str, float]) -> dict[str, Any]:
    fs = subprocess.run(["df", "-T", str(f.work)], capture_output=True, text=True, check=False).stdout
    fstype = fs.splitlines()[-1].split()[1] if fs.count("\n") >= 2 else "?"
    return {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpus": os.cpu_count(), "mem_total_mib": _meminfo_mib("MemTotal"), "workdir": str(f.work),
        "filesystem": fstype, "layers": geom.layers, "vocab": geom.vocab, "d": geom.d,
        "tensors": len(geom.tensors()), "tensor_bytes": geom.nbytes(),
        "zip_bytes": f.pt.stat().st_size, "safetensors_bytes": f.st.stat().st_size,
        "build_seconds": build_seconds, "largest_changed_tensor_mib": geom.largest_changed_tensor() / MiB,
    }


def _meminfo_mib(field_name: str) -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--workdir", type=Path, help="where files go (default: a new temporary directory under /tmp)")
    p.add_argument("--size-mb", type=int, default=None, help="checkpoint size in MiB (default 1024)")
    p.add_argument("--repeat", type=int, default=None, help="runs per case; medians are reported (default 3)")
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--quick", action="store_true", help="smoke run: --size-mb 64 --repeat 1 unless given")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--sweep", action="store_true",
                   help="instead: time a rename-only migration against tensor count (100 to 100,000) and file "
                        "size (64 MiB to --sweep-max-mb), write --json (default bench-sweep.json) and a PNG plot")
    p.add_argument("--sweep-max-mb", type=int, default=4096, help="largest file of the size sweep (default 4096)")
    p.add_argument("--sweep-counts", default="100,1000,10000,100000", help="tensor counts of the sweep")
    args = p.parse_args(argv)
    args.size_mb = args.size_mb or (64 if args.quick else 1024)
    args.repeat = args.repeat or (1 if args.quick else 3)
    if args.size_mb < 64 or args.repeat < 1:
        p.error("--size-mb must be at least 64 (one layer and a small vocabulary) and --repeat at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="ckptmigrate-bench-", dir="/tmp")) if temporary else args.workdir
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        import bench_sweep

        try:
            counts = [int(c) for c in args.sweep_counts.split(",")]
            return bench_sweep.sweep(work, args.repeat, args.sweep_max_mb, counts,
                                     args.json or Path("bench-sweep.json"))
        finally:
            if temporary and not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    geom = Geometry.for_size(args.size_mb)
    need = 6 * geom.nbytes()
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"{work}: {free / MiB:.0f} MiB free, the benchmark needs about {need / MiB:.0f} MiB", file=sys.stderr)
        return 2
    try:
        return run(args, work, geom)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif temporary:
            print(f"work directory kept: {work}")


def run(args: argparse.Namespace, work: Path, geom: Geometry) -> int:
    f = Files(work, work / "gpt2m.pt", work / "gpt2m.safetensors", work / "chain_a", work / "chain_b",
              work / "chain_c", work / "naive_migrate.py", work / "load_case.py", work / "schema_a.json",
              work / "upgraded-a.pt")
    print(f"ckptmigrate benchmark in {work}: {geom.layers} layers, vocab {geom.vocab}, d={geom.d}, "
          f"{len(geom.tensors())} tensors, {geom.nbytes() / MiB:.0f} MiB float32; repeat {args.repeat}", flush=True)
    build: dict[str, float] = {}
    t0 = time.perf_counter()
    write_safetensors(f.st, geom)
    build["safetensors_stream"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch_save_from(f.st, f.pt)
    build["torch_save"] = time.perf_counter() - t0
    check_twins(f.pt, f.st, geom)
    print(f"built {f.pt.name} ({f.pt.stat().st_size / MiB:.0f} MiB) and {f.st.name} "
          f"({f.st.stat().st_size / MiB:.0f} MiB) in {sum(build.values()):.1f} s", flush=True)

    write_chain(f.chain_a, geom, "a")
    write_chain(f.chain_b, geom, "b")
    write_chain(f.chain_c, geom, "c")
    f.naive.write_text(NAIVE_SCRIPT)
    f.loader.write_text(LOAD_SCRIPT)
    f.schema_a.write_text(json.dumps({k: list(s) for k, s in expected_schema(geom, "a").items()}))

    cli = cli_command()
    child_env(work)
    for warm in ([*cli, "history", "--migrations", str(f.chain_a)],
                 [*cli, "history", "--migrations", str(f.chain_b)],
                 [*cli, "history", "--migrations", str(f.chain_c)],
                 [sys.executable, "-c", "import torch, git, ckptmigrate.api, ckptmigrate.integrations.loading"]):
        subprocess.run(warm, cwd=work, check=True, capture_output=True, env=CHILD_ENV)
    prep = subprocess.run([*cli, "upgrade", "--migrations", str(f.chain_a), str(f.pt), "-o", str(f.upgraded_a)],
                          cwd=work, capture_output=True, text=True, check=False, env=CHILD_ENV)
    if prep.returncode != 0:
        print(f"could not produce the upgraded file for the load cases: {prep.stderr.strip()}", file=sys.stderr)
        return 1

    source = ckptmigrate_source(work)
    cases = build_cases(f, geom)
    for r in range(args.repeat):
        for case in cases:
            run_case(case, work, first=r == 0)
            last = f"{case.samples[-1].seconds:.3f} s" if case.samples and case.error is None else "ERROR"
            print(f"  [{r + 1}/{args.repeat}] {case.name}: {last}", flush=True)

    env = environment(geom, f, build)
    env["ckptmigrate_source"] = source
    source_after = ckptmigrate_source(work)
    print()
    print(table(cases))
    print()
    print(f"Checkpoint: {geom.layers} layers × d={geom.d}, vocab {geom.vocab}; torch zip "
          f"{env['zip_bytes'] / MiB:.0f} MiB, safetensors {env['safetensors_bytes'] / MiB:.0f} MiB, "
          f"{env['tensors']} tensors; {env['filesystem']} at {work}; {env['cpus']} CPUs; torch {env['torch']}.")
    print(f"Medians of {args.repeat} run(s), warm page cache (inputs read just before each run); sync before "
          "each run. × cp is against cp of the same container. CLI/script rows: wall time of the whole process "
          "(start-up included); load rows: the load call alone, timed inside the child (the model, "
          f"{geom.nbytes() / MiB:.0f} MiB of zeros, is built first and counts in its memory).")
    print("Peak RSS: VmHWM, peak anon: RssAnon, from /proc/<pid>/status every 5 ms; both the max over runs. "
          f"(b) and (c)'s anon budget: 300 MiB + 2 × {geom.largest_changed_tensor() / MiB:.0f} MiB, the largest "
          "changed tensor (mlp.c_fc.weight, reshaped by (b) and (c); mlp.c_proj.weight, transposed by (c)).")
    where = f"git {source['git_commit']}{' + uncommitted changes' if source['git_dirty'] else ''}"
    print(f"ckptmigrate imported from {source['path']} ({where if source['git_commit'] else 'not in git'}, "
          f"sources sha256 {source['sources_sha256']}).")
    problems = [c for c in cases if c.error is not None or c.verified.startswith("FAILED")]
    for c in problems:
        print(f"PROBLEM {c.name}: {c.error or c.verified}")
    changed = source_after["sources_sha256"] != source["sources_sha256"]
    env["ckptmigrate_sources_changed_during_run"] = changed
    if changed:
        print(f"PROBLEM ckptmigrate's sources changed during the run ({source['sources_sha256']} → "
              f"{source_after['sources_sha256']}): the figures mix versions; run again on a quiet tree")
    if args.json is not None:
        by_name = {c.name: c for c in cases}
        cp = cp_floors(by_name)
        def ratio(c: Case) -> float | None:
            floor = cp.get(c.container)
            return c.median / floor if c.median is not None and floor else None

        data = {
            "config": {"size_mb": args.size_mb, "repeat": args.repeat, "quick": args.quick},
            "environment": env,
            "cases": [{
                "name": c.name, "container": c.container, "commands": c.commands,
                "median_seconds": c.median,
                "cp_ratio": ratio(c),
                "peak_rss_mib": c.peak_rss, "peak_anon_mib": c.peak_anon,
                "target": c.target.label if c.target else None, "status": evaluate(c, by_name, cp),
                "verified": c.verified, "error": c.error,
                "runs": [{"seconds": s.seconds, "wall_seconds": s.wall_seconds, "peak_rss_mib": s.peak_rss_mib,
                          "peak_anon_mib": s.peak_anon_mib, "anon_samples": s.anon_samples, "inner": s.inner}
                         for s in c.samples],
            } for c in cases],
        }
        args.json.write_text(json.dumps(data, indent=2))
        print(f"figures written to {args.json}")
    return 1 if problems or changed else 0


if __name__ == "__main__":
    sys.exit(main())
