"""Fuzzing the command line: whatever file, envelope, manifest, key, config or argument a user hands
``ckptmigrate``, it works (exit 0), reports a failed check (exit 1), or says what is wrong (exit 2) —
never a traceback, never another exit code, never a hang.

Every command runs as a real subprocess on real files in a fresh directory. The inputs are
hypothesis-generated: real checkpoints (torch zip, legacy, safetensors, a pickled module, a
Lightning-style dict, non-string keys; stamped with a digest) with bytes flipped, truncated or
overwritten by "interesting" integers, or with one envelope field (top level or inside a history
entry) replaced by arbitrary JSON — lone surrogates and 100-deep nesting included; arbitrary
``[tool.ckptmigrate]`` values under the chain commands; mutated release manifests and key files
under ``verify``; arbitrary text, undecodable bytes included, as ``--tag``, ``--revision``,
``--lineage`` and ``--key``.

``CKPTMIGRATE_CLI_FUZZ_EXAMPLES`` sets the examples per test (default 10, about a minute in all on
two cores: each example starts Python); with ``CI`` set the run is derandomized. Long run:
``CKPTMIGRATE_CLI_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest -q tests/test_fuzz_cli.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckptmigrate import api, formats
from ckptmigrate.example import model_at
from ckptmigrate.formats import torchzip
from ckptmigrate.release.manifest import stamp_release

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "migrations")
EXAMPLES = int(os.environ.get("CKPTMIGRATE_CLI_FUZZ_EXAMPLES", "10"))
IN_CI = bool(os.environ.get("CI"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=IN_CI, database=None if IN_CI else settings().database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)

# -- what a clean outcome is -----------------------------------------------------------------------


def ckptmigrate(*args: str | bytes | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv: list[Any] = [sys.executable, "-m", "ckptmigrate"]
    argv += [a if isinstance(a, bytes) else str(a) for a in args]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=120,
                          stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, f"{args!r}:\n{proc.stderr}"
    assert proc.returncode in (0, 1, 2), f"{args!r} exited {proc.returncode}:\n{proc.stderr}"
    if proc.returncode == 2:
        assert "error" in proc.stderr.lower(), f"{args!r}: exit 2 without an error line:\n{proc.stderr}"
    return proc


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory per example (hypothesis runs many examples in one test call)."""

    class Dirs:
        def __iter__(self) -> Iterator[Path]:
            return self

        def __next__(self) -> Path:
            return Path(tempfile.mkdtemp(prefix="ckptmigrate-clifuzz-", dir=base))

    base = tempfile.mkdtemp(prefix="ckptmigrate-clifuzz-")
    yield Dirs()  # type: ignore[misc]
    shutil.rmtree(base, ignore_errors=True)


# -- the seeds -------------------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model_at(2).state_dict().items()}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seeds")
    sd = _state()
    files = {
        "zip": d / "zip.pt", "legacy": d / "legacy.pt", "safetensors": d / "st.safetensors",
        "module": d / "module.pt", "lightning": d / "lightning.ckpt", "odd_keys": d / "odd.pt",
    }
    torch.save(sd, files["zip"])
    torch.save(sd, files["legacy"], _use_new_zipfile_serialization=False)
    save_file(sd, files["safetensors"])
    torch.save(torch.nn.Linear(3, 2), files["module"])
    opt = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    torch.save({"state_dict": sd, "optimizer_states": [opt.state_dict()], "epoch": 3}, files["lightning"])
    torch.save({0: torch.ones(2), (1, "b"): torch.zeros(3)}, files["odd_keys"])
    for name in ("zip", "legacy", "safetensors", "lightning", "odd_keys"):
        api.stamp(files[name], revision="0002" if name != "odd_keys" else None, lineage="example", digest=True,
                  tags={"seed": name})
    api.stamp(files["module"], tags={"seed": "module"})
    return files


SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc80=x"])
TEXT = st.one_of(st.text(max_size=12), SURROGATES)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=10,
)
DEEP = st.integers(60, 120).map(lambda n: json.loads("[" * n + "]" * n))
FIELDS = ["schema", "arch_hash", "layout", "devices", "torch", "python", "git", "lineage", "revision", "history",
          "tags", "created_at", "format_version", "digest", "signature"]
ENTRY_FIELDS = ["action", "revision", "from", "to", "inverse", "ops", "tags", "superseded", "digest"]
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def envelope_change(draw: st.DrawFn) -> tuple[str, Any]:
    value = draw(st.one_of(JSON, DEEP))
    if draw(st.booleans()):
        return draw(st.sampled_from(FIELDS)), value
    return f"history.{draw(st.sampled_from(ENTRY_FIELDS))}", value


def rewrite_envelope(seed: Path, dest: Path, field: str, value: Any) -> None:
    """``seed`` with one envelope field replaced, written the way ckptmigrate writes envelopes."""
    env = formats.read_envelope(seed)[1]
    assert env is not None
    if field.startswith("history."):
        env["history"] = [dict(env["history"][0], **{field.split(".", 1)[1]: value})]
    else:
        env[field] = value
    text = json.dumps(env)  # surrogates become \\ud800 escapes: valid JSON, as a hostile file would hold
    if seed.suffix == ".safetensors":
        from safetensors.torch import load_file

        save_file(load_file(seed), dest, metadata={"ckptmigrate": text})
        return
    payload = torch.load(seed, weights_only=True)
    with open(dest, "w+b") as fh:
        torch.save(payload, fh)
        fh.flush()
        torchzip.append_records(fh, {torchzip.ENVELOPE_RECORD: text.encode()})


