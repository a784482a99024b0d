"""User story: "ckptmigrate finds the weights in the files real training code writes, and once I have
told it where they are, every later command remembers."
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ckptmigrate import api
from ckptmigrate.example import current_model, model_at
from tests.conftest import ROOT

EXAMPLE = str(ROOT / "migrations")
Cli = Callable[..., subprocess.CompletedProcess[str]]


def imagenet_example_checkpoint(path: Path) -> nn.Module:
    """What pytorch/examples imagenet/main.py's ``save_checkpoint`` writes: the model under
    DataParallel, ``best_acc1`` a tensor (``accuracy()`` returns tensors), optimizer and scheduler."""
    torch.manual_seed(0)
    model = model_at(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    torch.save({
        "epoch": 5, "arch": "examplenet", "state_dict": model.state_dict(),
        "best_acc1": torch.tensor(71.3), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
    }, path)
    return model


def test_a_tensor_beside_state_dict_does_not_make_a_bare_state_dict(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "checkpoint.pth.tar"
    model = imagenet_example_checkpoint(path)
    info = json.loads(cli("inspect", path.name, "--json", check=True).stdout)
    assert info["layout"] == "key:state_dict"
    assert info["tensors"] == len(model.state_dict())
    assert "best_acc1" in info["extras"]

    cli("upgrade", path.name, "--migrations", EXAMPLE, check=True)
    up = torch.load(path)
    current_model().load_state_dict(up["state_dict"])
    assert torch.equal(up["best_acc1"], torch.tensor(71.3)) and up["epoch"] == 5


def gan_checkpoint(path: Path) -> None:
    """Two state dicts of different models and no wrapper key: only the user knows which is "the" model."""
    torch.manual_seed(0)
    generator = model_at(1)
    discriminator = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Conv1d(4, 1, 3))
    torch.save({"gen": generator.state_dict(), "disc": discriminator.state_dict(), "step": 100}, path)


def test_the_location_given_once_is_used_by_every_later_command(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "gan.pt"
    gan_checkpoint(path)
    before = path.read_bytes()
    proc = cli("inspect", "gan.pt")
    assert proc.returncode == 2 and "--key" in proc.stderr and "gen" in proc.stderr
    assert path.read_bytes() == before

    proc = cli("stamp", "gan.pt", "--key", "gen", "--json", "--digest")
    assert proc.returncode == 0, proc.stderr  # not: modified, then exit 2
    assert json.loads(proc.stdout)["layout"] == "key:gen"

    info = json.loads(cli("inspect", "gan.pt", "--json", check=True).stdout)
    assert info["layout"] == "key:gen"
    assert api.inspect(path)["layout"] == "key:gen"
    cli("verify", "gan.pt", check=True)
    cli("upgrade", "gan.pt", "--from", "0001", "--migrations", EXAMPLE, check=True)
    up = torch.load(path)
    current_model().load_state_dict(up["gen"])
    assert list(up["disc"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_key_that_is_not_there_is_one_line_and_changes_nothing(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "gan.pt"
    gan_checkpoint(path)
    before = path.read_bytes()
    for command in (("stamp", "gan.pt", "--key", "generator", "--json"),
                    ("upgrade", "gan.pt", "--key", "gen.weights", "--migrations", EXAMPLE)):
        proc = cli(*command)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "gan.pt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert path.read_bytes() == before


def test_a_file_an_older_version_stamped_as_bare_is_read_right(tmp_path: Path) -> None:
    """Older detection called the ImageNet layout a one-tensor bare state dict and recorded that."""
    from ckptmigrate import formats
    from ckptmigrate.formats import torchzip

    path = tmp_path / "checkpoint.pth.tar"
    model = imagenet_example_checkpoint(path)
    api.stamp(path, output=tmp_path / "stamped.pth.tar")
    envelope = formats.read_envelope(tmp_path / "stamped.pth.tar")[1]
    assert envelope is not None
    envelope["layout"] = "bare"  # as the older version wrote it
    with path.open("r+b") as fh:
        torchzip.append_records(fh, {torchzip.ENVELOPE_RECORD: torchzip.envelope_bytes(envelope)})
    info = api.inspect(path)
    assert info["envelope"]["layout"] == "bare"
    assert info["layout"] == "key:state_dict" and info["tensors"] == len(model.state_dict())
