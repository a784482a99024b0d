"""User story: "the node was preempted while ckptmigrate migrated my sharded model — every reader
still sees the whole old model or the whole new one, never a mix."

A 64 MB Hugging Face sharded checkpoint (4 large shards, written by huggingface_hub) and a DCP
directory of the same tensors (written by ``dcp.save``) are upgraded in place by real ``ckptmigrate``
subprocesses killed with SIGKILL at seeded random moments: anywhere in the run, a while after the
switch's journal appeared (new shards being written), as soon as the new index or ``.metadata`` is
being written, and right after the switch (old shards not yet removed). The HF chain renames every
key (every shard is rewritten, since safetensors keeps names in each shard's header); the DCP chain
transposes the largest tensor (one new ``.distcp``) and renames the rest (``.metadata`` only).

After every kill, the checkpoint is read by the *plain* readers — the index and safetensors, as
transformers reads it; ``dcp.load`` — and must hold exactly the original tensors or exactly the
result's; a backup index, where one is kept, must read as the original. Then the same command is run
to completion: it recovers what the killed run left (the journal says which side of the switch won),
and the directory ends with the result and no journal, temporary, orphaned shard or lock file.

``CKPTMIGRATE_CRASH_SEED`` replays another seed; ``pytest -s`` shows the tally.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from ckptmigrate import formats
from ckptmigrate.formats.hf_sharded import REWRITE_IN_PROGRESS

huggingface_hub = pytest.importorskip("huggingface_hub")

SEED = int(os.environ.get("CKPTMIGRATE_CRASH_SEED", "20261130"))
INDEX = "model.safetensors.index.json"
TALLY: Counter[str] = Counter()
#: (strategy, trials) per series
PLAN = [("any", 4), ("journal+", 3), ("commit-temp", 2), ("switched", 1)]


def big_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    sd = {f"layers.{i}.weight": torch.randn(4 << 20, generator=gen).reshape(-1, 1024) for i in range(4)}
    sd["layers.0.bias"] = torch.randn(1024, generator=gen)
    sd["head.weight"] = torch.randn(16, 1024, generator=gen)
    return sd


def hf_read(directory: Path) -> dict[str, torch.Tensor]:
    """As transformers reads a sharded model: the index, then each shard it names."""
    index = json.loads((directory / INDEX).read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(directory / shard))
    assert set(out) == set(index["weight_map"]), "the index and its shards disagree"
    return out


def dcp_read(directory: Path) -> dict[str, torch.Tensor]:
    """As a trainer resumes: dcp.load into a state dict of the keys its .metadata lists."""
    md = dcp.FileSystemReader(directory).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=directory)
    return state


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if "ckptmigrate-tmp" in n or n.endswith(
        ("-journal", "-headers", ".ckptmigrate-lock", ".part")))


def run(argv: list[str], directory: Path, kill: Callable[[dict[str, float], float], bool] | None) -> dict[str, float]:
    """Run ``argv``, watching the directory for the switch's steps; SIGKILL when ``kill`` says so."""
    commit = directory / (INDEX if (directory / INDEX).exists() else ".metadata")
    inode = commit.stat().st_ino
    phases: dict[str, float] = {}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    start = time.monotonic()
    while proc.poll() is None:
        now = time.monotonic() - start
        names = os.listdir(directory)
        if "journal" not in phases and any(n.endswith("-journal") for n in names):
            phases["journal"] = now
        if "commit-temp" not in phases and any(n.startswith(f".ckptmigrate-tmp-{commit.name}.") for n in names):
            phases["commit-temp"] = now
        try:
            if "switched" not in phases and commit.stat().st_ino != inode:
                phases["switched"] = now
        except FileNotFoundError:
            pass
        if kill is not None and kill(phases, now):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            phases["killed"] = now
            return phases
        time.sleep(0.0005)
    _out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    phases["end"] = time.monotonic() - start
    return phases


Kill = Callable[[dict[str, float], float], bool]


def trigger(strategy: str, calibrated: dict[str, float], rng: random.Random) -> Kill:
    if strategy == "any":
        at = rng.uniform(0.0, calibrated["end"] * 0.9)
        return lambda ph, now: now >= at
    if strategy == "journal+":  # an in-place header rewrite's journal may live too briefly to be seen
        base = calibrated.get("journal", calibrated.get("commit-temp", 0.0))
        after = rng.uniform(0.0, max(calibrated["switched"] - base, 0.0) * 0.9)
        return lambda ph, now: now >= ph.get("journal", base) + after
    return lambda ph, now: strategy in ph


