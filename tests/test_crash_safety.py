"""User story: "the node running ``ckptmigrate`` was preempted mid-write — my checkpoint is still whole."

A ~200 MB checkpoint (the example model's era-1 state dict plus four large tensors) is rewritten by
``ckptmigrate upgrade`` (in place, keeping a ``.bak``), ``stamp --digest`` (an in-place append),
``downgrade`` and ``compact``, and a rename of a file of 4,000 tensors and an embedded zip (an
in-place append of a tail far larger than the 64 KiB window, holding an end-record signature of its
own), each run as a real subprocess that is killed with SIGKILL at a moment
drawn from a seeded random: anywhere from process start (import, read, migrate), after it took the
lock, while the temporary file is being written, once it is complete (fsync, read-back), and right
after the rename. After every kill the path holds either the complete original or the complete
result — it loads with ``torch.load`` and its tensors equal one or the other, its envelope is the
one or the other, and a recorded digest verifies — and every backup is a bit-identical copy of the
original. Leftovers of killed runs (a temporary file, a lock file) are cleaned up by the next run
that completes, so the directory ends with only the checkpoint and its backups.

``CKPTMIGRATE_CRASH_SEED`` replays another seed; ``pytest -s`` shows the tally.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate import api, formats
from ckptmigrate.example import model_at
from ckptmigrate.release import integrity
from ckptmigrate.storage.atomic import TEMP_PREFIX

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "migrations")
SEED = int(os.environ.get("CKPTMIGRATE_CRASH_SEED", "20240811"))
#: float32 elements of the large tensors: 80 + 56 + 40 + 24 MiB = 200 MiB
BIG = [80, 56, 40, 24]
UPGRADED = ["0002", "0003", "0004", "0005", "0006"]

TALLY: Counter[str] = Counter()


def sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    left = limit if limit is not None else 1 << 62
    with open(path, "rb") as fh:
        while left > 0:
            chunk = fh.read(min(16 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def envelope_of(path: Path) -> dict[str, Any] | None:
    return formats.read_envelope(path)[1]


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, mmap=True, weights_only=True)


def same_tensors(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == w.dtype and got[k].shape == w.shape and torch.equal(got[k], w)
        if isinstance(w, torch.Tensor) else got[k] == w
        for k, w in want.items()
    )


def leftovers(directory: Path) -> list[str]:
    """Temporary files, partial backups and lock files: what a completed run must not leave."""
    return sorted(
        p.name for p in directory.iterdir()
        if p.name.startswith(TEMP_PREFIX) or p.name.endswith((".part", ".ckptmigrate-lock"))
    )


def backups(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".bak"))


def restore(pristine: Path, path: Path) -> None:
    """Put the pristine bytes at ``path`` as a new inode (the old one may be a backup's hard link)."""
    for p in [path, *backups(path)]:
        p.unlink()
    shutil.copyfile(pristine, path)


def holds_flock(pid: int) -> bool:
    """True when process ``pid`` holds (not waits for) an flock: ckptmigrate took its file lock."""
    with open("/proc/locks") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 4 and parts[1] == "FLOCK" and parts[4] == str(pid):
                return True
    return False


def end_record(path: Path) -> bool:
    """The file ends with a zip end-of-directory record (an appended tail is complete)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return os.pread(fh.fileno(), 4, max(size - 22, 0)) == b"PK\x05\x06"


def ckptmigrate(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "ckptmigrate", *map(str, args)]


@dataclass
class Phases:
    """Seconds from process start at which each step of a run was first seen."""

    locked: float | None = None
    temp: float | None = None
    temp_full: float | None = None
    renamed: float | None = None
    grown: float | None = None
    ended: float | None = None
    end: float | None = None


def watch(argv: list[str], cwd: Path, path: Path, *, size: int, full_size: int,
          kill: Callable[[Phases, float], bool] | None = None) -> tuple[Phases, bool, subprocess.Popen[bytes]]:
    """Run ``argv``, watching the lock, the temporary file and the size of ``path``; SIGKILL it as
    soon as ``kill(phases, now)`` says so. Returns the phases seen, whether it was killed, the process."""
    phases = Phases()
    before = set(os.listdir(path.parent))  # temporary files of earlier, killed runs are not this run's
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    start = time.monotonic()
    temp: str | None = None
    temp_inode = -1
    killed = False
    while proc.poll() is None:
        now = time.monotonic() - start
        if phases.locked is None and holds_flock(proc.pid):
            phases.locked = now
        names = [n for n in os.listdir(path.parent) if n.startswith(TEMP_PREFIX) and n.endswith(".part")]
        if temp is None:
            for name in (n for n in names if n not in before):
                try:
                    temp_inode = (path.parent / name).stat().st_ino
                except FileNotFoundError:  # gone already: a backup's copy-on-write probe, say
                    before.add(name)
                    continue
                temp, phases.temp = name, now
                break
        elif temp in names:
            try:
                if phases.temp_full is None and (path.parent / temp).stat().st_size >= full_size:
                    phases.temp_full = now
            except FileNotFoundError:
                pass
        elif phases.renamed is None:
            # the temporary file went away: the write's if it now *is* the path (a rename keeps the
            # inode); otherwise it was another temporary file (the backup's copy-on-write probe, gone
            # or renamed to PATH.bak), and the real one is still to come
            try:
                renamed = path.stat().st_ino == temp_inode
            except FileNotFoundError:
                renamed = False
            if renamed:
                phases.renamed = now
            else:
                before.add(temp)
                temp, phases.temp, phases.temp_full = None, None, None
        try:
            if phases.grown is None and path.stat().st_size != size:
                phases.grown = now
            if phases.grown is not None and phases.ended is None and end_record(path):
                phases.ended = now
        except FileNotFoundError:
            pass
        if kill is not None and kill(phases, now):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.0005)
    proc.wait()
    phases.end = time.monotonic() - start
    return phases, killed, proc


@dataclass
class Series:
    """One command's trials: what the path may hold afterwards and how to tell which it is."""

    name: str
    args: list[str]
    pristine: Path
    sha: str
    size: int
    tensors: dict[str, torch.Tensor]
    envelope: dict[str, Any] | None
    result_tensors: dict[str, torch.Tensor]
    is_result: Callable[[dict[str, Any] | None, Path], bool]
    result_size: int
    phases: Phases
    appends: bool = False
    keeps_backup: bool = False

    def argv(self, path: Path) -> list[str]:
        return ckptmigrate(*[str(path) if a == "PATH" else a for a in self.args])


@dataclass
class Pristine:
    directory: Path
    series: dict[str, Series]
    summary: list[str] = field(default_factory=list)


def big_era1_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = dict(model_at(1).state_dict())
    gen = torch.Generator().manual_seed(1)
    for i, mib in enumerate(BIG):
        sd[f"module.big.{i}.weight"] = torch.randn(mib * 256 * 1024, generator=gen).reshape(-1, 1024)
    return sd


#: Tensors in the file whose in-place rename appends a tail of ~300 KiB, past the 64 KiB in which zip
#: readers look for the end record
MANY = 4000
BASE = '''
revision = "r0"
down_revision = None
lineage = "moe"


def upgrade(ckpt):
    pass
'''
UNWRAP = '''
revision = "r1"
down_revision = "r0"


def upgrade(ckpt):
    ckpt.unwrap("module.")
'''


def many_tensors_and_a_zip() -> dict[str, Any]:
    """Thousands of small tensors and, among them, a code snapshot: a zip with its own end record,
    which lands inside the new ``data.pkl`` while the append is in progress."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("train.py", (2024, 1, 1, 0, 0, 0)), "print('hello')\n")
    sd: dict[str, Any] = {f"module.experts.{i // 8}.w{i % 8}": torch.full((4,), float(i)) for i in range(MANY)}
    sd["code"] = buf.getvalue()
    return sd


def calibrate(directory: Path, name: str, source: Path, args: list[str]) -> tuple[Path, Phases]:
    """Run the command to completion once on a copy of ``source``: its result and when each step came."""
    work = directory / f"calibrate-{name}"
    work.mkdir()
    path = work / "model.pt"
    shutil.copyfile(source, path)
    argv = ckptmigrate(*[str(path) if a == "PATH" else a for a in args])
    phases, _, proc = watch(argv, work, path, size=source.stat().st_size, full_size=source.stat().st_size)
    out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert leftovers(work) == [], leftovers(work)
    result = directory / f"{name}-result.pt"
    os.link(path, result)
    return result, phases


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pristine]:
    """The big checkpoints, and each command's complete result (one run to completion each)."""
    directory = tmp_path_factory.mktemp("crash")
    unstamped = directory / "era1.pt"
    torch.save(big_era1_state_dict(), unstamped)
    stamped = directory / "era1-stamped.pt"  # at 0001 with a digest; the in-place stamp left orphaned bytes
    shutil.copyfile(unstamped, stamped)
    api.stamp(stamped, revision="0001", lineage="example", digest=True, migrations=EXAMPLE)

    def upgraded(env: dict[str, Any] | None, path: Path) -> bool:
        ups = [h["revision"] for h in (env or {}).get("history", []) if h.get("action") == "upgrade"]
        return env is not None and env["revision"] == "0006" and ups == UPGRADED

    def downgraded(env: dict[str, Any] | None, path: Path) -> bool:
        downs = [h["revision"] for h in (env or {}).get("history", []) if h.get("action") == "downgrade"]
        return env is not None and env["revision"] == "0001" and downs == UPGRADED[::-1]

    unwrap = directory / "unwrap" / "versions"
    unwrap.mkdir(parents=True)
    (unwrap / "r0_base.py").write_text(BASE)
    (unwrap / "r1_unwrap.py").write_text(UNWRAP)
    many = directory / "many.pt"
    torch.save(many_tensors_and_a_zip(), many)
    api.stamp(many, revision="r0", lineage="moe", migrations=unwrap.parent)

    def unwrapped(env: dict[str, Any] | None, path: Path) -> bool:
        return env is not None and env["revision"] == "r1"

    def stamped_crash(env: dict[str, Any] | None, path: Path) -> bool:
        return env is not None and env["tags"].get("crash") == "yes" and env.get("digest") is not None

    specs: list[tuple[str, Path, list[str], Callable[[dict[str, Any] | None, Path], bool], bool, bool]] = [
        ("stamp", unstamped, ["stamp", "PATH", "--digest", "--tag", "crash=yes"], stamped_crash, True, False),
        ("upgrade", stamped, ["upgrade", "PATH", "--migrations", EXAMPLE], upgraded, False, True),
        ("compact", stamped, ["compact", "PATH"], lambda env, p: env == envelope_of(stamped), False, False),
        ("rename-many", many, ["upgrade", "PATH", "--no-backup", "--migrations", str(unwrap.parent)],
         unwrapped, True, False),
    ]
    series: dict[str, Series] = {}
    for name, source, args, is_result, appends, keeps_backup in specs:
        result, phases = calibrate(directory, name, source, args)
        series[name] = Series(
            name, args, source, sha256(source), source.stat().st_size, tensors_of(source), envelope_of(source),
            tensors_of(result), is_result, result.stat().st_size, phases, appends, keeps_backup,
        )
        if name == "upgrade":
            down_args = ["downgrade", "PATH", "--to", "0001", "--migrations", EXAMPLE]
            down, down_phases = calibrate(directory, "downgrade", result, down_args)
            series["downgrade"] = Series(
                "downgrade", down_args, result, sha256(result), result.stat().st_size, tensors_of(result),
                envelope_of(result), tensors_of(down), downgraded, down.stat().st_size, down_phases, False, True,
            )
    # the results are what they should be, independently of the tool: a downgrade gives the era-1
    # tensors back, a stamp and a compaction change no tensor
    assert same_tensors(series["downgrade"].result_tensors, series["stamp"].tensors)
    assert same_tensors(series["stamp"].result_tensors, series["stamp"].tensors)
    assert same_tensors(series["compact"].result_tensors, series["compact"].tensors)
    renamed = {k.removeprefix("module."): v for k, v in series["rename-many"].tensors.items()}
    assert same_tensors(series["rename-many"].result_tensors, renamed)
    assert series["compact"].result_size < series["compact"].size
    state = Pristine(directory, series)
    yield state
    total = sum(TALLY[k] for k in ("original", "result"))
    print(f"\ncrash safety (seed {SEED}): {total} SIGKILLs; the path held the original {TALLY['original']}x, "
          f"the result {TALLY['result']}x; lost or half-written files: {TALLY['lost']}; "
          f"runs that ended before their kill (checked too): {TALLY['finished']}")
    for line in state.summary:
        print(line)


#: (strategy, trials) per command: a kill anywhere in the run, a given time after the lock is taken,
#: while the temporary file is written, once it is complete (fsync, read-back), just after the rename,
#: and (stamp, which appends in place) just after the file grew, a while after, and once its new end
#: record is there
PLANS = {
    "upgrade": [("any", 4), ("locked", 2), ("temp", 4), ("temp_full", 1), ("renamed", 2)],
    "downgrade": [("any", 3), ("locked", 1), ("temp", 2), ("temp_full", 1), ("renamed", 2)],
    "stamp": [("any", 5), ("locked", 4), ("grown", 2), ("grown+", 4), ("ended", 2)],
    "compact": [("any", 4), ("locked", 3), ("temp", 4), ("temp_full", 2), ("renamed", 2)],
    "rename-many": [("any", 3), ("locked", 3), ("grown", 3), ("grown+", 6), ("ended", 2)],
}


#: Kill delays are drawn from this share of each window the complete run showed: a later run may be
#: faster (a warm page cache), and one that ends before its kill is checked but does not count.
WINDOW = 0.8


def trigger(strategy: str, series: Series, rng: random.Random) -> Callable[[Phases, float], bool]:
    """When to kill: a delay drawn from the phases the command's complete run showed."""
    cal = series.phases
    assert cal.end is not None and cal.locked is not None
    if strategy == "any":
        at = rng.uniform(0.0, cal.end * WINDOW)
        return lambda ph, now: now >= at
    if strategy == "locked":
        after = rng.uniform(0.0, (cal.end - cal.locked) * WINDOW)
        return lambda ph, now: ph.locked is not None and now >= ph.locked + after
    if strategy == "temp":
        assert cal.temp is not None and cal.renamed is not None
        after = rng.uniform(0.0, (cal.renamed - cal.temp) * WINDOW)
        return lambda ph, now: ph.temp is not None and now >= ph.temp + after
    if strategy == "grown+":  # the appended tail: its fsync, the end record, the read-back
        assert cal.grown is not None
        after = rng.uniform(0.0, (cal.end - cal.grown) * 1.2)
        return lambda ph, now: ph.grown is not None and now >= ph.grown + after
    return lambda ph, now: getattr(ph, strategy) is not None


def check_outcome(series: Series, path: Path, hashes: dict[tuple[int, int, int, int], str]) -> str:
    """'original' or 'result'; fails on anything else (a lost, partial or mixed file, a bad backup)."""

    def digest(p: Path, limit: int | None = None) -> str:
        st = p.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns, limit or 0)
        if key not in hashes:
            hashes[key] = sha256(p, limit)
        return hashes[key]

    assert path.exists(), f"{series.name}: {path} is gone"
    for bak in backups(path):
        assert not bak.name.endswith(".part"), f"{series.name}: partial backup {bak.name}"
        assert digest(bak) == series.sha, f"{series.name}: backup {bak.name} is not a copy of the original"
    env = envelope_of(path)
    size = path.stat().st_size
    original = size == series.size and digest(path) == series.sha
    if not original and series.appends and size > series.size:
        # an interrupted append: the original bytes are all there, followed by a tail no reader sees
        original = digest(path, series.size) == series.sha and env == series.envelope
    if original:
        assert same_tensors(tensors_of(path), series.tensors), f"{series.name}: original does not load as before"
        outcome = "original"
    else:
        assert series.is_result(env, path), f"{series.name}: {path} is neither the original nor the result"
        assert same_tensors(tensors_of(path), series.result_tensors), f"{series.name}: result tensors differ"
        if series.name == "compact":
            assert size == series.result_size
        outcome = "result"
    if env is not None and env.get("digest") is not None:
        verified = integrity.verify(path)
        assert verified.ok, f"{series.name} ({outcome}): {verified.problems}"
    if series.keeps_backup and outcome == "result":
        assert backups(path), f"{series.name}: the result has no backup of the original"
    return outcome


