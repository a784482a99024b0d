"""A user loads checkpoints from every era of the example model into today's model.

They never run `ckptmigrate upgrade`: `load_state_dict`, `load` and `attach` upgrade in memory,
leave the file alone, and when something does not fit, say so in a few grouped lines.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import ckptmigrate
from ckptmigrate.errors import BadInput
from ckptmigrate.example import ERAS, ExampleNet, current_model, model_at
from ckptmigrate.util.keygroups import group_keys
from tests.conftest import LPIPS, ROOT

MIGRATIONS = str(ROOT / "migrations")


def _save_era(era: int, path: Path, *, stamped: bool) -> torch.nn.Module:
    torch.manual_seed(era)
    model = model_at(era)
    if stamped:
        ckptmigrate.stamp(_plain_save(model, path), revision=ERAS[era], lineage="example")
    else:
        _plain_save(model, path)
    return model


def _plain_save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("stamped", [True, False], ids=["stamped", "unstamped"])
@pytest.mark.parametrize("era", sorted(ERAS))
def test_every_era_loads_into_the_current_model(tmp_path: Path, era: int, stamped: bool) -> None:
    path = tmp_path / f"era{era}.pth"
    old = _save_era(era, path, stamped=stamped)
    before = path.read_bytes()
    new = current_model()
    report = ckptmigrate.load_state_dict(new, path, migrations=MIGRATIONS)
    assert report.ok
    assert report.applied == [rev for e, rev in sorted(ERAS.items()) if e > era]
    assert report.head == ERAS[max(ERAS)]
    x = torch.randn(5, 16)
    torch.testing.assert_close(old(x), new(x))
    assert path.read_bytes() == before, "loading must not change the file"


def test_load_returns_the_upgraded_checkpoint_and_its_metadata(tmp_path: Path) -> None:
    path = tmp_path / "era2.pth"
    _save_era(2, path, stamped=True)
    ckpt = ckptmigrate.load(path, migrations=MIGRATIONS)
    assert ckpt.applied == ["0003", "0004", "0005", "0006"]
    assert ckpt.metadata is not None and ckpt.metadata["revision"] == "0006"
    assert set(ckpt.state_dict) == set(current_model().state_dict())
    stop = ckptmigrate.load(path, migrations=MIGRATIONS, to="0004")
    assert stop.applied == ["0003", "0004"]


def test_attach_makes_plain_load_state_dict_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "era1.pth"
    old = _save_era(1, path, stamped=False)
    model = ckptmigrate.attach(current_model(), migrations=MIGRATIONS)
    assert isinstance(model, torch.nn.Module)
    result = model.load_state_dict(torch.load(path))
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(3, 16)
    torch.testing.assert_close(old(x), model(x))


def test_attach_on_a_class_covers_every_instance(tmp_path: Path) -> None:
    path = tmp_path / "era3.pth"
    old = _save_era(3, path, stamped=False)

    class Attached(ExampleNet):
        pass

    ckptmigrate.attach(Attached, migrations=MIGRATIONS)
    model = Attached()
    model.load_state_dict(torch.load(path))
    x = torch.randn(3, 16)
    torch.testing.assert_close(old(x), model(x))
    plain = ExampleNet()
    with pytest.raises(RuntimeError, match="Missing key"):
        plain.load_state_dict(torch.load(path))


def test_a_mismatch_is_reported_grouped_by_prefix(tmp_path: Path) -> None:
    path = tmp_path / "era6.pth"
    _save_era(6, path, stamped=True)
    bigger = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(12)])
    with pytest.raises(BadInput) as err:
        ckptmigrate.load_state_dict(bigger, path, migrations=MIGRATIONS)
    message = str(err.value)
    assert "missing (24):" in message
    assert "  {0..11}.{bias,weight}" in message
    assert len(message.splitlines()) < 15, "never a wall of key names"


def test_include_and_exclude_load_only_matching_parameters(tmp_path: Path) -> None:
    path = tmp_path / "era6.pth"
    saved = _save_era(6, path, stamped=True)
    model = current_model()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = ckptmigrate.load_state_dict(model, path, migrations=MIGRATIONS, include="layers.0")
    assert report.loaded and all(k.startswith("layers.0.") for k in report.loaded)
    for key, value in model.state_dict().items():
        expected = saved.state_dict()[key] if key.startswith("layers.0.") else fresh[key]
        assert torch.equal(value, expected), key
    model2 = current_model()
    report = ckptmigrate.load_state_dict(model2, path, migrations=MIGRATIONS, exclude=[r"head\..*"])
    assert "head.weight" not in report.loaded and "embed.weight" in report.loaded


def test_strict_compatible_loads_what_fits_and_reports_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "era6.pth"
    _save_era(6, path, stamped=True)
    model = current_model()
    model.head = torch.nn.Conv1d(32, 7, 1)
    report = ckptmigrate.load_state_dict(model, path, migrations=MIGRATIONS, strict="compatible")
    assert [k for k, _, _ in report.mismatched] == ["head.weight", "head.bias"]
    assert "embed.weight" in report.loaded and "head.weight" not in report.loaded
    assert "shape mismatch (2)" in str(report)


def test_a_cuda_saved_legacy_file_loads_on_the_cpu_with_a_note(real_file, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = real_file(LPIPS)
    monkeypatch.chdir(tmp_path)  # no pyproject.toml above: no migrations configured
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = ckptmigrate.load(path)
    tensors = ckpt.materialize()
    assert all(t.device.type == "cpu" for t in tensors.values())
    reference = torch.load(path, map_location="cpu")
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)
    assert any("cuda:0" in str(w.message) for w in caught)


def test_group_keys_covers_every_key_once() -> None:
    keys = [f"encoder.layer.{i}.attn.{n}.weight" for i in range(12) for n in "qkv"] + ["head.weight"]
    assert group_keys(keys) == ["encoder.layer.{0..11}.attn.{k,q,v}.weight", "head.weight"]
    assert group_keys(["a.0.w", "a.2.w", "a.5.w"]) == ["a.{0,2,5}.w"]


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 6)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def _diagnose(path: Path, sd: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(path.parent)
    torch.save(sd, path)
    with pytest.raises(BadInput) as err:
        ckptmigrate.load_state_dict(_Tied(), path)
    return str(err.value)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_diagnosis_of_a_wrapper_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    sd = {prefix + k: v for k, v in _Tied().state_dict().items()}
    message = _diagnose(tmp_path / "wrapped.pth", sd, monkeypatch)
    assert f"every checkpoint key starts with {prefix!r}" in message
    assert f"ckpt.unwrap({prefix!r})" in message


def test_diagnosis_of_a_renamed_and_a_transposed_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = dict(_Tied().state_dict())
    sd["proj.weight"] = sd["proj.weight"].t().contiguous()
    sd["projection.bias"] = sd.pop("proj.bias")
    message = _diagnose(tmp_path / "renamed.pth", sd, monkeypatch)
    assert "proj.bias is probably the checkpoint's projection.bias" in message
    assert "proj.weight looks transposed ([4, 6] vs [6, 4])" in message


def test_a_tied_weight_saved_once_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = _Tied()
    sd = dict(source.state_dict())
    del sd["head.weight"]
    torch.save(sd, tmp_path / "once.pth")
    model = _Tied()
    report = ckptmigrate.load_state_dict(model, tmp_path / "once.pth")
    assert report.ok and torch.equal(model.head.weight, source.emb.weight)
    del sd["emb.weight"]
    message = _diagnose(tmp_path / "none.pth", sd, monkeypatch)
    assert "head.weight is tied to emb.weight" in message
