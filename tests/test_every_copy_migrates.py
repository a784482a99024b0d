"""User story: "my checkpoints hold several copies of the weights — an EMA, the best epoch, an SWA
average, a teacher — and after `ckptmigrate upgrade` every one of them loads into today's model;
`downgrade` gives each back exactly; a copy that cannot follow is an error, never left behind."
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckptmigrate
from ckptmigrate import api, formats
from ckptmigrate.checkpoint.layout import format_location, parse_location
from ckptmigrate.example import IN_FEATURES, current_model, model_at
from tests.conftest import ROOT
from tests.payload_equality import assert_same_payload

EXAMPLE = str(ROOT / "migrations")
Cli = Callable[..., subprocess.CompletedProcess[str]]


def era1_weights(seed: int) -> tuple[nn.Module, OrderedDict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = model_at(1)
    return model, model.state_dict()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def load_into_current(state_dict: Any) -> nn.Module:
    model = current_model()
    model.load_state_dict(state_dict)
    return model


def test_ema_and_best_copies_are_upgraded_recorded_and_walked_back_exactly(tmp_path: Path, cli: Cli) -> None:
    main, sd = era1_weights(0)
    ema, ema_sd = era1_weights(1)
    best, best_sd = era1_weights(2)
    path = tmp_path / "run.pt"
    torch.save({"epoch": 9, "model": sd, "ema_state_dict": ema_sd, "best_state_dict": best_sd}, path)
    original = torch.load(path)

    cli("upgrade", "run.pt", "--migrations", EXAMPLE, check=True)
    upgraded = torch.load(path)
    x = torch.randn(5, IN_FEATURES)
    for key, old in (("model", main), ("ema_state_dict", ema), ("best_state_dict", best)):
        model = load_into_current(upgraded[key])  # strict: every key of today's model, nothing else
        torch.testing.assert_close(outputs(model, x), outputs(old, x), msg=key)
    envelope = formats.read_envelope(path)[1]
    assert envelope is not None and envelope["revision"] == "0006"
    assert envelope["state_dicts"] == ["model", "ema_state_dict", "best_state_dict"]
    info = json.loads(cli("inspect", "run.pt", "--json", check=True).stdout)
    assert info["state_dicts"] == ["model", "ema_state_dict", "best_state_dict"]

    cli("downgrade", "run.pt", "--to", "0001", "-o", "down.pt", "--migrations", EXAMPLE, check=True)
    # every copy back as torch.load returned it, _metadata (DataParallel's root and "module") included
    assert_same_payload(torch.load(tmp_path / "down.pt"), original)


def test_timm_checkpoint_saver_layout_with_its_ema(tmp_path: Path) -> None:
    """The dict timm's ``CheckpointSaver._save`` writes (timm 1.0: ``state_dict``, ``state_dict_ema``
    from ``ModelEmaV3`` unwrapped, the optimizer, ``args`` as an ``argparse.Namespace``, ``saver``).
    timm itself cannot be installed beside the pinned torch here (its torchvision dependency does
    not load), so the same dict is built from torch objects."""
    main, sd = era1_weights(0)
    ema, ema_sd = era1_weights(3)
    optimizer = torch.optim.SGD(main.parameters(), lr=0.1)
    path = tmp_path / "checkpoint-3.pth.tar"
    args = argparse.Namespace(model="examplenet", lr=0.1, model_ema=True)
    torch.save({
        "epoch": 3, "arch": args.model, "optimizer": optimizer.state_dict(), "version": 2, "args": args,
        "state_dict": sd, "state_dict_ema": ema_sd, "metric": 71.5,
        "saver": {"checkpoint_files": [("checkpoint-3.pth.tar", 71.5)], "best_epoch": 3, "best_metric": 71.5,
                  "pending": (3, 71.5)},
    }, path)
    original = torch.load(path, weights_only=False)

    # in memory first: ckptmigrate.load upgrades every copy, the file stays as it was
    before = path.read_bytes()
    ckpt = ckptmigrate.load(path, migrations=EXAMPLE)
    assert [c.location for c in ckpt.copies] == ["state_dict_ema"]
    x = torch.randn(3, IN_FEATURES)
    torch.testing.assert_close(outputs(load_into_current(ckpt.copies[0].state_dict.copy()), x), outputs(ema, x))
    ckpt.close()
    assert path.read_bytes() == before

    api_graph = api.revision_graph(EXAMPLE)
    from ckptmigrate.chain import engine

    engine.migrate_file(path, api_graph, output=tmp_path / "up.pth.tar")
    up = torch.load(tmp_path / "up.pth.tar", weights_only=False)
    torch.testing.assert_close(outputs(load_into_current(up["state_dict_ema"]), x), outputs(ema, x))
    assert up["args"] == args and up["saver"] == original["saver"]
    engine.migrate_file(tmp_path / "up.pth.tar", api_graph, to="0001", output=tmp_path / "down.pth.tar",
                        direction="downgrade")
    assert_same_payload(torch.load(tmp_path / "down.pth.tar", weights_only=False), original)


def test_an_swa_average_under_its_module_prefix_follows(tmp_path: Path, cli: Cli) -> None:
    """``torch.optim.swa_utils.AveragedModel`` stores the model under ``module.`` beside ``n_averaged``."""
    main, sd = era1_weights(0)
    inner = model_at(1).module  # the bare era-1 net: its keys are the state dict's minus DataParallel's
    wrapped = nn.DataParallel(inner)
    swa = torch.optim.swa_utils.AveragedModel(wrapped)
    swa.update_parameters(wrapped)
    path = tmp_path / "swa.pt"
    torch.save({"state_dict": sd, "swa": swa.state_dict()}, path)
    original = torch.load(path)
    assert "n_averaged" in original["swa"] and all(k.startswith("module.module.") for k in list(original["swa"])[1:])

    cli("upgrade", "swa.pt", "--migrations", EXAMPLE, check=True)
    up = torch.load(path)
    assert up["swa"]["n_averaged"] == original["swa"]["n_averaged"]
    averaged = OrderedDict((k.removeprefix("module."), v) for k, v in up["swa"].items() if k != "n_averaged")
    x = torch.randn(4, IN_FEATURES)
    torch.testing.assert_close(outputs(load_into_current(averaged), x), outputs(wrapped, x))
    cli("downgrade", "swa.pt", "--to", "0001", "-o", "down.pt", "--migrations", EXAMPLE, check=True)
    assert_same_payload(torch.load(tmp_path / "down.pt"), original)


def test_a_nested_location_like_chgnet_is_found_named_and_migrated(tmp_path: Path, cli: Cli) -> None:
    _, sd = era1_weights(0)
    _, ema_sd = era1_weights(1)
    path = tmp_path / "chgnet.pt"
    torch.save({"model": {"model_args": {"dim": 32}, "state_dict": sd, "ema": ema_sd}, "epoch": 1}, path)
    original = torch.load(path)
    info = json.loads(cli("inspect", "chgnet.pt", "--json", check=True).stdout)
    assert info["layout"] == "key:model.state_dict"
    assert info["state_dicts"] == ["model.state_dict", "model.ema"]
    for spelling in ("model.state_dict", "model/state_dict"):
        assert api.inspect(path, key=spelling)["layout"] == "key:model.state_dict"

    cli("upgrade", "chgnet.pt", "--key", "model/state_dict", "--migrations", EXAMPLE, check=True)
    up = torch.load(path)
    assert list(up) == ["model", "epoch"] and list(up["model"]) == ["model_args", "state_dict", "ema"]
    load_into_current(up["model"]["state_dict"])
    load_into_current(up["model"]["ema"])
    cli("downgrade", "chgnet.pt", "--to", "0001", "-o", "down.pt", "--migrations", EXAMPLE, check=True)
    assert_same_payload(torch.load(tmp_path / "down.pt"), original)


def test_locations_spell_one_way_everywhere() -> None:
    assert parse_location("model.state_dict") == ("model", "state_dict")
    assert parse_location("model/state_dict") == ("model", "state_dict")
    key = "EMA{'decay': 0.999}"
    assert parse_location(f"callbacks/{key}/ema_state_dict") == ("callbacks", key, "ema_state_dict")
    assert parse_location(r"ema\.v2") == ("ema.v2",)
    for path in [("a",), ("ema.v2",), ("callbacks", key, "ema"), ("x/y", "z"), ("back\\slash",)]:
        assert parse_location(format_location(path)) == path


def test_a_copy_whose_key_holds_a_dot_is_declared_with_an_escape(tmp_path: Path, cli: Cli) -> None:
    _, sd = era1_weights(0)
    _, ema_sd = era1_weights(1)
    path = tmp_path / "dots.pt"
    torch.save({"state_dict": sd, "ema.v2": ema_sd}, path)
    assert api.inspect(path)["state_dicts"] == ["state_dict", r"ema\.v2"]
    cli("upgrade", "dots.pt", "--state-dict", "state_dict", "--state-dict", r"ema\.v2",
        "--migrations", EXAMPLE, check=True)
    load_into_current(torch.load(path)["ema.v2"])


def test_a_dict_that_looks_like_weights_but_does_not_fit_is_an_error_naming_it(tmp_path: Path, cli: Cli) -> None:
    _, sd = era1_weights(0)
    _, ema_sd = era1_weights(1)
    del ema_sd["module.head.bias"]
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": sd, "ema_state_dict": ema_sd}, path)
    before = path.read_bytes()
    info = json.loads(cli("inspect", "bad.pt", "--json", check=True).stdout)  # described, with the warning
    assert info["state_dicts"] == ["state_dict"] and "'ema_state_dict'" in info["state_dict_problems"][0]
    assert "warning     'ema_state_dict'" in cli("inspect", "bad.pt", check=True).stdout
    proc = cli("upgrade", "bad.pt", "--migrations", EXAMPLE)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'ema_state_dict'" in proc.stderr and "module.head.bias" in proc.stderr
    assert "--state-dict" in proc.stderr
    assert path.read_bytes() == before and not (tmp_path / "bad.pt.bak").exists()

    # declaring the state dicts explicitly says which to migrate: the odd one is left as it is, by choice
    cli("upgrade", "bad.pt", "--state-dict", "state_dict", "--migrations", EXAMPLE, check=True)
    up = torch.load(path)
    load_into_current(up["state_dict"])
    assert_same_payload(up["ema_state_dict"], torch.load(tmp_path / "bad.pt.bak")["ema_state_dict"])


def test_state_dicts_declared_in_pyproject(tmp_path: Path, cli: Cli) -> None:
    _, sd = era1_weights(0)
    _, teacher = era1_weights(1)
    path = tmp_path / "distill.pt"
    torch.save({"student": {"weights": sd}, "teacher": {"weights": teacher}, "step": 10}, path)
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.ckptmigrate]\nmigrations = "{EXAMPLE}"\nstate_dicts = ["student.weights", "teacher/weights"]\n'
    )
    cli("upgrade", "distill.pt", "--key", "student.weights", check=True)
    up = torch.load(path)
    load_into_current(up["student"]["weights"])
    load_into_current(up["teacher"]["weights"])
    assert formats.read_envelope(path)[1]["state_dicts"] == ["student.weights", "teacher.weights"]
    # later commands need no --key: the envelope says where the state dict is
    assert api.inspect(path)["layout"] == "key:student.weights"


def test_a_script_that_edits_the_state_dict_directly_cannot_leave_a_copy_behind(tmp_path: Path, cli: Cli) -> None:
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1.py").write_text(
        '"""Base."""\nrevision = "r1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n'
    )
    (versions / "r2.py").write_text(
        '"""Direct edit."""\nrevision = "r2"\ndown_revision = "r1"\n\n\ndef upgrade(ckpt):\n'
        '    ckpt.state_dict["b"] = ckpt.state_dict.pop("a")\n'
    )
    path = tmp_path / "f.pt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "ema": {"a": torch.zeros(2)}}, path)
    before = path.read_bytes()
    proc = cli("upgrade", "f.pt", "--from", "r1", "--migrations", str(tmp_path / "chain"))
    assert proc.returncode == 2
    assert "'ema'" in proc.stderr and "r2" in proc.stderr and "directly" in proc.stderr
    assert path.read_bytes() == before


def test_a_copy_an_earlier_upgrade_left_behind_is_named_with_its_revision_and_can_be_brought_up(
    tmp_path: Path, cli: Cli,
) -> None:
    """What a file upgraded before copies were followed looks like: the state dict at head, the EMA at 0001."""
    _, sd = era1_weights(0)
    ema, ema_sd = era1_weights(1)
    path = tmp_path / "old-upgrade.pt"
    torch.save({"model": sd}, path)
    cli("upgrade", path.name, "--no-backup", "--migrations", EXAMPLE, check=True)
    payload = torch.load(path)
    payload["ema_state_dict"] = ema_sd
    torch.save(payload, path)
    api.stamp(path, revision="0006", migrations=EXAMPLE)

    proc = cli("upgrade", path.name, "--migrations", EXAMPLE)
    assert proc.returncode == 2
    assert "'ema_state_dict'" in proc.stderr and "at revision 0001" in proc.stderr
    cli("upgrade", path.name, "--key", "ema_state_dict", "--state-dict", "ema_state_dict", "--from", "0001",
        "--migrations", EXAMPLE, check=True)
    up = torch.load(path)
    x = torch.randn(3, IN_FEATURES)
    torch.testing.assert_close(outputs(load_into_current(up["ema_state_dict"]), x), outputs(ema, x))
    load_into_current(up["model"])
    assert api.inspect(path)["state_dict_problems"] == []


def test_an_op_that_keeps_every_shape_is_repeated_on_the_copies_too(tmp_path: Path) -> None:
    """A RoPE permutation changes values, not keys or shapes: a copy it skipped would look fine."""
    from ckptmigrate.chain import engine
    from ckptmigrate.chain.scripts import ScriptDirectory

    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "r0.py").write_text(
        '"""Base."""\nrevision = "r0"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n'
    )
    (versions / "r1.py").write_text('"""To Meta\'s RoPE layout."""\nrevision = "r1"\ndown_revision = "r0"\n\n\n'
                                    "def upgrade(ckpt):\n    ckpt.permute_rope('q.weight', n_heads=2, to='meta')\n")
    main = torch.arange(32.0).reshape(8, 4)
    ema = torch.randn(8, 4)
    path = tmp_path / "rope.pt"
    torch.save({"state_dict": {"q.weight": main}, "ema": {"q.weight": ema}}, path)
    graph = ScriptDirectory(tmp_path / "chain").load()
    engine.migrate_file(path, graph, from_rev="r0", output=tmp_path / "up.pt")
    up = torch.load(tmp_path / "up.pt")
    rows = (up["state_dict"]["q.weight"][:, 0] / 4).long()  # where each row of the state dict went
    assert not torch.equal(rows, torch.arange(8))
    assert torch.equal(up["ema"]["q.weight"], ema[rows])
    engine.migrate_file(tmp_path / "up.pt", graph, to="r0", output=tmp_path / "down.pt", direction="downgrade")
    assert_same_payload(torch.load(tmp_path / "down.pt"), torch.load(path))


def test_a_tensor_a_migration_adds_is_each_copys_own(tmp_path: Path) -> None:
    """An EMA updated in place must not drag the state dict along: no storage is shared between copies."""
    from ckptmigrate.chain import engine
    from ckptmigrate.chain.scripts import ScriptDirectory

    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    (versions / "r0.py").write_text(
        '"""B."""\nrevision = "r0"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n    pass\n'
    )
    (versions / "r1.py").write_text('"""A buffer."""\nimport torch\n\nrevision = "r1"\ndown_revision = "r0"\n\n\n'
                                    "def upgrade(ckpt):\n    ckpt.add('scale', torch.ones(3))\n")
    path = tmp_path / "f.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "ema": {"w": torch.ones(2)}}, path)
    engine.migrate_file(path, ScriptDirectory(tmp_path / "chain").load(), from_rev="r0")
    up = torch.load(path)
    up["ema"]["scale"].mul_(0.5)
    assert torch.equal(up["state_dict"]["scale"], torch.ones(3))