@pytest.mark.parametrize("command", list(PLANS))
def test_sigkill_leaves_the_original_or_the_result(pristine: Pristine, command: str) -> None:
    series = pristine.series[command]
    rng = random.Random(f"{SEED}-{command}")
    plan = [s for s, n in PLANS[command] for _ in range(n)]
    rng.shuffle(plan)
    work = pristine.directory / f"trials-{command}"
    work.mkdir()
    path = work / "model.pt"
    shutil.copyfile(series.pristine, path)
    outcomes: Counter[str] = Counter()
    completions = finished = 0
    began = time.monotonic()
    trial = 0
    ended_first: Counter[str] = Counter()
    while sum(outcomes.values()) < len(plan):  # a run that ends before its kill is checked, not counted
        assert finished <= len(plan), f"{command}: these runs ended before they could be killed: {ended_first}"
        strategy = plan[trial % len(plan)]
        restore(series.pristine, path)  # leftovers of earlier kills stay: later runs must cope
        hashes: dict[tuple[int, int, int, int], str] = {}
        _, killed, proc = watch(series.argv(path), work, path, size=series.size, full_size=series.result_size,
                                kill=trigger(strategy, series, rng))
        _, err = proc.communicate()
        if not killed:
            assert proc.returncode == 0, err.decode()
        try:
            outcome = check_outcome(series, path, hashes)
        except AssertionError:
            TALLY["lost"] += 1
            raise
        if killed:
            outcomes[outcome] += 1
            TALLY[outcome] += 1
        else:
            finished += 1
            ended_first[strategy] += 1
            TALLY["finished"] += 1
        trial += 1
        if trial % 4 == 0 or sum(outcomes.values()) == len(plan):
            # the next run completes: it leaves the result, and no temporary or lock file
            done = subprocess.run(series.argv(path), cwd=work, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            assert "Traceback" not in done.stderr
            assert check_outcome(series, path, hashes) == "result"
            assert leftovers(work) == [], f"{command}: left behind after a completed run: {leftovers(work)}"
            completions += 1
    if command in ("stamp", "compact"):
        verify = subprocess.run(ckptmigrate("verify", path), cwd=work, capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    pristine.summary.append(
        f"  {command:9} {len(plan)} kills: original={outcomes['original']} result={outcomes['result']}; "
        f"{finished} runs ended before their kill; {completions} completed re-runs; "
        f"{time.monotonic() - began:.0f} s"
    )
    print(pristine.summary[-1])
    # the kills straddle the commit on a slow machine; on a fast one every kill may land before it, and
    # the result is then what the completed re-runs were checked to leave
    assert outcomes["original"] >= 1 and (outcomes["result"] >= 1 or completions >= 1), (outcomes, completions)


def test_the_watcher_follows_the_write_not_the_backups_copy_on_write_probe(tmp_path: Path) -> None:
    """An in-place write first tries a copy-on-write clone for its backup through a temporary file of
    its own (empty and removed again on ext4); the watcher must not take it for the write's."""
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    writer = (
        "import os, sys, time\n"
        "d, prefix = sys.argv[1], sys.argv[2]\n"
        "probe = os.path.join(d, prefix + 'model.pt.00000000.part')\n"
        "open(probe, 'wb').close(); time.sleep(0.3); os.unlink(probe)\n"
        "real = os.path.join(d, prefix + 'model.pt.11111111.part')\n"
        "with open(real, 'wb') as fh: fh.write(b'new' * 1000)\n"
        "time.sleep(0.3); os.replace(real, os.path.join(d, 'model.pt')); time.sleep(0.3)\n"
    )
    phases, killed, proc = watch([sys.executable, "-c", writer, str(tmp_path), TEMP_PREFIX], tmp_path, path,
                                 size=3, full_size=3000)
    assert proc.returncode == 0 and not killed
    assert phases.temp is not None and phases.temp_full is not None and phases.renamed is not None
    assert phases.temp <= phases.temp_full <= phases.renamed
    assert path.read_bytes() == b"new" * 1000
