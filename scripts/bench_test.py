"""Benchmark ``ckptmigrate test``: wall and CPU time, and fixture sizes, on three chains.

    .venv/bin/python scripts/bench_test.py [--repeat 5] [--json PATH] [--keep DIR]

The chains: the example chain in ``migrations/`` (6 revisions, a fixture each), the Llama example in
``tests/llama_example/`` (2 revisions), and a 10-revision chain built in a temporary directory: the
example chain copied, plus revisions 0007-0010 that each nest the model one module deeper
(``ckpt.rename_prefix("", "v7.")``, ...), each with its fixture recorded from the model as it is at that
revision. With a fixture per revision, ``test`` runs n upgrades (fixture k walks n-k steps) and n-1
walks to head and back, so the work grows with n²; the 10-revision chain measures that, not an
extrapolation.

Each run is a child process, ``python -m ckptmigrate test --json`` (interpreter start-up and the torch
import included: what CI waits for), timed by wall clock; CPU time is the child's user+sys
(``RUSAGE_CHILDREN`` around it); "in check" is the time the command reports for the checks alone
(after its imports). A warm-up run per chain fills the bytecode and page caches first. Medians over
``--repeat`` runs; on a shared machine prefer the CPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

NESTED = '''
"""The example model nested one module deeper per revision after 0006 (v7, v8, ...): the bench chain."""

from torch import nn

from ckptmigrate import example


class Nest(nn.Module):
    def __init__(self, inner: nn.Module, name: str) -> None:
        super().__init__()
        self.name = name
        setattr(self, name, inner)

    def forward(self, x):
        return getattr(self, self.name)(x)


def model_at(era: int) -> nn.Module:
    model = example.model_at(min(era, 6))
    for e in range(7, era + 1):
        model = Nest(model, f"v{e}")
    return model


def head() -> nn.Module:
    return model_at(10)
'''

SCRIPT = '''"""Nest the model under v{era}."""

revision = "{era:04d}"
down_revision = "{prev:04d}"


def upgrade(ckpt):
    ckpt.rename_prefix("", "v{era}.")
'''


def build_ten(workdir: Path) -> Path:
    """The example chain and four nesting revisions, with fixtures, in ``workdir``; returns its migrations."""
    from ckptmigrate.chain import fixtures
    from ckptmigrate.chain.scripts import ScriptDirectory
    from ckptmigrate.checkpoint.envelope import schema_of
    from ckptmigrate.example import example_inputs

    chain = workdir / "migrations"
    shutil.copytree(ROOT / "migrations", chain, ignore=shutil.ignore_patterns("__pycache__"))
    (workdir / "benchmod.py").write_text(textwrap.dedent(NESTED).lstrip())
    sys.path.insert(0, str(workdir))
    import benchmod  # type: ignore[import-not-found]

    for era in range(7, 11):
        script = chain / "versions" / f"{era:04d}_nest_v{era}.py"
        script.write_text(SCRIPT.format(era=era, prev=era - 1))
        schema = schema_of(benchmod.model_at(era).state_dict())
        script.with_suffix(".schema.json").write_text(json.dumps(schema, indent=1) + "\n")
    graph = ScriptDirectory(chain).load()
    for era in range(7, 11):
        fixtures.record(graph, f"{era:04d}", lambda era=era: benchmod.model_at(era), example_inputs)
    return chain


def run(args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """One child ``ckptmigrate test --json``: wall seconds and the command's own figure."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ckptmigrate", "test", "--json", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ckptmigrate test {' '.join(args)} exited {proc.returncode}:\n{err}")
    report = json.loads(out)
    return {"wall": wall, "in_check": report["seconds"], "checks": len(report["results"])}


def timed(args: list[str], cwd: Path, env: dict[str, str], repeat: int) -> dict[str, Any]:
    import resource

    run(args, cwd, env)  # warm-up: bytecode and page caches
    walls, cpus, inside = [], [], []
    checks = 0
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = run(args, cwd, env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(result["wall"])
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        inside.append(result["in_check"])
        checks = result["checks"]
    return {"checks": checks, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "in_check_s": statistics.median(inside), "runs_wall_s": walls, "runs_cpu_s": cpus}


def sizes(chain: Path) -> dict[str, Any]:
    from ckptmigrate.chain.fixtures import FIXTURE_SUFFIX, IO_SUFFIX

    versions = chain / "versions"
    ckpts = [p.stat().st_size for p in sorted(versions.glob("*" + FIXTURE_SUFFIX))]
    ios = [p.stat().st_size for p in sorted(versions.glob("*" + IO_SUFFIX))]
    return {"fixtures": len(ckpts), "checkpoint_bytes": [min(ckpts), max(ckpts)], "io_bytes": [min(ios), max(ios)],
            "total_bytes": sum(ckpts) + sum(ios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="Write every figure here.")
    parser.add_argument("--keep", type=Path, default=None, help="Build the 10-revision chain here and keep it.")
    opts = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                                      os.environ.get("PYTHONPATH")]))}
    workdir = opts.keep or Path(tempfile.mkdtemp(prefix="bench-test-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        ten = build_ten(workdir)
        cases = {
            "example chain (migrations/, 6 revisions)": (
                ["--migrations", str(ROOT / "migrations"), "--model", "ckptmigrate.example:current_model"],
                ROOT, ROOT / "migrations"),
            "Llama example (tests/llama_example/, 2 revisions)": (
                ["--migrations", str(ROOT / "tests/llama_example/migrations"), "--model",
                 "llama_example.models:meta_model"], ROOT / "tests", ROOT / "tests/llama_example/migrations"),
            "10-revision chain (example + 4 nesting revisions)": (
                ["--migrations", str(ten), "--model", "benchmod:head"], workdir, ten),
        }
        figures = {}
        for name, (args, cwd, chain) in cases.items():
            figures[name] = {**timed(args, cwd, env, opts.repeat), **sizes(chain)}
            f = figures[name]
            kb = [round(b / 1000, 1) for b in f["checkpoint_bytes"]]
            io = [round(b / 1000, 1) for b in f["io_bytes"]]
            print(f"{name}: {f['checks']} checks, wall {f['wall_s']:.2f} s, CPU {f['cpu_s']:.2f} s "
                  f"(in check {f['in_check_s']:.2f} s); fixtures {kb[0]}-{kb[1]} KB + inputs/outputs "
                  f"{io[0]}-{io[1]} KB, {f['fixtures']} of them")
        if opts.json:
            opts.json.write_text(json.dumps({"repeat": opts.repeat, "cases": figures}, indent=1) + "\n")
    finally:
        if opts.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
