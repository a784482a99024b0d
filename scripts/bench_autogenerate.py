"""CPU time of autogenerate on a large mixture-of-experts refactor: per-expert weights fused.

    .venv/bin/python scripts/bench_autogenerate.py [--layers 48] [--experts 64] [--repeat 3]

The old schema is a Mixtral-like model (``model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight``
and four attention projections per layer; 9,408 keys at the defaults), the new one the same with each
projection's experts stacked into one ``[experts, 32, 64]`` tensor. Schemas only, no tensors: this is
the planning that ``revision --autogenerate`` does. Prints the median CPU seconds of ``generate`` and
the ops it drafted (three ``stack`` ops across all layers).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from ckptmigrate.autogenerate.plan import generate


def entry(*shape: int) -> dict[str, Any]:
    return {"shape": list(shape), "dtype": "float32"}


def schemas(layers: int, experts: int) -> tuple[dict[str, Any], dict[str, Any]]:
    old: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for layer in range(layers):
        for proj in ("q", "k", "v", "o"):
            old[f"model.layers.{layer}.attn.{proj}.weight"] = new[f"model.layers.{layer}.attn.{proj}.weight"] = \
                entry(64, 64)
        for e in range(experts):
            for w in ("w1", "w2", "w3"):
                old[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = entry(32, 64)
        for w in ("w1", "w2", "w3"):
            new[f"model.layers.{layer}.block_sparse_moe.experts.{w}"] = entry(experts, 32, 64)
    return old, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    old, new = schemas(opts.layers, opts.experts)
    times = []
    for _ in range(opts.repeat):
        start = time.process_time()
        steps = generate(old, new)
        times.append(time.process_time() - start)
    print(f"{len(old)} keys -> {len(new)}: {statistics.median(times):.3f} s CPU (median of {opts.repeat})")
    for step in steps:
        print("  " + step.render())


if __name__ == "__main__":
    main()
