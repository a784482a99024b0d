"""User story: "Someone handed me a hostile checkpoint — ckptmigrate refused it in one line, ran none
of its code and wrote nothing."

Complements ``test_bad_input.py`` (missing, empty, truncated and mislabelled files) with files built
to hurt: zip records whose CRC, local header or central directory lie, records claiming terabytes or
sharing bytes, a 100 MB safetensors header, JSON and pickles nested a hundred thousand deep (a dict
keyed by nested tuples used to crash the interpreter), pickles that share objects 10**30 times or
contain themselves, tensors a pickle edits after they were checked, and pickles that call
``os.system``, ``eval``, ``exec``, ``subprocess.Popen``, ``torch.load`` or ``pickle.loads`` to touch a
sentinel file. Every one goes through the CLI as real subprocesses (``inspect``, ``stamp``,
``upgrade``, ``current``, ``verify``) and through the Python API (``inspect``, ``load``): refused
with exit code 2 and one line ``ckptmigrate: error: <path>: ...`` (``verify`` reports ``FAILED`` and
exits 1), never a traceback, the file byte-identical and no new file beside it; or, when the pickle
is only inert data to us, read and migrated with the call recorded and never made. Each code-running
pickle is shown to be live: ``torch.load(weights_only=False)`` and ``ckptmigrate.load(trust_pickle=True)``
do touch the sentinel. Broken migration scripts (a syntax error, a missing import, ``sys.exit``, a
cycle, a tensor of the wrong shape for the next migration or for the model) stop with an error that
names the revision and its file, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ckptmigrate
from ckptmigrate import api
from ckptmigrate.errors import BadInput, MigrationError

Cli = Callable[..., subprocess.CompletedProcess[str]]

# -- pickles written opcode by opcode --------------------------------------------------------------

PROTO2 = b"\x80\x02"


def text(value: str) -> bytes:
    """BINUNICODE."""
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def binbytes(value: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(value)) + value


def integer(value: int) -> bytes:
    """BININT, or LONG1 for what does not fit in 32 bits."""
    if -(1 << 31) <= value < (1 << 31):
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def global_(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def call(fn: bytes, *args: bytes) -> bytes:
    """``fn(*args)``: MARK, the arguments, TUPLE, REDUCE."""
    return fn + b"(" + b"".join(args) + b"tR"


def int_tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(integer(v) for v in values) + b"t"


def tensor(key: str = "0", *, numel: int = 6, shape: tuple[int, ...] = (6,), stride: tuple[int, ...] = (1,),
           offset: int = 0, storage_type: str = "FloatStorage") -> bytes:
    """A tensor as torch pickles it: ``_rebuild_tensor_v2`` of a persistent storage id."""
    pid = b"(" + text("storage") + global_("torch", storage_type) + text(key) + text("cpu") + integer(numel) + b"tQ"
    return call(global_("torch._utils", "_rebuild_tensor_v2"), pid, integer(offset), int_tuple(shape),
                int_tuple(stride), b"\x89", call(global_("collections", "OrderedDict")))


def state_dict_with(hook: bytes) -> bytes:
    """``{"w": <6 floats in storage 0>, "hook": <hook>}``."""
    return PROTO2 + b"}(" + text("w") + tensor() + text("hook") + hook + b"u."


def replace_data_pkl(path: Path, pickle_bytes: bytes) -> None:
    """A real ``torch.save`` zip with its ``data.pkl`` replaced (records stored, CRCs right)."""
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as zf:
        records = [(info.filename, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(name, pickle_bytes if name.endswith("/data.pkl") else data)


# -- zip surgery -------------------------------------------------------------------------------

LOCAL = struct.Struct("<IHHHHHIIIHH")
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
EOCD = struct.Struct("<IHHHHIIH")


@dataclass
class Central:
    fields: list[int]
    name: bytes
    extra: bytes
    comment: bytes


def central_directory(data: bytes) -> tuple[int, list[Central]]:
    eocd = data.rindex(b"PK\x05\x06")
    *_, cd_size, cd_offset, _comment = EOCD.unpack_from(data, eocd)
    entries, pos = [], cd_offset
    while pos < cd_offset + cd_size:
        fields = list(CENTRAL.unpack_from(data, pos))
        name_len, extra_len, comment_len = fields[10:13]
        pos += CENTRAL.size
        entries.append(Central(fields, data[pos : pos + name_len], data[pos + name_len : pos + name_len + extra_len],
                               data[pos + name_len + extra_len : pos + name_len + extra_len + comment_len]))
        pos += name_len + extra_len + comment_len
    return cd_offset, entries


def rewrite_central_directory(path: Path, edit: Callable[[Central], None]) -> None:
    """Rebuild the central directory and end record of a (non-zip64) zip after ``edit`` of each entry."""
    data = path.read_bytes()
    cd_offset, entries = central_directory(data)
    cd = b""
    for entry in entries:
        edit(entry)
        entry.fields[10:13] = [len(entry.name), len(entry.extra), len(entry.comment)]
        cd += CENTRAL.pack(*entry.fields) + entry.name + entry.extra + entry.comment
    end = EOCD.pack(0x06054B50, 0, 0, len(entries), len(entries), len(cd), cd_offset, 0)
    path.write_bytes(data[:cd_offset] + cd + end)


def record(path: Path, suffix: str) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as zf:
        return next(info for info in zf.infolist() if info.filename.endswith(suffix))


def data_offset(data: bytes, info: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + LOCAL.size + name_len + extra_len


def flip_byte_in_record(path: Path, suffix: str, at: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[data_offset(bytes(data), record(path, suffix)) + at] ^= 0xFF
    path.write_bytes(bytes(data))


def plain_checkpoint(path: Path) -> None:
    torch.save({"w": torch.arange(6, dtype=torch.float32), "b": torch.arange(1.0, 4.0)}, path)


def crc_of_data_pkl_wrong(path: Path) -> None:
    plain_checkpoint(path)
    flip_byte_in_record(path, "/data.pkl")


def local_header_size_differs(path: Path) -> None:
    """torch writes sizes in a data descriptor and zeros in the local header: one says 10 bytes."""
    plain_checkpoint(path)
    data = bytearray(path.read_bytes())
    info = record(path, "/data/0")
    struct.pack_into("<II", data, info.header_offset + 18, 10, 10)
    path.write_bytes(bytes(data))


def local_header_size_differs_in_a_stamped_file(path: Path) -> None:
    """The records ckptmigrate writes keep CRC and sizes in the local header: data.pkl's says one more."""
    plain_checkpoint(path)
    api.stamp(path)
    data = bytearray(path.read_bytes())
    info = record(path, "/data.pkl")
    flags, _m, _t, _d, crc, csize, usize = struct.unpack_from("<HHHHIII", data, info.header_offset + 6)
    assert not flags & 0x08 and csize == usize == info.file_size  # a header that states its sizes
    struct.pack_into("<II", data, info.header_offset + 18, usize + 1, usize + 1)
    path.write_bytes(bytes(data))


