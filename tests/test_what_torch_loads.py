"""User story: "what ckptmigrate signs, stamps and hands me is exactly what torch.load returns".

Every input of torch's loader that changes the returned values is read, written back and covered
by the digest, or the file is refused with one line: the neg and conj bits of
``_rebuild_tensor_v2``/``v3``'s ``metadata`` argument, the ``byteorder`` record, backward hooks, a
pickle that modifies a tensor after building it, attributes on a state dict. Each attack is done
the way an attacker would: a signed file edited in place, then verified and loaded by real torch.
"""

from __future__ import annotations

import io
import re
import subprocess
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptmigrate
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.formats import torchzip
from ckptmigrate.release import integrity, signing

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    signing.keygen(d / "k.pem", d / "k.pub")
    return d / "k.pem", d / "k.pub"


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(f"{path.stem}/data.pkl")


def replace_record(path: Path, name: str, data: bytes) -> None:
    """Swap one record of a zip checkpoint in place, as an attacker with write access would."""
    with open(path, "r+b") as fh:
        torchzip.append_records(fh, {name: data})


def assert_same_load(a: object, b: object) -> None:
    """Equal values and equal neg/conj bits and requires_grad, key for key."""
    assert isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        assert (x.is_neg(), x.is_conj(), x.requires_grad, x.dtype) == (y.is_neg(), y.is_conj(), y.requires_grad,
                                                                         y.dtype), k
        assert torch.equal(x.resolve_conj().resolve_neg(), y.resolve_conj().resolve_neg()), k


def lazy_views() -> dict[str, torch.Tensor]:
    z = torch.arange(6.0).reshape(2, 3).to(torch.complex64) * (1 + 2j)
    return {"conj": z.conj(), "neg": torch._neg_view(torch.arange(4.0)), "plain": torch.ones(3),
            "conj_neg": torch._neg_view(z.conj())}


def test_a_signed_file_that_gains_a_neg_bit_fails_verify(tmp_path: Path, key: tuple[Path, Path], cli: Cli) -> None:
    weight = torch.arange(1.0, 5.0)
    path = tmp_path / "m.pt"
    torch.save({"w": weight}, path)
    assert cli("stamp", path, "--sign", key[0]).returncode == 0
    assert cli("verify", path, "--public-key", key[1]).returncode == 0
    twin = tmp_path / "twin" / "m.pt"  # the same pickle with the neg bit, written by torch itself
    twin.parent.mkdir()
    torch.save({"w": torch._neg_view(weight)}, twin)
    replace_record(path, "data.pkl", data_pkl(twin))
    loaded = torch.load(path, weights_only=True)["w"]
    assert loaded.is_neg() and torch.equal(loaded.resolve_neg(), -weight)  # the attack works on torch
    proc = cli("verify", path, "--public-key", key[1])
    assert proc.returncode == 1 and "w" in proc.stderr, proc.stderr
    result = integrity.verify(path, key[1])
    assert not result.ok and result.changed == ["w"]


def test_a_conj_bit_flipped_into_an_extra_tensor_is_caught_too(tmp_path: Path, key: tuple[Path, Path]) -> None:
    z = torch.arange(3.0).to(torch.complex64) * 1j
    path = tmp_path / "m.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "ema": z}, path)
    ckptmigrate.stamp(path, sign=key[0])
    twin = tmp_path / "twin" / "m.pt"
    twin.parent.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "ema": z.conj()}, twin)
    replace_record(path, "data.pkl", data_pkl(twin))
    assert torch.load(path, weights_only=True)["ema"].is_conj()
    result = integrity.verify(path, key[1])
    assert not result.ok and result.payload_changed


