"""Fuzzing the readers: whatever bytes a file holds, reading it succeeds or fails cleanly.

Real files — a ``torch.save`` zip (parameters, tied and strided views, a scalar, ``_metadata``,
optimizer state and extras), the same in the legacy format, a ``safetensors.torch.save_file`` file,
ckptmigrate-stamped copies of both, and two files whose pickle calls ``os.system`` — are mutated
with byte flips, truncations, insertions, deletions, splices (from the same or another file) and
"interesting" integers written over length and offset fields, and fully random bytes are tried too
(bare, and behind each format's magic). Each result goes through :func:`ckptmigrate.formats.sniff`,
:func:`~ckptmigrate.formats.read`, :func:`~ckptmigrate.formats.read_envelope`,
:func:`ckptmigrate.api.inspect` and the readers under them (the zip directory, the safetensors
header, the legacy reader, the ``SafeUnpickler`` on a ``data.pkl`` re-zipped with a valid CRC so
the pickle itself is what is fuzzed). The only acceptable outcomes are success — and then every
tensor the reader returns maps onto bytes of the file — or the project's clean error (``BadInput``
from the public functions, each reader's own format error below them: one line naming the file);
anything else — another exception, a hang past the time limit, a crash, a sentinel file touched by
a pickled command, a file written — fails the test.

``CKPTMIGRATE_FUZZ_EXAMPLES`` sets the examples per test (default 200, about 20 s in all on two
cores); with ``CI`` set the run is derandomized (the same examples each run) and keeps no example
database. ``scripts/fuzz.sh`` runs the long version.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckptmigrate import api, formats
from ckptmigrate.errors import BadInput
from ckptmigrate.formats import legacy, pickled, safetensors_io, zipio
from ckptmigrate.formats.pickled import PickleFormatError, StandIn
from ckptmigrate.tensors.refs import Source, Storage, TensorRef, to_torch

EXAMPLES = int(os.environ.get("CKPTMIGRATE_FUZZ_EXAMPLES", "200"))
IN_CI = bool(os.environ.get("CI"))
#: Seconds one example may take before it counts as a hang.
TIME_LIMIT = float(os.environ.get("CKPTMIGRATE_FUZZ_TIME_LIMIT", "20"))

FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=IN_CI, database=None if IN_CI else settings().database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)

T = TypeVar("T")

# -- the seeds -------------------------------------------------------------------------------------


class RunsAShellCommand:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.sentinel}",))


def _payload() -> dict[str, Any]:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    state = torch.nn.Linear(3, 4).state_dict()
    state["tied"] = weight.detach()  # shares storage with the parameter below
    state["strided"] = torch.arange(24, dtype=torch.float64).reshape(4, 6)[:, ::2]
    state["scalar"] = torch.tensor(7, dtype=torch.int64)
    state["half"] = torch.ones(5, dtype=torch.float16)
    state["flags"] = torch.tensor([True, False])
    state._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.sum().backward()
    optimizer.step()
    return {"state_dict": state, "param": weight, "optimizer": optimizer.state_dict(), "epoch": 3,
            "meta": {"name": "fuzz", "sizes": [1, 2, (3, 4)], "ratio": 0.5}}


class Seeds(dict[str, bytes]):
    """The seed files by name (a short repr: hypothesis prints a failing example's arguments)."""

    def __repr__(self) -> str:
        return f"<seeds {', '.join(self)}>"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    """The real files the mutations start from, as bytes."""
    where = tmp_path_factory.mktemp("seeds")
    sentinel = where / "sentinel"
    files = {
        "torch-zip": lambda p: torch.save(_payload(), p),
        "torch-legacy": lambda p: torch.save(_payload(), p, _use_new_zipfile_serialization=False),
        "safetensors": lambda p: save_file({"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.ones(2, 2,
                                           dtype=torch.bfloat16)}, str(p), metadata={"format": "pt"}),
        "trap-zip": lambda p: torch.save({"w": torch.ones(3), "hook": RunsAShellCommand(sentinel)}, p),
        "trap-legacy": lambda p: torch.save({"w": torch.ones(3), "hook": RunsAShellCommand(sentinel)}, p,
                                            _use_new_zipfile_serialization=False),
    }
    out = Seeds()
    for name, make in files.items():
        path = where / name
        make(path)
        out[name] = path.read_bytes()
    for name in ("torch-zip", "safetensors"):
        path = where / f"stamped-{name}"
        path.write_bytes(out[name])
        api.stamp(path, tags={"run": "fuzz"}, digest=True)
        out[f"stamped-{name}"] = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(out["torch-zip"])) as zf:
        out["data.pkl"] = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert not sentinel.exists()
    out["sentinel"] = str(sentinel).encode()
    return out


