"""User story: "the model code renamed a module since my FSDP run saved step 41; resume on 2 ranks
from that DCP checkpoint as it is, without rewriting it."

Two ranks (torch.multiprocessing + gloo, CPU) save a DCP checkpoint with a weight sharded as a
DTensor; two new ranks, whose model calls it ``encoder.*``, load it through
``ckptmigrate.dcp.load(state_dict, checkpoint_id=DIR, migrations=...)``: the rename is a key
translation (DCP reads each rank's chunks under the old name, resharding as it does), a changed
tensor (``map``) is computed and copied into each rank's shard, and no file of the checkpoint
changes.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import torch

SAVE = """
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

def run(rank, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(8, 6, generator=gen)
    bias = torch.randn(6, 4, generator=gen)
    state = {"model": {"enc.weight": distribute_tensor(full, mesh, [Shard(0)]),
                       "enc.bias": distribute_tensor(bias, mesh, [Shard(0)])},
             "step": 41}
    dcp.save(state, checkpoint_id=out)
    dist.barrier()  # both ranks are done with every collective, and their files are written
    # gloo's teardown (destroy_process_group, or the destructors at exit) can abort a rank with
    # "terminate called without an active exception" on a busy machine: leave without it
    os._exit(0)

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""

RESUME = """
import os, sys, torch, torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
import ckptmigrate

def run(rank, ckpt, mig, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    state = {"model": {"encoder.weight": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(0)]),
                       "encoder.bias": distribute_tensor(torch.zeros(4, 6), mesh, [Shard(0)])},
             "step": 0}
    applied = ckptmigrate.dcp.load(state, checkpoint_id=ckpt, migrations=mig, from_rev="base")
    full = {k: v.full_tensor() for k, v in state["model"].items()}
    torch.save({"applied": applied, "step": state["step"], "model": full,
                "local": state["model"]["encoder.weight"].to_local().shape[0]}, f"{out}.{rank}")
    dist.barrier()  # both ranks are done with every collective, and their files are written
    # gloo's teardown (destroy_process_group, or the destructors at exit) can abort a rank with
    # "terminate called without an active exception" on a busy machine: leave without it
    os._exit(0)

if __name__ == "__main__":
    mp.spawn(run, args=tuple(sys.argv[1:5]), nprocs=2)
"""


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_resume_two_ranks_across_a_rename_without_rewriting(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-41"
    (tmp_path / "save.py").write_text(SAVE)
    subprocess.run([sys.executable, str(tmp_path / "save.py"), str(ckpt), free_port()],
                   check=True, capture_output=True, timeout=300)
    mig = tmp_path / "mig"
    (mig / "versions").mkdir(parents=True)
    (mig / "versions" / "0001_encoder.py").write_text(
        'revision = "0001"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
        '    ckpt.rename("enc.weight", "encoder.weight")\n'
        '    ckpt.transpose("enc.bias", 0, 1)\n'
        '    ckpt.rename("enc.bias", "encoder.bias")\n')
    before = hashes(ckpt)

    (tmp_path / "resume.py").write_text(RESUME)
    proc = subprocess.run([sys.executable, str(tmp_path / "resume.py"), str(ckpt), str(mig), str(tmp_path / "out"),
                           free_port()], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 6, generator=gen)
    bias = torch.randn(6, 4, generator=gen)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert got["applied"] == ["0001"]
        assert got["step"] == 41
        assert got["local"] == 4
        assert torch.equal(got["model"]["encoder.weight"], weight)
        assert torch.equal(got["model"]["encoder.bias"], bias.t())
    assert hashes(ckpt) == before