@pytest.mark.parametrize("how", ["stamp", "stamp -o", "compact", "reshape", "transpose"])
def test_conj_and_neg_views_survive_every_rewrite(tmp_path: Path, cli: Cli, how: str) -> None:
    path = tmp_path / "m.pt"
    views = lazy_views()
    torch.save(views, path)
    before = torch.load(path, weights_only=True)
    out = path
    if how == "stamp":
        assert cli("stamp", path).returncode == 0
    elif how == "stamp -o":
        out = tmp_path / "o.pt"
        assert cli("stamp", path, "-o", out).returncode == 0
    elif how == "compact":
        assert cli("stamp", path).returncode == 0
        assert cli("compact", path).returncode == 0
    else:
        with Checkpoint.open(path) as ckpt:
            if how == "reshape":  # a free view of the stored bytes: the bits stay bits
                ckpt.reshape("conj", (3, 2))
                before["conj"] = before["conj"].reshape(3, 2)
            else:  # computed: torch's values, bits resolved
                ckpt.transpose("conj", 0, 1)
                before["conj"] = before["conj"].transpose(0, 1).resolve_conj()
            ckpt.write(path, None)
    after = torch.load(out, weights_only=True)
    assert_same_load(before, after)


def test_materialized_tensors_carry_the_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no migration chain here
    path = tmp_path / "m.pt"
    torch.save(lazy_views(), path)
    expected = torch.load(path, weights_only=True)
    assert_same_load(expected, dict(ckptmigrate.load(path).state_dict))
    with Checkpoint.open(path) as ckpt:
        assert_same_load(expected, dict(ckpt.materialize()))


