"""User story: "inspect's totals of a file of many tensors are torch's own" — counted in C loops
when every tensor has its own storage, the careful way when views share one (tied weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def torch_totals(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    """What torch says: elements, bytes (each shared view counted once), tensors per dtype, devices."""
    dtypes: dict[str, int] = {}
    for t in sd.values():
        name = str(t.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    views = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype): t
             for t in sd.values()}
    return {"tensors": len(sd), "parameters": sum(t.numel() for t in sd.values()),
            "bytes": sum(t.numel() * t.element_size() for t in views.values()), "dtypes": dtypes,
            "devices": ["cpu"]}


def inspected(path: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "ckptmigrate", "inspect", str(path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    return {k: info[k] for k in ("tensors", "parameters", "bytes", "dtypes", "devices")}


def test_many_tensors_each_with_its_own_storage(tmp_path: Path) -> None:
    kinds = [torch.float32, torch.bfloat16, torch.int64, torch.bool]
    sd = {f"m.{i}.w": torch.zeros((i % 5, 3)[: i % 3], dtype=kinds[i % 4]) for i in range(3000)}
    torch.save(sd, tmp_path / "many.pt")
    assert inspected(tmp_path / "many.pt") == torch_totals(sd)


def test_many_tensors_with_tied_weights_and_views(tmp_path: Path) -> None:
    base = torch.arange(600, dtype=torch.float16)
    sd = {f"m.{i}.w": torch.ones(i % 7 + 1) for i in range(2000)}
    sd.update({"tied.a": base, "tied.b": base, "view.c": base[10:20], "view.d": base[10:20].view(2, 5)})
    torch.save(sd, tmp_path / "tied.pt")
    assert inspected(tmp_path / "tied.pt") == torch_totals(sd)


def test_many_tensors_of_one_dtype(tmp_path: Path) -> None:
    sd = {f"m.{i}.w": torch.zeros((i % 6, 2, i % 4), dtype=torch.bfloat16) for i in range(1500)}
    torch.save(sd, tmp_path / "one.pt")
    assert inspected(tmp_path / "one.pt") == torch_totals(sd)