@st.composite
def byte_change(draw: st.DrawFn) -> list[tuple[str, float, int]]:
    kinds = st.sampled_from(["flip", "truncate", "int32", "int64"])
    return draw(st.lists(st.tuples(kinds, st.floats(0, 1, exclude_max=True), st.sampled_from(INTERESTING)),
                         min_size=1, max_size=3))


def mutate_bytes(data: bytes, changes: list[tuple[str, float, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in changes:
        at = int(where * len(out)) if out else 0
        if kind == "flip" and out:
            out[at] ^= 1 << (value % 8)
        elif kind == "truncate":
            del out[at:]
        elif kind == "int32":
            out[at:at + 4] = value.to_bytes(4, "little")
        elif kind == "int64":
            out[at:at + 8] = value.to_bytes(8, "little")
    return bytes(out)


FILE_COMMANDS: list[tuple[str, ...]] = [
    ("inspect",), ("inspect", "--keys"), ("inspect", "--json", "--keys"), ("current", "--migrations", EXAMPLE),
    ("stamp", "--tag", "k=v"), ("stamp", "--digest"), ("compact",), ("upgrade", "--migrations", EXAMPLE),
    ("upgrade", "--migrations", EXAMPLE, "--dry-run"), ("downgrade", "--migrations", EXAMPLE, "--to", "base"),
    ("verify",), ("diff", "--migrations", EXAMPLE, "0002"),
]


# -- the fuzz tests --------------------------------------------------------------------------------


@FUZZ
@given(
    seed=st.sampled_from(["zip", "legacy", "safetensors", "module", "lightning", "odd_keys"]),
    change=st.one_of(envelope_change(), byte_change()),
    command=st.sampled_from(FILE_COMMANDS),
)
def test_any_checkpoint_through_any_file_command(
    seeds: dict[str, Path], workdir: Iterator[Path], seed: str, change: Any, command: tuple[str, ...]
) -> None:
    here = next(workdir)
    source = seeds[seed]
    path = here / source.name
    if isinstance(change, tuple) and source.suffix != ".ckpt" and seed not in ("legacy", "module"):
        rewrite_envelope(source, path, *change)
    else:
        path.write_bytes(mutate_bytes(source.read_bytes(), change if isinstance(change, list) else [("flip", 0.5, 1)]))
    ckptmigrate(command[0], path, *command[1:], cwd=here)


@FUZZ
@given(
    key=st.sampled_from(["migrations", "model"]), value=JSON,
    command=st.sampled_from([("heads",), ("history",), ("check",), ("revision", "-m", "x"), ("current", "m.pt"),
                             ("upgrade", "m.pt", "--dry-run"), ("diff", "m.pt", "model")]),
)
def test_any_project_config_through_the_chain_commands(
    seeds: dict[str, Path], workdir: Iterator[Path], key: str, value: Any, command: tuple[str, ...]
) -> None:
    here = next(workdir)
    shutil.copyfile(seeds["zip"], here / "m.pt")
    shutil.copytree(EXAMPLE, here / "migrations")
    other = "model" if key == "migrations" else "migrations"
    fixed = 'migrations = "migrations"' if other == "migrations" else 'model = "ckptmigrate.example:current_model"'
    (here / "pyproject.toml").write_text(f"[tool.ckptmigrate]\n{key} = {json.dumps(value)}\n{fixed}\n",
                                         errors="surrogateescape")
    ckptmigrate(*command, cwd=here)


@FUZZ
@given(
    target=st.sampled_from(["manifest", "key"]),
    change=st.one_of(byte_change(), st.tuples(st.sampled_from(["files", "format_version", "signature", "release",
                                                               "file", "digest", "revision"]), JSON)),
)
def test_any_manifest_or_key_file_through_verify(
    seeds: dict[str, Path], workdir: Iterator[Path], target: str, change: Any
) -> None:
    here = next(workdir)
    shutil.copyfile(seeds["zip"], here / "m.pt")
    private, public = here / "release.pem", here / "release.pub"
    ckptmigrate("keygen", private, public, cwd=here)
    manifest = here / "MANIFEST.json"
    stamp_release([here / "m.pt"], "1.0", manifest=manifest, sign=private, allow_dirty=True)
    victim = manifest if target == "manifest" else public
    if isinstance(change, list):
        victim.write_bytes(mutate_bytes(victim.read_bytes(), change))
    else:
        field, value = change
        doc = json.loads(manifest.read_text())
        if field in ("file", "digest", "revision"):
            doc["files"][0][field] = value
        else:
            doc[field] = value
        manifest.write_text(json.dumps(doc))
    ckptmigrate("verify", "--manifest", manifest, "--public-key", public, cwd=here)


ARGUMENT = st.one_of(st.text(max_size=20), st.binary(max_size=12).filter(lambda b: b"\0" not in b))


@FUZZ
@given(option=st.sampled_from(["--tag", "--revision", "--lineage", "--key", "--release", "--repo"]), value=ARGUMENT)
def test_any_argument_text(seeds: dict[str, Path], workdir: Iterator[Path], option: str, value: str | bytes) -> None:
    here = next(workdir)
    shutil.copyfile(seeds["zip"], here / "m.pt")
    if isinstance(value, str) and "\0" in value:
        value = value.replace("\0", "")
    arg: str | bytes = value
    if option == "--tag":
        arg = b"k=" + value if isinstance(value, bytes) else f"k={value}"
    extra = ["--allow-dirty"] if option == "--release" else []
    ckptmigrate("stamp", "m.pt", option, arg, *extra, cwd=here)
    ckptmigrate("inspect", "m.pt", cwd=here)