def test_materialized_parameters_and_requires_grad_are_as_torch_returns_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.pt"
    model = torch.nn.Linear(2, 2)
    torch.save({**model.state_dict(keep_vars=True), "grad": torch.ones(2).requires_grad_(),
                "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False)}, path)
    expected = torch.load(path, weights_only=True)
    got = dict(ckptmigrate.load(path).materialize())
    for k, v in expected.items():
        assert type(got[k]) is type(v) and got[k].requires_grad == v.requires_grad and torch.equal(got[k], v), k


def test_a_safetensors_copy_holds_the_values_torch_returns(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "m.pt"
    views = lazy_views()
    views.pop("conj")
    views.pop("conj_neg")  # safetensors has no complex dtype
    torch.save(views, path)
    with Checkpoint.open(path) as ckpt:
        ckpt.write(tmp_path / "m.safetensors", None, fmt="safetensors")
    got = load_file(tmp_path / "m.safetensors")
    for k, v in views.items():
        assert torch.equal(got[k], v.resolve_neg()), k


def test_a_big_endian_byteorder_record_is_refused(tmp_path: Path, key: tuple[Path, Path], cli: Cli) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    assert cli("stamp", path, "--sign", key[0]).returncode == 0
    replace_record(path, "byteorder", b"big")
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))  # torch swaps
    for args in (("verify", path, "--public-key", key[1]), ("inspect", path), ("stamp", path)):
        proc = cli(*args)
        assert proc.returncode == (1 if args[0] == "verify" else 2), (args, proc.stderr)
        assert "byteorder" in proc.stderr and "Traceback" not in proc.stderr, args
        assert len(proc.stderr.strip().splitlines()) == 1


def test_backward_hooks_and_unknown_metadata_are_refused(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    original = data_pkl(path)
    cases = {
        # an OrderedDict of hooks with one entry instead of the empty one torch writes
        "hooks": re.sub(rb"(OrderedDict\nq.\)Rq.)", lambda m: m[1] + b"K\x00K\x01s", original, count=1,
                        flags=re.S),
        # a metadata dict torch would hand to set_tensor_metadata with a key we do not know
        "metadata": re.sub(rb"(\)Rq.)(tq.R)", lambda m: m[1] + b"}X\x04\x00\x00\x00zero\x88s" + m[2], original,
                           count=1, flags=re.S),
    }
    for name, pickled in cases.items():
        assert pickled != original, name
        bad = tmp_path / f"{name}" / "m.pt"
        bad.parent.mkdir()
        bad.write_bytes(path.read_bytes())
        replace_record(bad, "data.pkl", pickled)
        torch.load(bad, weights_only=False)  # torch reads it
        proc = cli("inspect", bad)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
        assert {"hooks": "backward hooks", "metadata": "metadata"}[name] in proc.stderr


def test_a_pickle_that_builds_onto_a_tensor_is_refused(tmp_path: Path, cli: Cli) -> None:
    """BUILD after a rebuild call: torch runs Tensor.__setstate__ (``set_`` to any storage view);
    a reader that set attributes instead would see another tensor."""
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, path)
    original = data_pkl(path)
    # after the rebuild call's REDUCE, BUILD a dict state {"neg": True} onto the tensor
    built = re.sub(rb"(tq.R)(q.)", lambda m: m[1] + b"}X\x03\x00\x00\x00neg\x88sb" + m[2], original, count=1,
                   flags=re.S)
    assert built != original
    replace_record(path, "data.pkl", built)
    proc = cli("inspect", path)
    assert proc.returncode == 2 and "modify a tensor" in proc.stderr, proc.stderr


def test_attributes_built_onto_a_state_dict_are_in_the_digest(tmp_path: Path, key: tuple[Path, Path]) -> None:
    sd = OrderedDict(w=torch.ones(2))
    sd._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    ckptmigrate.stamp(path, sign=key[0])
    assert integrity.verify(path, key[1]).ok
    sd.extra_attribute = "evil"  # type: ignore[attr-defined]
    twin = tmp_path / "twin" / "m.pt"
    twin.parent.mkdir()
    torch.save(sd, twin)
    replace_record(path, "data.pkl", data_pkl(twin))
    assert torch.load(path, weights_only=False).extra_attribute == "evil"
    assert not integrity.verify(path, key[1]).ok


def test_every_dtype_torch_saves_is_read_written_and_loaded_back(tmp_path: Path) -> None:
    dtypes = [d for d in vars(torch).values() if isinstance(d, torch.dtype) and not str(d).startswith("torch.q")]
    saved: dict[str, torch.Tensor] = {}
    for dtype in dtypes:
        try:
            t = torch.zeros(4, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.empty(2, dtype=dtype)
            torch.save({"x": t}, io.BytesIO())
        except (KeyError, RuntimeError, TypeError):
            continue  # torch cannot save it either (uint1..7, int1..7)
        saved[str(dtype).removeprefix("torch.")] = t
    assert {"float4_e2m1fn_x2", "bits8", "bits16", "float8_e8m0fnu", "complex32"} <= set(saved)
    path = tmp_path / "m.pt"
    torch.save(saved, path)
    with Checkpoint.open(path) as ckpt:
        assert len(ckpt.tensors()) == len(saved)
        ckpt.transpose("float32", 0, 0) if "float32" in saved else None  # a computed tensor beside them
        ckpt.write(tmp_path / "o.pt", None)
    back = torch.load(tmp_path / "o.pt", weights_only=True)
    for name, t in saved.items():
        assert back[name].dtype == t.dtype and back[name].view(torch.uint8).equal(t.view(torch.uint8)), name


def _variant(base: dict[str, torch.Tensor], bits: list[tuple[bool, bool, bool]]) -> dict[str, torch.Tensor]:
    out = {}
    for (name, t), (neg, conj, grad) in zip(base.items(), bits, strict=True):
        v = t.detach()
        if conj and v.is_complex():
            v = v.conj()
        if neg:
            v = torch._neg_view(v)
        out[name] = v.requires_grad_(grad) if grad and v.is_floating_point() else v
    return out


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bits=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=3, max_size=3))
def test_verify_passes_exactly_when_torch_loads_the_same(tmp_path: Path, key: tuple[Path, Path],
                                                        bits: list[tuple[bool, bool, bool]]) -> None:
    """Differential: a signed file's pickle swapped for one torch wrote with other neg/conj/
    requires_grad bits verifies if and only if torch.load returns the same tensors."""
    base = {"w": torch.arange(1.0, 5.0), "z": torch.arange(3.0).to(torch.complex64) * (1 + 1j),
            "i": torch.arange(3)}
    d = tmp_path / f"case{abs(hash(tuple(bits)))}"
    d.mkdir()
    path, twin = d / "m.pt", d / "twin" / "m.pt"
    twin.parent.mkdir()
    torch.save(base, path)
    ckptmigrate.stamp(path, sign=key[0])
    torch.save(_variant(base, bits), twin)
    replace_record(path, "data.pkl", data_pkl(twin))
    loaded = torch.load(path, weights_only=True)
    unchanged = all(
        (x.is_neg(), x.is_conj(), x.requires_grad) == (False, False, False)
        and torch.equal(x.resolve_conj().resolve_neg(), base[k])
        for k, x in loaded.items()
    )
    assert integrity.verify(path, key[1]).ok == unchanged, bits