# -- mutations -------------------------------------------------------------------------------------

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, (1 << 63) - 1, (1 << 64) - 1,
               1 << 40, 100_000_001)


def _position(data: st.DataObject, n: int) -> int:
    """Often near the start (magic, headers) or the end (the zip directory), else anywhere."""
    return data.draw(st.one_of(st.integers(0, min(n, 64)), st.integers(max(0, n - 512), n), st.integers(0, n)))


def mutate(data: st.DataObject, seed: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "integer"]))
        n = len(buf)
        at = _position(data, n)
        if kind == "flip" and n:
            at = min(at, n - 1)
            buf[at] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del buf[at : at + data.draw(st.integers(1, 256))]
        elif kind == "splice":
            donor = data.draw(st.sampled_from(pool))
            start = data.draw(st.integers(0, len(donor)))
            chunk = donor[start : start + data.draw(st.integers(1, 512))]
            buf[at : at + data.draw(st.integers(0, 512))] = chunk
        elif kind == "integer":
            width = data.draw(st.sampled_from([1, 2, 4, 8]))
            value = data.draw(st.sampled_from((*INTERESTING, n, n + 1, max(n - 1, 0))))
            buf[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(buf)


# -- checks ----------------------------------------------------------------------------------------


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise AssertionError(f"reading took more than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def clean(fn: Callable[[], T], errors: tuple[type[BaseException], ...], name: str | None = None) -> T | None:
    """``fn()``, or None when it raised one of ``errors`` with a one-line message (naming ``name``)."""
    try:
        return fn()
    except errors as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1, repr(message)
        if name is not None:
            assert name in message, message
        return None


def tensors_in(payload: Any) -> Iterator[TensorRef]:
    """Every TensorRef in a payload the reader accepted (bounded in depth and size by the reader)."""
    seen: set[int] = set()
    stack = [payload]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, TensorRef):
            yield obj
            stack += list(obj.extra.values())
        elif isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif isinstance(obj, StandIn):
            stack += [obj.args, obj.state, obj.listitems, obj.dictitems]


UNMAPPABLE = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}  # quantized: stand-ins, never mapped


def check_tensors(payload: Any, storages: dict[str, Storage], size: int) -> None:
    """What a reader returns is usable: each storage lies in the file, each tensor maps onto it."""
    for storage in storages.values():
        assert storage.source is not None and storage.offset is not None
        assert storage.offset >= 0 and storage.offset + storage.nbytes <= size
    for ref in tensors_in(payload):
        assert ref.storage in storages.values()
        if ref.dtype in UNMAPPABLE:
            continue
        values = to_torch(ref)
        assert tuple(values.shape) == ref.shape
        values.sum()  # touches every element's bytes


class Sandbox:
    """Where candidate files are written, one at a time; the sentinel a pickled command would touch."""

    def __init__(self, work: Path, sentinel: Path) -> None:
        self.work, self.sentinel = work, sentinel

    def __repr__(self) -> str:
        return f"<sandbox {self.work}>"

    def place(self, data: bytes, suffix: str = ".pt") -> Path:
        for leftover in self.work.iterdir():
            leftover.unlink()
        path = self.work / f"candidate{suffix}"
        path.write_bytes(data)
        return path

    def check(self) -> None:
        assert not self.sentinel.exists(), "a pickled command ran"


@pytest.fixture
def sandbox(tmp_path: Path, seeds: dict[str, bytes]) -> Iterator[Sandbox]:
    work = tmp_path / "work"
    work.mkdir()
    box = Sandbox(work, Path(seeds["sentinel"].decode()))
    yield box
    box.check()


def read_everything(path: Path, box: Sandbox) -> None:
    """The public entry points, as the CLI calls them: success or one clean BadInput naming the file."""
    listing = sorted(os.listdir(path.parent))
    before = path.read_bytes()
    with time_limit(TIME_LIMIT):
        with open(path, "rb") as fh:
            head = fh.read(16)
        assert formats.sniff(head, len(before)) in (None, *formats.FORMATS)
        container = clean(lambda: formats.read(path), (BadInput,), path.name)
        event(f"read: {'refused' if container is None else 'accepted'}")
        if container is not None:
            try:
                check_tensors(container.payload, container.storages, len(before))
            finally:
                container.close()
        clean(lambda: formats.read_envelope(path), (BadInput,), path.name)
        info = clean(lambda: api.inspect(path, keys=True), (BadInput,), path.name)
        if info is not None:
            assert info["tensors"] == len(info["keys"])
    assert sorted(os.listdir(path.parent)) == listing
    assert path.read_bytes() == before
    box.check()


