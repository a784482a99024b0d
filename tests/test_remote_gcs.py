"""User story: "Our checkpoints live in Google Cloud Storage: I inspect them, see their revision and
plan an upgrade without downloading them." (Writes: tests/test_remote_gcs_write.py.)

Against a real GCS emulator (gcp-storage-emulator, the JSON API, in memory) on 127.0.0.1 through
gcsfs, as a subprocess CLI. The emulator cannot answer gcsfs's storage-layout probe (a control-plane
API), so that probe is turned off in the environment, as it would be for any emulator.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.objectstores import running_gcs

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def gcs() -> Iterator[tuple[dict[str, str], object]]:
    with running_gcs() as served:
        yield served


def saved(obj: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_objects_in_gcs_are_read_by_range(cli: Cli, gcs: tuple[dict[str, str], object],
                                                         tmp_path: Path) -> None:
    env, bucket = gcs
    torch.manual_seed(0)
    big = saved({f"layers.{i}.weight": torch.randn(256, 1024) for i in range(4)} | {"head.bias": torch.zeros(2)})
    bucket.blob("runs/m.pt").upload_from_string(big)  # type: ignore[attr-defined]
    url = "gs://ckpts/runs/m.pt"
    info = cli("inspect", url, "--json", env=env)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["tensors"] == 5 and summary["path"] == url
    assert 0 < summary["transfer"]["bytes_received"] < len(big) // 8  # the directory and data.pkl, not 4 MiB
    assert cli("current", "gs://ckpts/runs/*.pt", env=env).stdout.strip() == f"{url}: unstamped"

    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, code in (("c1", None, "pass"), ("c2", "c1", "ckpt.rename('head.bias', 'out.bias')")):
        (versions / f"{rev}.py").write_text(f"revision = {rev!r}\ndown_revision = {down!r}\n\n\n"
                                            f"def upgrade(ckpt):\n    {code}\n")
    plan = cli("upgrade", url, "--from", "c1", "--migrations", versions.parent, "--dry-run", env=env)
    assert plan.returncode == 0 and "would upgrade c1 -> c2" in plan.stdout, plan.stdout + plan.stderr
    assert bucket.blob("runs/m.pt").download_as_bytes() == big  # type: ignore[attr-defined]
