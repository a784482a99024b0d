"""A DCP checkpoint written by the real writer from two ranks (gloo on CPU), for the multi-file tests."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch

TWO_RANKS = """
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

def run(rank, out, port, dim):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(8, 6, generator=gen)
    state = {"model": {"enc.weight": distribute_tensor(full, mesh, [Shard(int(dim))]),
                       "enc.bias": torch.arange(6, dtype=torch.float32)},
             "step": 41}
    dcp.save(state, checkpoint_id=out)
    dist.barrier()  # both ranks are done with every collective, and their files are written
    # gloo's teardown (destroy_process_group, or the destructors at exit) can abort a rank with
    # "terminate called without an active exception" on a busy machine: leave without it
    os._exit(0)

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2], sys.argv[3]), nprocs=2)
"""


def write_dcp_two_ranks(directory: Path, tmp_path: Path, dim: int = 0) -> Path:
    """``enc.weight`` sharded along ``dim`` over the two ranks (0: rows, as FSDP2 shards)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    subprocess.run([sys.executable, str(script), str(directory), port, str(dim)], check=True, capture_output=True,
                   timeout=300)
    return directory


def two_rank_tensors() -> dict[str, torch.Tensor]:
    """The full tensors :data:`TWO_RANKS` saves (its ``model``), built from the same seed."""
    gen = torch.Generator().manual_seed(3)
    return {"enc.weight": torch.randn(8, 6, generator=gen), "enc.bias": torch.arange(6, dtype=torch.float32)}