def migrations(tmp: Path, name: str, body: str) -> Path:
    """0001 (where the checkpoints are stamped) then 0002, the change under test."""
    root = tmp / name
    (root / "versions").mkdir(parents=True)
    (root / "versions" / "0001_a.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n')
    (root / "versions" / "0002_b.py").write_text(
        'revision = "0002"\ndown_revision = "0001"\n\n\ndef upgrade(ckpt):\n' + body + "\n")
    return root


def stamp_at_0001(directory: Path) -> None:
    subprocess.run([sys.executable, "-m", "ckptmigrate", "stamp", str(directory), "--revision", "0001"],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("multicrash")
    sd = big_state()
    hf = tmp / "hf"
    hf.mkdir()
    huggingface_hub.save_torch_state_dict(sd, hf, max_shard_size=20_000_000)
    assert len(list(hf.glob("*.safetensors"))) == 4
    dc = tmp / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=dc)
    stamp_at_0001(hf)
    stamp_at_0001(dc)
    renamed = {k.replace("layers.", "blocks."): v for k, v in sd.items()}
    transposed = dict(sd)
    transposed["layers.3.weight"] = sd["layers.3.weight"].t().contiguous()
    transposed = {k.replace("layers.", "blocks."): v for k, v in transposed.items()}
    rename = '    ckpt.rename_regex(r"layers\\.(.*)", r"blocks.\\1")'
    transpose = '    ckpt.transpose("layers.3.weight", 0, 1)\n' + rename
    yield {
        "tmp": tmp, "original": sd,
        "hf-rename": (hf, migrations(tmp, "mig_hf_rename", rename), renamed, hf_read),
        "hf-transpose": (hf, migrations(tmp, "mig_hf_transpose", transpose), transposed, hf_read),
        "dcp-transpose": (dc, migrations(tmp, "mig_dcp", transpose), transposed, dcp_read),
    }
    print(f"\nmulti-file crash safety (seed {SEED}): {TALLY['kills']} SIGKILLs; the checkpoint read as the "
          f"original {TALLY['original']}x, the result {TALLY['result']}x; mixed or unreadable: {TALLY['lost']}; "
          f"runs that finished before their kill: {TALLY['finished']}; in-place header rewrites a plain reader "
          f"refused until the next run recovered them: {TALLY['refused before recovery']}")


#: hf-rename --no-backup rewrites each shard's header in place; with a backup, and for a transpose,
#: new shards are written beside the old; the DCP transpose writes one new .distcp and the .metadata
SERIES = ["hf-rename --no-backup", "hf-rename backup", "hf-transpose --no-backup", "dcp-transpose --no-backup"]


@pytest.mark.parametrize("series", SERIES)
def test_sigkill_during_a_multifile_upgrade_leaves_old_or_new(sources: dict[str, Any], series: str) -> None:
    kind, mode = series.split()
    pristine, mig, result, read = sources[kind]
    original = sources["original"]
    tmp: Path = sources["tmp"]
    work = tmp / f"work-{kind}-{mode.strip('-')}"

    def fresh() -> Path:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(pristine, work)
        return work

    args = [sys.executable, "-m", "ckptmigrate", "upgrade", str(work), "--migrations", str(mig)]
    if mode == "--no-backup":
        args.append("--no-backup")
    calibrated = run(args, fresh(), None)
    assert equal(read(work), result)
    assert leftovers(work) == []
    assert "switched" in calibrated, calibrated

    rng = random.Random(f"{SEED}-{series}")
    for strategy, trials in PLAN:
        for _ in range(trials):
            phases = run(args, fresh(), trigger(strategy, calibrated, rng))
            if "killed" not in phases:
                TALLY["finished"] += 1
            else:
                TALLY["kills"] += 1
            if series == "hf-rename --no-backup":
                try:
                    plain = read(work)
                    mixed = not (equal(plain, original) or equal(plain, result))
                except Exception:  # noqa: BLE001 - the index names the placeholder of a rewrite: refused
                    mixed = True
                TALLY["refused before recovery"] += mixed
                formats.recover(work)  # what the next writer does first, under the lock
            got = read(work)
            outcome = "original" if equal(got, original) else "result" if equal(got, result) else "lost"
            TALLY[outcome] += 1
            assert outcome != "lost", f"{series} killed ({strategy}) at {phases}: neither the original nor the result"
            if mode == "backup" and (work / f"{INDEX}.bak").exists():
                backup = json.loads((work / f"{INDEX}.bak").read_text())
                assert set(backup["weight_map"]) == set(original)
                for shard in set(backup["weight_map"].values()):
                    assert (work / shard).exists(), f"the backup's shard {shard} is gone"
            # the next run recovers what the kill left, and ends with the result and nothing else
            run(args, work, None)
            assert equal(read(work), result)
            assert leftovers(work) == [], (strategy, phases, leftovers(work))
            referenced = _referenced(work)
            stray = [n for n in os.listdir(work) if n not in referenced and not n.startswith(
                (INDEX, ".ckptmigrate-"))]
            assert stray == [], (strategy, phases, stray)


def _referenced(directory: Path) -> set[str]:
    """Every file the checkpoint (and a backup index) names: nothing else may be left."""
    names = {".metadata", INDEX}
    for index in directory.glob(f"{INDEX}*"):
        names |= set(json.loads(index.read_text())["weight_map"].values())
    if (directory / ".metadata").exists():
        md = dcp.FileSystemReader(directory).read_metadata()
        names |= {info.relative_path for info in md.storage_data.values()}
    return names


def test_sigkill_during_a_dcp_compact_loses_nothing(sources: dict[str, Any]) -> None:
    """``compact`` of a DCP directory whose transpose left the old chunk behind: the live chunks go
    to new files (one switch), which then get the old names back by hard links (a second switch).
    Every kill leaves the tensors whole; the next run ends compacted, under the old names (a kill
    between the switches leaves names that say which), with nothing left over."""
    pristine, mig, result, read = sources["dcp-transpose"]
    tmp: Path = sources["tmp"]
    migrated = tmp / "dcp-migrated"
    if not migrated.exists():
        shutil.copytree(pristine, migrated)
        run([sys.executable, "-m", "ckptmigrate", "upgrade", str(migrated), "--migrations", str(mig), "--no-backup"],
            migrated, None)
    work = tmp / "work-dcp-compact"

    def fresh() -> Path:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(migrated, work)
        return work

    def size(directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.glob("*.distcp"))

    args = [sys.executable, "-m", "ckptmigrate", "compact", str(work)]
    calibrated = run(args, fresh(), None)
    assert equal(read(work), result) and leftovers(work) == []
    compacted = size(work)
    names = sorted(p.name for p in work.glob("*.distcp"))
    assert names == sorted(p.name for p in migrated.glob("*.distcp"))  # the names the shard digests record
    assert compacted < size(migrated) - result["blocks.3.weight"].nbytes + 4096
    rng = random.Random(f"{SEED}-dcp-compact")
    for strategy, trials in PLAN:
        for _ in range(trials):
            phases = run(args, fresh(), trigger(strategy, calibrated, rng))
            TALLY["kills" if "killed" in phases else "finished"] += 1
            assert equal(read(work), result), f"compact killed ({strategy}) at {phases}: tensors changed"
            TALLY["result"] += 1
            run(args, work, None)
            assert equal(read(work), result)
            assert leftovers(work) == [], (strategy, phases, leftovers(work))
            assert [n for n in os.listdir(work) if n not in _referenced(work) and not n.startswith(".ckptmigrate-")] \
                == [], (strategy, phases)
            assert size(work) == compacted, (strategy, phases)
            assert sorted(p.name for p in work.glob("*.distcp")) == names, (strategy, phases)


#: (system call, its count in the run) at which the kill lands: each header rewrite (the run's only
#: pwrites), the rename that puts the placeholder index in, and the one that puts the new index in
KILL_POINTS = [("rename", 2), ("pwrite64", 1), ("pwrite64", 2), ("pwrite64", 3), ("pwrite64", 4), ("rename", 3)]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace places the SIGKILL at an exact system call")
def test_sigkill_between_two_shards_header_rewrites(sources: dict[str, Any]) -> None:
    """A rename in place rewrites the four shards' headers one after another, while the index names
    only a placeholder file that does not exist. The kill is placed exactly: strace delivers SIGKILL
    as the process enters the system call (the K-th header ``pwrite``, or a switch of the index).
    Killed between two shards' rewrites, some shards carry the new names and the rest the old — and
    a plain reader refuses the checkpoint, since the index names the placeholder; it never sees an
    index beside a mix. Any tensor it reads from a shard carries a name that belongs to it. The next
    run puts the old headers and the old index back (the original, whole, no journal left), and the
    upgrade then completes."""
    pristine, mig, result, read = sources["hf-rename"]
    original = sources["original"]
    work = sources["tmp"] / "work-between-shards"
    upgrade = [sys.executable, "-m", "ckptmigrate", "upgrade", str(work), "--migrations", str(mig), "--no-backup"]
    shards = sorted(set(json.loads((pristine / INDEX).read_text())["weight_map"].values()))
    for call, k in KILL_POINTS:
        if work.exists():
            shutil.rmtree(work)
        shutil.copytree(pristine, work)
        killed = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={call}",
                                 "-e", f"inject={call}:signal=KILL:when={k}", *upgrade], capture_output=True)
        assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr.decode()[-2000:]
        TALLY["kills"] += 1
        renamed = [s for s in shards if any(key.startswith("blocks.") for key in load_file(work / s))]
        assert renamed == (shards[: k - 1] if call == "pwrite64" else [] if k == 2 else shards), (call, k, renamed)
        named = set(json.loads((work / INDEX).read_text())["weight_map"].values())
        if renamed:
            assert named == {REWRITE_IN_PROGRESS}, f"{call} #{k}: the index names {named} beside a mix of shards"
        if named == {REWRITE_IN_PROGRESS}:
            with pytest.raises(FileNotFoundError, match=REWRITE_IN_PROGRESS):
                read(work)
            TALLY["refused before recovery"] += 1
        else:
            assert equal(read(work), original), f"{call} #{k}: a plain reader did not read the original"
        for shard in shards:
            for key, tensor in load_file(work / shard).items():
                assert torch.equal(tensor, (result if key.startswith("blocks.") else original)[key]), (call, k, key)
        formats.recover(work)  # what the next writer does first, under the lock
        assert equal(read(work), original), f"{call} #{k}: the recovery did not give the original back"
        assert [n for n in leftovers(work) if not n.endswith("-lock")] == []  # the lock goes with the next run
        TALLY["original"] += 1
        run(upgrade, work, None)
        assert equal(read(work), result) and leftovers(work) == []