# -- the tests -------------------------------------------------------------------------------------

CONTAINERS = ["torch-zip", "torch-legacy", "safetensors", "stamped-torch-zip", "stamped-safetensors", "trap-zip",
              "trap-legacy"]


@pytest.mark.parametrize("seed", CONTAINERS)
@FUZZ
@given(data=st.data())
def test_mutated_files_read_or_fail_cleanly(seed: str, data: st.DataObject, seeds: dict[str, bytes],
                                           sandbox: Sandbox) -> None:
    pool = [seeds[name] for name in CONTAINERS]
    candidate = mutate(data, seeds[seed], pool)
    path = sandbox.place(candidate, ".safetensors" if "safetensors" in seed else ".pt")
    read_everything(path, sandbox)


@FUZZ
@given(data=st.data())
def test_the_readers_under_read(data: st.DataObject, seeds: dict[str, bytes],
                                sandbox: Sandbox) -> None:
    """Each reader called directly on a mutated file of its own format raises only its format error."""
    seed = data.draw(st.sampled_from(CONTAINERS))
    path = sandbox.place(mutate(data, seeds[seed], [seeds[name] for name in CONTAINERS]), ".bin")
    size = path.stat().st_size
    if size == 0:
        return
    source = Source(path)
    try:
        with time_limit(TIME_LIMIT):
            if "zip" in seed:
                clean(lambda: zipio.read_entries(source._fh, size), (zipio.ZipFormatError,))
            elif "legacy" in seed:
                result = clean(lambda: legacy.read(source), (legacy.LegacyFormatError,))
                if result is not None:
                    check_tensors(result[0], result[1], size)
            else:
                clean(lambda: safetensors_io.read_header(source), (safetensors_io.SafetensorsFormatError,))
                result2 = clean(lambda: safetensors_io.read(source), (safetensors_io.SafetensorsFormatError,))
                if result2 is not None:
                    check_tensors(result2[0], result2[3], size)
    finally:
        source.close()
    sandbox.check()


def _rezip(archive: bytes, pickle_bytes: bytes) -> bytes:
    """The zip with its data.pkl replaced, CRC and sizes right: the pickle itself is what is fuzzed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pickle_bytes if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


@FUZZ
@given(data=st.data())
def test_mutated_pickles_behind_a_valid_crc(data: st.DataObject, seeds: dict[str, bytes],
                                            sandbox: Sandbox) -> None:
    seed = data.draw(st.sampled_from(["torch-zip", "trap-zip", "stamped-torch-zip"]))
    with zipfile.ZipFile(io.BytesIO(seeds[seed])) as zf:
        original = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    pickle_bytes = mutate(data, original, [seeds["data.pkl"], original])
    read_everything(sandbox.place(_rezip(seeds[seed], pickle_bytes), ".pt"), sandbox)


@FUZZ
@given(data=st.data())
def test_the_safe_unpickler_on_mutated_pickles(data: st.DataObject, seeds: dict[str, bytes],
                                               sandbox: Sandbox) -> None:
    pickle_bytes = mutate(data, seeds["data.pkl"], [seeds["data.pkl"]])
    storages: dict[str, Storage] = {}
    with time_limit(TIME_LIMIT):
        payload = clean(lambda: pickled.load(pickle_bytes, storages), (PickleFormatError,))
    event(f"unpickle: {'refused' if payload is None else 'accepted'}")
    if payload is not None:
        for ref in tensors_in(payload):
            assert ref.storage is storages[ref.storage.key]
    sandbox.check()


MAGIC = {
    "none": b"",
    "zip": b"PK\x03\x04",
    "zip-end": b"PK\x05\x06",
    "legacy": b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19",
    "safetensors": struct.pack("<Q", 64) + b"{",
}


@FUZZ
@given(magic=st.sampled_from(sorted(MAGIC)), body=st.binary(max_size=4096))
def test_random_bytes_read_or_fail_cleanly(magic: str, body: bytes, sandbox: Sandbox) -> None:
    read_everything(sandbox.place(MAGIC[magic] + body, ".pt"), sandbox)


@FUZZ
@given(head=st.binary(max_size=32), size=st.integers(0, 1 << 64))
def test_sniff_never_raises(head: bytes, size: int) -> None:
    assert formats.sniff(head, size) in (None, *formats.FORMATS)