def central_size_differs(path: Path) -> None:
    """The central directory says storage 0 is 4 bytes shorter than its local data descriptor."""
    plain_checkpoint(path)

    def edit(entry: Central) -> None:
        if entry.name.endswith(b"/data/0"):
            entry.fields[8] -= 4
            entry.fields[9] -= 4

    rewrite_central_directory(path, edit)


def claims_terabytes(zip64: bool) -> Callable[[Path], None]:
    """Zip-bomb sizes: storage 0 claims 2**40 bytes (zip64 extra field), or 0xFFFFFFFF without one."""

    def build(path: Path) -> None:
        plain_checkpoint(path)

        def edit(entry: Central) -> None:
            if entry.name.endswith(b"/data/0"):
                entry.fields[8] = entry.fields[9] = 0xFFFFFFFF
                if zip64:
                    entry.fields[1] = entry.fields[2] = 45
                    entry.extra = struct.pack("<HHQQ", 1, 16, 1 << 40, 1 << 40) + entry.extra

        rewrite_central_directory(path, edit)

    return build


def data_pkl_claims_terabytes(path: Path) -> None:
    plain_checkpoint(path)

    def edit(entry: Central) -> None:
        if entry.name.endswith(b"/data.pkl"):
            entry.fields[8] = entry.fields[9] = 0xFFFFFFFF
            entry.fields[1] = entry.fields[2] = 45
            entry.extra = struct.pack("<HHQQ", 1, 16, 1 << 41, 1 << 41) + entry.extra

    rewrite_central_directory(path, edit)


def stored_zip(members: list[tuple[str, bytes]], aliases: list[tuple[str, str, int, bytes]]) -> bytes:
    """A zip of stored records with sizes in their local headers, plus central-directory entries
    ``(name, member, offset, data)`` for records whose local header lies ``offset`` bytes into
    another member's data."""
    out, cd, data_at = b"", b"", {}

    def central(raw: bytes, header_offset: int, data: bytes) -> bytes:
        crc = zlib.crc32(data)
        return CENTRAL.pack(0x02014B50, 20, 20, 0, 0, 0, 0, crc, len(data), len(data), len(raw),
                            0, 0, 0, 0, 0, header_offset) + raw

    for name, data in members:
        raw = name.encode()
        cd += central(raw, len(out), data)
        out += LOCAL.pack(0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(data), len(data), len(data), len(raw), 0) + raw
        data_at[name] = len(out)
        out += data
    for name, member, offset, data in aliases:
        cd += central(name.encode(), data_at[member] + offset, data)
    n = len(members) + len(aliases)
    return out + cd + EOCD.pack(0x06054B50, 0, 0, n, n, len(cd), len(out), 0)


def overlapping_records(path: Path) -> None:
    """Storage 1's record lies inside storage 0's: the overlapping-file zip bomb, in miniature."""
    weights = struct.pack("<6f", *range(6))
    inner_name = b"archive/data/1"
    inner = LOCAL.pack(0x04034B50, 20, 0, 0, 0, 0, zlib.crc32(weights), 24, 24, len(inner_name), 0) + inner_name
    outer = inner + weights + bytes(8)
    pickle_bytes = PROTO2 + b"}(" + text("a") + tensor("0") + text("b") + tensor("1") + b"u."
    path.write_bytes(stored_zip([("archive/data.pkl", pickle_bytes), ("archive/data/0", outer)],
                                [("archive/data/1", "archive/data/0", 0, weights)]))
    with zipfile.ZipFile(path) as zf:  # otherwise a well-formed zip
        assert zf.read("archive/data/1") == weights and len(zf.read("archive/data/0")) == len(outer)


def with_envelope_record(data: bytes) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        plain_checkpoint(path)
        with zipfile.ZipFile(path, "a") as zf:
            prefix = zf.namelist()[0].split("/")[0]
            zf.writestr(f"{prefix}/.data/ckptmigrate.json", data)

    return build


def safetensors_file(header: bytes, data: bytes = b"") -> Callable[[Path], None]:
    return lambda path: path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def safetensors_header_of_100_mb(path: Path) -> None:
    """The length field says 100 MiB (more than the 100,000,000 bytes safetensors allows) and the
    file holds that much: a sparse file whose header, were it read, would be NUL bytes, not JSON."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 100 << 20) + b"{")
        fh.truncate(8 + (100 << 20) + 64)


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


F32 = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'

# Each builds a broken container in the given path; the CLI and the API must refuse it in one line.
BROKEN_CONTAINERS: dict[str, Callable[[Path], None]] = {
    "zip-crc-of-data.pkl-wrong": crc_of_data_pkl_wrong,
    "zip-local-header-size-differs-from-central-directory": local_header_size_differs,
    "zip-local-header-size-differs-in-a-file-ckptmigrate-wrote": local_header_size_differs_in_a_stamped_file,
    "zip-central-directory-size-differs-from-data-descriptor": central_size_differs,
    "zip-record-claims-a-terabyte-zip64": claims_terabytes(zip64=True),
    "zip-record-claims-0xffffffff-bytes": claims_terabytes(zip64=False),
    "zip-data.pkl-claims-two-terabytes": data_pkl_claims_terabytes,
    "zip-records-overlap": overlapping_records,
    "zip-envelope-nested-100000-deep": with_envelope_record(nested_json(100_000)),
    "zip-envelope-not-an-object": with_envelope_record(b"[1, 2]"),
    "safetensors-header-of-100-mb": safetensors_header_of_100_mb,
    "safetensors-header-length-2**64-1": lambda path: path.write_bytes(
        struct.pack("<Q", (1 << 64) - 1) + b'{"a": 1}' + bytes(8)),
    "safetensors-header-nested-100000-deep": safetensors_file(b'{"__metadata__":{"a":' + nested_json(100_000) + b"}}"),
    "safetensors-envelope-nested-100000-deep": safetensors_file(
        b'{"a":' + F32 + b',"__metadata__":{"ckptmigrate":"' + nested_json(100_000) + b'"}}', bytes(4)),
    "safetensors-envelope-not-an-object": safetensors_file(
        b'{"a":' + F32 + b',"__metadata__":{"ckptmigrate":"[1]"}}', bytes(4)),
    "safetensors-envelope-not-a-string": safetensors_file(
        b'{"a":' + F32 + b',"__metadata__":{"ckptmigrate":{"revision":"x"}}}', bytes(4)),
    "safetensors-header-not-utf-8": safetensors_file(b'{"\xff\xfe":' + F32 + b"}", bytes(4)),
}


ONLY_DATA_PKL_IS_BROKEN = {"zip-crc-of-data.pkl-wrong"}

# -- pickles that nest, share, loop or tamper ------------------------------------------------------

def laughs(levels: int = 30, width: int = 10) -> bytes:
    """L0 = [1]; L(k) = [L(k-1)] * width: 30 small lists that a naive walk visits 10**30 times."""
    out = b"]K\x01aq\x000"
    for level in range(1, levels):
        out += b"](" + (b"h" + bytes([level - 1])) * width + b"eq" + bytes([level]) + b"0"
    return out


BROKEN_PICKLES: dict[str, bytes] = {
    "lists-nested-100000-deep": state_dict_with(b"]" * 100_000 + b"a" * 99_999),
    "dicts-nested-100000-deep": state_dict_with(b"}" + (text("k") + b"}") * 100_000 + b"s" * 100_000),
    "dict-keyed-by-tuples-nested-200000-deep": (  # hashing the key recursed in C: a segfault
        PROTO2 + b"}(" + text("w") + tensor() + b"K\x01" + b"\x85" * 200_000 + b"K\x02u."),
    "set-of-tuples-nested-200000-deep": state_dict_with(b"\x8f(K\x01" + b"\x85" * 200_000 + b"\x90"),
    "objects-shared-10**30-times": laughs() + b"}(" + text("w") + tensor() + text("hook") + b"h\x1du.",
    "tensor-shape-changed-by-BUILD-after-it-was-checked": (
        PROTO2 + b"}(" + text("w") + tensor() + b"}" + text("shape") + integer(10**9) + b"\x85sbu."),
    "storage-shrunk-by-BUILD-after-its-tensor-was-checked": (  # BINPERSID pushes the storage itself
        PROTO2 + b"}(" + text("w") + tensor() + text("s") + b"(" + text("storage") + global_("torch", "FloatStorage")
        + text("0") + text("cpu") + integer(6) + b"tQ" + b"}" + text("nbytes") + integer(4) + b"sbu."),
    "rebuild-function-modified-by-BUILD": state_dict_with(
        global_("torch._utils", "_rebuild_tensor_v2") + b"N}" + text("__defaults__") + b")s\x86b"),
    "scalar-tensor-past-its-storage": PROTO2 + b"}(" + text("w") + tensor(shape=(), stride=(), offset=100) + b"u.",
    "tensor-with-a-negative-offset": PROTO2 + b"}(" + text("w") + tensor(shape=(2,), offset=-1) + b"u.",
    "tensor-v3-float32-on-6-untyped-bytes": PROTO2 + b"}(" + text("w") + call(
        global_("torch._utils", "_rebuild_tensor_v3"),
        b"(" + text("storage") + global_("torch.storage", "UntypedStorage") + text("0") + text("cpu")
        + integer(6) + b"tQ", integer(0), int_tuple((2,)), int_tuple((1,)), b"\x89",
        call(global_("collections", "OrderedDict")), global_("torch", "float32")) + b"u.",
    "storage-of-a-huge-size": PROTO2 + b"}(" + text("w") + tensor(numel=2**40, shape=(2**40,)) + b"u.",
    "bytes-claiming-a-terabyte": state_dict_with(b"\x8e" + struct.pack("<Q", 1 << 40) + b"abc"),
    "memo-entry-2**31-asks-for-32-GiB": state_dict_with(b"Nr" + struct.pack("<I", 2**31)),
    "truncated-mid-opcode": state_dict_with(integer(1))[:-20],
}


# -- pickles that would run code -------------------------------------------------------------------

@dataclass(frozen=True)
class Trap:
    """A payload that touches ``sentinel`` when fully unpickled; ``inert``: ckptmigrate reads the file
    (the call kept as an inert record), otherwise it refuses it; ``live``: torch.load(weights_only=False)
    really runs it."""

    build: Callable[[str, Path], bytes]
    inert: bool
    live: bool = True


def _touch(sentinel: str) -> str:
    return f"touch {sentinel}"


def _python(sentinel: str) -> str:
    return f"open({sentinel!r}, 'w').close()"


def _getattr_call(module: str, name: str, *args: bytes) -> bytes:
    """``getattr(__import__(module), name)(*args)``: the second REDUCE calls what the first returned."""
    imported = call(global_("builtins", "__import__"), text(module))
    return call(call(global_("builtins", "getattr"), imported, text(name)), *args)


def _inner_file(sentinel: str, here: Path) -> Path:
    """Another checkpoint, loaded by the outer one, whose pickle runs ``os.system``."""
    inner = here / f"inner-{Path(sentinel).name}.pt"
    replace_data_pkl(inner, state_dict_with(call(global_("os", "system"), text(_touch(sentinel)))))
    return inner


def _partial_torch_load(sentinel: str, here: Path) -> bytes:
    """``functools.partial(torch.load, weights_only=False)(inner)``: BUILD sets the keywords."""
    partial = call(global_("functools", "partial"), global_("torch", "load"))
    state = b"(" + global_("torch", "load") + b")}(" + text("weights_only") + b"\x89uNt"
    return partial + state + b"b(" + text(str(_inner_file(sentinel, here))) + b"tR"


TRAPS: dict[str, Trap] = {
    "os.system": Trap(lambda s, h: call(global_("os", "system"), text(_touch(s))), inert=True),
    "posix.system": Trap(lambda s, h: call(global_("posix", "system"), text(_touch(s))), inert=True),
    "builtins.eval": Trap(lambda s, h: call(global_("builtins", "eval"), text(_python(s))), inert=True),
    "__builtin__.eval": Trap(lambda s, h: call(global_("__builtin__", "eval"), text(_python(s))), inert=True),
    "builtins.exec": Trap(lambda s, h: call(global_("builtins", "exec"), text(_python(s))), inert=True),
    "subprocess.Popen": Trap(lambda s, h: call(global_("subprocess", "Popen"),
                                               b"](" + text("touch") + text(s) + b"e"), inert=True),
    "INST-opcode-os.system": Trap(lambda s, h: b"(" + text(_touch(s)) + b"ios\nsystem\n", inert=True),
    "getattr(__import__('os'), 'system')": Trap(
        lambda s, h: _getattr_call("os", "system", text(_touch(s))), inert=False),
    "REDUCE-on-the-result-of-a-REDUCE": Trap(
        lambda s, h: call(call(global_("builtins", "eval"), text("__import__('os').system")), text(_touch(s))),
        inert=False),
    "torch.load-with-pickle_module": Trap(lambda s, h: call(
        global_("torch", "load"), text(str(_inner_file(s, h))), b"N", call(global_("builtins", "__import__"),
                                                                            text("pickle"))), inert=True),
    "functools.partial(torch.load, weights_only=False)": Trap(_partial_torch_load, inert=False),
    "pickle.loads-of-a-nested-pickle": Trap(lambda s, h: call(
        global_("pickle", "loads"), binbytes(PROTO2 + call(global_("os", "system"), text(_touch(s))) + b".")),
        inert=True),
    "torch._tensor._rebuild_from_type_v2(os.system)": Trap(lambda s, h: call(
        global_("torch._tensor", "_rebuild_from_type_v2"), global_("os", "system"), global_("builtins", "object"),
        b"(" + text(_touch(s)) + b"t", b"}"), inert=True),
    "global-from-a-missing-module": Trap(
        lambda s, h: call(global_("ckptmigrate_tests_no_such_module", "run"), text(_touch(s))), inert=True,
        live=False),
}


# -- helpers ---------------------------------------------------------------------------------------

def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` and a digest of its bytes (sparse files: of their size)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            size = path.stat().st_size
            out[str(path.relative_to(directory))] = (
                hashlib.sha256(path.read_bytes()).hexdigest() if size < (16 << 20) else f"{size} bytes"
            )
    return out


def run_cli(cwd: Path, *commands: list[str | Path]) -> list[subprocess.CompletedProcess[str]]:
    """``ckptmigrate COMMAND`` for each command, as real subprocesses running side by side."""
    procs = [subprocess.Popen([sys.executable, "-m", "ckptmigrate", *map(str, command)], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command in commands]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def assert_one_line_error(proc: subprocess.CompletedProcess[str], path: Path, *, code: int = 2) -> str:
    assert proc.returncode == code, (proc.args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    if code == 2:
        assert lines[0].startswith(f"ckptmigrate: error: {path}: "), lines[0]
    else:  # verify: one line per file that failed
        assert lines[0].startswith(f"{path}: FAILED: "), lines[0]
    return lines[0]


def write_chain(directory: Path, scripts: dict[str, str]) -> Path:
    versions = directory / "versions"
    versions.mkdir(parents=True)
    for name, body in scripts.items():
        (versions / name).write_text(body)
    return directory


def script(rev: str, down: str | None, body: str = "pass", head: str = "") -> str:
    return (f'"""Revision {rev}."""\n{head}\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
            f"def upgrade(ckpt):\n    {body}\n")


W_SCHEMA = {"w": {"shape": [6], "dtype": "float32"}}


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    """r0 (base; its schema is the checkpoints': {"w": float32 [6]}) → r1 (rename w → w2)."""
    chain = write_chain(tmp_path / "migrations", {"r0.py": script("r0", None),
                                                  "r1.py": script("r1", "r0", "ckpt.rename('w', 'w2')")})
    (chain / "versions" / "r0.schema.json").write_text(json.dumps(W_SCHEMA))
    return chain


@pytest.fixture
def files(tmp_path: Path) -> Path:
    directory = tmp_path / "files"
    directory.mkdir()
    return directory


# -- broken containers -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(BROKEN_CONTAINERS))
def test_a_broken_container_is_refused_in_one_line_and_nothing_is_written(
    case: str, files: Path, migrations: Path
) -> None:
    path = files / ("hostile.safetensors" if case.startswith("safetensors") else "hostile.pt")
    BROKEN_CONTAINERS[case](path)
    before = snapshot(files)
    inspected, current, stamp, upgrade, verify = run_cli(
        files,
        ["inspect", "--keys", path],
        ["current", path],
        ["stamp", path, "--tag", "a=b", "-o", files / "stamped.pt"],
        ["upgrade", path, "--migrations", migrations],
        ["verify", path],
    )
    lines = [assert_one_line_error(proc, path) for proc in (inspected, stamp, upgrade)]
    if case in ONLY_DATA_PKL_IS_BROKEN:  # `current` reads the directory and the envelope, not data.pkl
        assert (current.returncode, current.stdout, current.stderr) == (0, "unstamped\n", "")
    else:
        lines.append(assert_one_line_error(current, path))
    assert_one_line_error(verify, path, code=1)
    for call_ in (api.inspect, lambda p: ckptmigrate.load(p, migrations=migrations)):
        with pytest.raises(BadInput, match=path.name):
            call_(path)
    assert snapshot(files) == before
    if case == "safetensors-header-of-100-mb":  # refused by its length, not by parsing 100 MB of NULs
        assert all("exceeds the limit of 100,000,000 bytes" in line for line in lines), lines


def test_a_flipped_tensor_byte_is_caught_by_verify_of_a_digest_stamped_file(files: Path, cli: Cli) -> None:
    path = files / "model.pt"
    plain_checkpoint(path)
    api.stamp(path, digest=True)
    assert cli("verify", path).returncode == 0
    flip_byte_in_record(path, "/data/0", at=9)  # inside w's bytes: reading tensors checks no CRC
    before = snapshot(files)
    proc = cli("verify", path)
    line = assert_one_line_error(proc, path, code=1)
    assert "tensor data or layout changed: w" in line and "b" not in line.split("changed: ")[1]
    assert cli("inspect", path).returncode == 0  # the metadata is intact; only the digest can tell
    assert snapshot(files) == before


# -- pickles that nest, share, loop or tamper ------------------------------------------------------

@pytest.mark.parametrize("case", list(BROKEN_PICKLES))
def test_a_hostile_pickle_in_data_pkl_is_refused_without_a_crash(case: str, files: Path, migrations: Path) -> None:
    path = files / "hostile.pt"
    replace_data_pkl(path, BROKEN_PICKLES[case])
    before = snapshot(files)
    procs = run_cli(
        files,
        ["inspect", "--keys", path],
        ["stamp", path, "-o", files / "stamped.pt"],
        ["upgrade", path, "--migrations", migrations],
    )
    for proc in procs:  # a crashed interpreter exits -11 with nothing on stderr
        assert_one_line_error(proc, path)
    with pytest.raises(BadInput, match=path.name):
        api.inspect(path)
    with pytest.raises(BadInput, match=path.name):
        ckptmigrate.load(path, migrations=migrations)
    assert snapshot(files) == before


# -- pickles that would run code -------------------------------------------------------------------

def ran(sentinel: Path) -> bool:
    """Whether a trap's command ran, without waiting: a command spawned by the pickle (Popen forks
    and execs before it returns) is either still a process naming the sentinel or has created it.
    The processes are looked at first, so one that finishes in between has made the file."""
    needle = str(sentinel).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                return True
        except OSError:  # the process ended while we looked
            continue
    return sentinel.exists()


@pytest.mark.parametrize("case", list(TRAPS))
def test_a_pickle_that_runs_code_never_runs_it(case: str, files: Path, migrations: Path, tmp_path: Path) -> None:
    trap = TRAPS[case]
    sentinel = tmp_path / "sentinel"
    path = files / "trapped.pt"
    replace_data_pkl(path, state_dict_with(trap.build(str(sentinel), tmp_path)))
    before = snapshot(files)
    stamped, upgraded = files / "stamped.pt", files / "upgraded.pt"
    inspected, stamp, upgrade = run_cli(
        files,
        ["inspect", "--json", path],
        ["stamp", path, "-o", stamped],
        ["upgrade", path, "-o", upgraded, "--migrations", migrations],
    )
    if trap.inert:
        for proc in (inspected, stamp, upgrade):
            assert proc.returncode == 0, proc.stderr
        assert json.loads(inspected.stdout)["tensors"] == 1
        assert api.inspect(path)["tensors"] == 1
        ckpt = ckptmigrate.load(path, migrations=migrations)
        assert ckpt.applied == ["r1"] and torch.equal(ckpt.state_dict["w2"], torch.arange(6.0))
        ckpt.close()
        # the rewritten files keep the call, as the original had it, and still do not run it
        assert api.inspect(upgraded)["envelope"]["revision"] == "r1"
        assert run_cli(files, ["inspect", stamped])[0].returncode == 0
        new_files = {"stamped.pt", "upgraded.pt"}
    else:
        for proc in (inspected, stamp, upgrade):
            assert_one_line_error(proc, path)
        with pytest.raises(BadInput, match=path.name):
            api.inspect(path)
        with pytest.raises(BadInput, match=path.name):
            ckptmigrate.load(path, migrations=migrations)
        new_files = set()
    after = snapshot(files)
    assert {k: v for k, v in after.items() if k not in new_files} == before
    assert set(after) - set(before) == new_files
    assert not ran(sentinel)


def test_each_trap_is_live_when_the_pickle_is_trusted(files: Path, tmp_path: Path) -> None:
    """The traps are real: torch.load(weights_only=False) runs every one of them, and
    ckptmigrate.load(trust_pickle=True), the explicit opt-in, runs the file's pickle too."""
    sentinels: dict[str, Path] = {}
    for n, (case, trap) in enumerate(TRAPS.items()):
        sentinel = tmp_path / f"sentinel-{n}"
        path = files / f"trap-{n}.pt"
        replace_data_pkl(path, state_dict_with(trap.build(str(sentinel), tmp_path)))
        sentinels[case] = sentinel
    loader = ("import sys, torch\n"
              "for p in sys.argv[1:]:\n"
              "    try:\n"
              "        torch.load(p, weights_only=False)\n"
              "    except BaseException:\n"
              "        pass\n")
    subprocess.run([sys.executable, "-c", loader, *(str(files / f"trap-{n}.pt") for n in range(len(TRAPS)))],
                   cwd=tmp_path, check=True, capture_output=True, timeout=300)
    deadline = time.monotonic() + 10
    live = {case for case, trap in TRAPS.items() if trap.live}
    while time.monotonic() < deadline and not all(sentinels[c].exists() for c in live):
        time.sleep(0.05)
    assert {case for case, sentinel in sentinels.items() if sentinel.exists()} == live

    sentinel = tmp_path / "sentinel-opt-in"
    path = files / "opt-in.pt"
    replace_data_pkl(path, state_dict_with(TRAPS["os.system"].build(str(sentinel), tmp_path)))
    no_migrations = write_chain(tmp_path / "empty-chain", {})
    ckptmigrate.load(path, migrations=no_migrations).close()
    assert not sentinel.exists()
    ckptmigrate.load(path, migrations=no_migrations, trust_pickle=True).close()
    assert sentinel.exists()


# -- broken migration scripts ----------------------------------------------------------------------

BROKEN_CHAINS: dict[str, tuple[dict[str, str], list[str]]] = {
    "syntax error": ({"r0.py": script("r0", None), "r1.py": script("r1", "r0", "ckpt.rename('w', 'w2'")},
                     ["r1.py:", "syntax error in migration script"]),
    "imports a missing module": (
        {"r0.py": script("r0", None), "r1.py": script("r1", "r0", head="import ckptmigrate_tests_missing_module")},
        ["r1.py: importing the migration script raised ModuleNotFoundError", "ckptmigrate_tests_missing_module"]),
    "calls sys.exit on import": (
        {"r0.py": script("r0", None), "r1.py": script("r1", "r0", head="import sys\nsys.exit(3)")},
        ["r1.py: importing the migration script raised SystemExit"]),
    "a cycle": ({"r0.py": script("r0", None), "a.py": script("a", "b"), "b.py": script("b", "a")},
                ["revisions form a cycle", "a.py", "b.py"]),
    "its own parent": ({"r0.py": script("r0", "r0")}, ["revisions form a cycle", "r0.py"]),
    "a tensor of the wrong shape for the next migration": (
        {"r0.py": script("r0", None), "r1.py": script("r1", "r0", "ckpt.state_dict['w'] = torch.ones(5)",
                                                      head="import torch"),
         "r2.py": script("r2", "r1", "ckpt.reshape('w', (2, 3))")},
        ["revision r2 (", "r2.py) upgrade failed in reshape on 'w'", "of shape [5] to [2, 3]"]),
    "a migration that raises": (
        {"r0.py": script("r0", None), "r1.py": script("r1", "r0", "raise KeyError('w')")},
        ["revision r1 (", "r1.py) upgrade raised KeyError"]),
}


@pytest.mark.parametrize("case", list(BROKEN_CHAINS))
def test_a_broken_migration_chain_stops_before_writing(case: str, files: Path, tmp_path: Path) -> None:
    scripts, fragments = BROKEN_CHAINS[case]
    chain = write_chain(tmp_path / "broken", scripts)
    (chain / "versions" / "r0.schema.json").write_text(json.dumps(W_SCHEMA))
    path = files / "model.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    before = snapshot(files)
    in_place, out_of_place = run_cli(files, ["upgrade", path, "--migrations", chain],
                                     ["upgrade", path, "-o", files / "out.pt", "--migrations", chain])
    in_a_script = fragments[0].startswith("revision r")  # else the graph is refused before the file is read
    for proc in (in_place, out_of_place):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc.stderr
        line = proc.stderr.strip()
        assert line.startswith(f"ckptmigrate: error: {path}: " if in_a_script else "ckptmigrate: error: "), line
        for fragment in fragments:
            assert fragment in line, (fragment, line)
    error = MigrationError if in_a_script else BadInput
    with pytest.raises(error) as raised:
        ckptmigrate.load(path, migrations=chain)
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert snapshot(files) == before


def test_a_tensor_of_the_wrong_shape_for_the_model_is_reported_with_the_revision(files: Path, tmp_path: Path) -> None:
    chain = write_chain(tmp_path / "chain", {
        "r0.py": script("r0", None),
        "r1.py": script("r1", "r0", "ckpt.state_dict['w'] = torch.ones(5)", head="import torch"),
    })
    (chain / "versions" / "r0.schema.json").write_text(json.dumps(W_SCHEMA))
    path = files / "model.pt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    before = snapshot(files)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(6))

    model = Model()
    with pytest.raises(BadInput) as raised:
        ckptmigrate.load_state_dict(model, path, migrations=chain)
    message = str(raised.value)
    assert message.startswith(f"{path}: the checkpoint does not fit the model")
    assert "after upgrading through r1" in message and "w: checkpoint [5], model [6]" in message
    assert torch.equal(model.w.detach(), torch.zeros(6))  # nothing was loaded
    assert snapshot(files) == before
