"""User story: "the ops my migration scripts call do exactly what they say, and can be walked back."

A migration script edits a checkpoint with ``rename``, ``split``, ``reshape``, ... Each op must
produce the tensors torch itself would (written to a real file and read back with ``torch.load``,
memory-mapped or not), record an inverse that survives the JSON round trip through the envelope and
restores the original bit for bit, refuse to guess (a pattern that matches nothing names the
closest keys; a lossy op is irreversible), and carry the optimizer state along with the weights.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.ops.operations import OpError

Op = Callable[[Checkpoint], None]


def sample_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = OrderedDict()
    sd["embed.weight"] = torch.randn(6, 4, generator=g)
    for i in range(2):
        sd[f"layers.{i}.attn.qkv.weight"] = torch.randn(12, 4, generator=g)
        sd[f"layers.{i}.attn.qkv.bias"] = torch.randn(12, generator=g)
    sd["conv.weight"] = torch.randn(2, 3, 4, generator=g)
    sd["head.weight"] = torch.randn(3, 5, generator=g).to(torch.float16)
    sd["head.bias"] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=torch.float16)
    sd["counts"] = torch.tensor([[1, -2], [3, 2**30 + 1]], dtype=torch.int32)
    sd["mask"] = torch.tensor([True, False, True])
    return sd


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes, whatever the strides (size-1 dims may have any stride and still be "contiguous")."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def assert_same(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    assert got.dtype == want.dtype, f"{key}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(raw_bits(got), raw_bits(want)), f"{key}: values differ"


def assert_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, ordered: bool = True) -> None:
    if ordered:
        assert list(got) == list(want)
    else:
        assert sorted(got) == sorted(want)
    for key in want:
        assert_same(got[key], want[key], key)


def write(ckpt: Checkpoint, dest: Path) -> Path:
    env = Envelope.build(ckpt.state_dict.entries, layout=ckpt.layout.name, repo=dest.parent)
    return ckpt.write(dest, env)


class Run:
    """Save a payload, apply ops to it, write the result; then walk it back from the journal."""

    def __init__(self, tmp_path: Path, payload: Any, name: str = "ckpt") -> None:
        self.tmp = tmp_path
        self.name = name
        self.src = tmp_path / f"{name}.pt"
        torch.save(payload, self.src)
        self.journal: list[Any] = []

    def forward(self, op: Op, *, mmap: bool = False) -> Any:
        with Checkpoint.open(self.src) as ckpt:
            op(ckpt)
            # the journal is stored as JSON in the envelope's history
            self.journal = json.loads(json.dumps(ckpt.journal))
            self.up = write(ckpt, self.tmp / f"{self.name}.up.pt")
        return torch.load(self.up, mmap=mmap)

    def backward(self, *, mmap: bool = False) -> Any:
        with Checkpoint.open(self.up) as ckpt:
            ckpt.apply_inverse(self.journal)
            down = write(ckpt, self.tmp / f"{self.name}.down.pt")
        return torch.load(down, mmap=mmap)


@pytest.fixture(params=[False, True], ids=["read", "mmap"])
def mmap(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def roundtrip(tmp_path: Path, op: Op, want: dict[str, torch.Tensor], mmap: bool,
              sd: dict[str, torch.Tensor] | None = None, *, ordered: bool = True) -> Run:
    """Forward must give ``want``; the recorded inverse must give back the original bit for bit."""
    sd = sample_sd() if sd is None else sd
    run = Run(tmp_path, sd)
    assert_state(run.forward(op, mmap=mmap), want)
    assert_state(run.backward(mmap=mmap), sd, ordered=ordered)
    return run


def renamed(sd: dict[str, torch.Tensor], fn: Callable[[str], str]) -> dict[str, torch.Tensor]:
    return OrderedDict((fn(k), v) for k, v in sd.items())


def replaced(sd: dict[str, torch.Tensor], key: str, items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = OrderedDict()
    for k, v in sd.items():
        if k == key:
            out.update(items)
        else:
            out[k] = v
    return out


# -- names ---------------------------------------------------------------------------------------


def test_rename_moves_one_key_in_place(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    want = renamed(sd, lambda k: "proj.weight" if k == "conv.weight" else k)
    run = roundtrip(tmp_path, lambda c: c.rename("conv.weight", "proj.weight"), want, mmap)
    assert run.journal == [["rename_map", {"mapping": {"proj.weight": "conv.weight"}}]]


def test_rename_onto_an_existing_key_is_refused(tmp_path: Path) -> None:
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError, match="collides") as err:
        run.forward(lambda c: c.rename("conv.weight", "embed.weight"))
    assert err.value.op == "rename" and err.value.key == "conv.weight"


def test_rename_prefix(tmp_path: Path, mmap: bool) -> None:
    want = renamed(sample_sd(), lambda k: "blocks." + k[len("layers."):] if k.startswith("layers.") else k)
    roundtrip(tmp_path, lambda c: c.rename_prefix("layers.", "blocks."), want, mmap)


def test_unwrap_a_real_dataparallel_state_dict(tmp_path: Path, mmap: bool) -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    sd = nn.DataParallel(inner).state_dict()
    assert all(k.startswith("module.") for k in sd)
    run = roundtrip(tmp_path, lambda c: c.unwrap(), inner.state_dict(), mmap, sd=sd)
    # the per-module versions travel too: BatchNorm's version is what its loader checks
    with Checkpoint.open(run.up) as ckpt:
        meta = ckpt.state_dict._metadata
    assert meta is not None and meta["1"] == {"version": 2}
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fresh.load_state_dict(torch.load(run.up))
    assert torch.equal(fresh[0].weight, inner[0].weight)


def test_rename_regex_with_back_references_across_layers(tmp_path: Path, mmap: bool) -> None:
    def fn(k: str) -> str:
        m = re.fullmatch(r"layers\.(\d+)\.attn\.qkv\.(\w+)", k)
        return f"blocks.{m[1]}.qkv_{m[2]}" if m else k

    want = renamed(sample_sd(), fn)
    run = roundtrip(tmp_path, lambda c: c.rename_regex(r"layers\.(\d+)\.attn\.qkv\.(\w+)", r"blocks.\1.qkv_\2"),
                    want, mmap)
    assert run.journal[0][1]["mapping"]["blocks.1.qkv_bias"] == "layers.1.attn.qkv.bias"


# -- adding and removing --------------------------------------------------------------------------


def test_drop_removes_every_match_and_cannot_be_undone(tmp_path: Path) -> None:
    run = Run(tmp_path, sample_sd())
    got = run.forward(lambda c: c.drop(r"layers\.\d+\.attn\.qkv\.bias"))
    want = {k: v for k, v in sample_sd().items() if not k.endswith("qkv.bias")}
    assert_state(got, want)
    assert run.journal == [["irreversible", {"op": "drop"}]]
    with pytest.raises(OpError, match="drop cannot be undone"):
        run.backward()


def test_add_a_tensor_or_a_factory_and_undo_by_dropping(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    want = OrderedDict(sd)
    want["temperature"] = torch.ones(1)
    want["position"] = torch.arange(5, dtype=torch.int32)

    def op(c: Checkpoint) -> None:
        c.add("temperature", torch.ones(1))
        c.add("position", lambda: torch.arange(5, dtype=torch.int32))

    roundtrip(tmp_path, op, want, mmap)


@pytest.mark.parametrize("key, value, message", [
    ("embed.weight", torch.zeros(1), "already exists"),
    ("fresh", [1.0, 2.0], "must be a tensor, got list"),
])
def test_add_refuses_an_existing_key_or_a_non_tensor(tmp_path: Path, key: str, value: Any, message: str) -> None:
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError, match=message):
        run.forward(lambda c: c.add(key, value))


# -- shapes and dtypes ----------------------------------------------------------------------------


def test_reshape_a_stored_tensor_with_an_inferred_dim(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    want = OrderedDict(sd)
    want["conv.weight"] = sd["conv.weight"].reshape(6, -1)
    want["embed.weight"] = sd["embed.weight"].reshape(6, 4, 1)

    def op(c: Checkpoint) -> None:
        c.reshape("conv.weight", [6, -1])
        c.reshape("embed.weight", [6, 4, 1])

    run = roundtrip(tmp_path, op, want, mmap)
    assert run.journal[0] == ["reshape", {"key": r"conv\.weight", "shape": [2, 3, 4]}]


def test_reshape_after_a_transpose_reshapes_the_transposed_values(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    want = OrderedDict(sd)
    want["conv.weight"] = sd["conv.weight"].transpose(0, 2).reshape(-1)

    def op(c: Checkpoint) -> None:
        c.transpose("conv.weight", 0, 2)
        c.reshape("conv.weight", [-1])

    roundtrip(tmp_path, op, want, mmap)


@pytest.mark.parametrize("shape", [[5, 5], [-1, 7], [0, -1]])
def test_reshape_to_a_different_number_of_elements_is_refused(tmp_path: Path, shape: list[int]) -> None:
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError, match=r"cannot reshape 'conv\.weight' of shape \[2, 3, 4\]"):
        run.forward(lambda c: c.reshape("conv.weight", shape))


def test_transpose(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    want = OrderedDict((k, v.t() if k in ("embed.weight", "head.weight") else v) for k, v in sd.items())
    roundtrip(tmp_path, lambda c: c.transpose(r"(embed|head)\.weight", 0, 1), want, mmap)


def test_transpose_of_a_missing_dim_is_refused(tmp_path: Path) -> None:
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError, match="has 1 dims"):
        run.forward(lambda c: c.transpose("mask", 0, 1))


def test_permute_and_its_inverse_permutation(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    want = OrderedDict(sd)
    want["conv.weight"] = sd["conv.weight"].permute(2, 0, 1)
    run = roundtrip(tmp_path, lambda c: c.permute("conv.weight", [2, 0, 1]), want, mmap)
    assert run.journal == [["permute", {"key": r"conv\.weight", "dims": [1, 2, 0]}]]


def test_permute_with_a_wrong_permutation_is_refused(tmp_path: Path) -> None:
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError, match=r"not a permutation of 3 dims"):
        run.forward(lambda c: c.permute("conv.weight", [0, 1, 1]))


@pytest.mark.parametrize("key, dtype", [
    ("head.weight", torch.float32),   # float16 -> float32 keeps every value, nan/inf/-0.0 included
    ("head.bias", torch.float64),
    ("counts", torch.int64),
    ("counts", torch.float64),        # every int32 is a float64; not every int32 is a float32
    ("mask", torch.uint8),
    ("mask", torch.float16),
])
def test_cast_that_keeps_every_value_walks_back_exactly(tmp_path: Path, mmap: bool, key: str,
                                                        dtype: torch.dtype) -> None:
    sd = sample_sd()
    want = OrderedDict(sd)
    want[key] = sd[key].to(dtype)
    roundtrip(tmp_path, lambda c: c.cast(re.escape(key), dtype), want, mmap)


NAN_BITS = {torch.bfloat16: [0x7FC0, 0xFFC0, 0xFFFF, 0x7F81], torch.float16: [0x7E00, 0xFE00, 0xFFFF, 0x7C01]}


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("wide", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [4, 64], ids=["scalar-path", "vector-path"])
def test_cast_up_and_back_keeps_every_nan_bit_pattern(tmp_path: Path, half: torch.dtype, wide: torch.dtype,
                                                      n: int) -> None:
    """torch turns NaNs into one canonical NaN on half casts (which one depends on the tensor's size)."""
    t = torch.linspace(-3, 3, n).to(half)
    t.view(torch.int16)[:4] = torch.tensor(NAN_BITS[half], dtype=torch.int32).to(torch.int16)
    sd = {"w": t}
    want = {"w": t.to(wide)}
    run = Run(tmp_path, sd)
    got = run.forward(lambda c: c.cast("w", wide))
    assert got["w"].dtype == wide and torch.equal(got["w"][4:], want["w"][4:]) and got["w"][:4].isnan().all()
    assert_state(run.backward(), sd)


@pytest.mark.parametrize("key, dtype", [
    ("embed.weight", torch.float16),
    ("embed.weight", torch.bfloat16),
    ("head.weight", torch.bfloat16),  # bfloat16 has the range but not the precision of float16
    ("counts", torch.int16),
    ("counts", torch.float32),        # 2**30 + 1 has no float32
    ("embed.weight", torch.int64),
    ("embed.weight", torch.bool),
])
def test_cast_that_loses_values_is_irreversible(tmp_path: Path, key: str, dtype: torch.dtype) -> None:
    run = Run(tmp_path, sample_sd())
    got = run.forward(lambda c: c.cast(re.escape(key), dtype))
    assert got[key].dtype == dtype
    assert_same(got[key], sample_sd()[key].to(dtype), key)
    assert run.journal == [["irreversible", {"op": "cast"}]]
    with pytest.raises(OpError, match="cast cannot be undone"):
        run.backward()


def test_pad_grows_and_its_inverse_truncates(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    want = OrderedDict(sd)
    grown = torch.full((8, 5), 0.5)
    grown[:6, :4] = sd["embed.weight"]
    want["embed.weight"] = grown
    run = roundtrip(tmp_path, lambda c: c.pad("embed.weight", [8, 5], value=0.5), want, mmap)
    assert run.journal == [["truncate", {"key": r"embed\.weight", "shape": [6, 4]}]]


@pytest.mark.parametrize("op, message", [
    (lambda c: c.pad("embed.weight", [5, 4]), r"cannot pad 'embed\.weight' of shape \[6, 4\] to \[5, 4\]"),
    (lambda c: c.pad("embed.weight", [6, 4, 1]), "cannot pad"),
    (lambda c: c.truncate("embed.weight", [7, 4]), r"cannot cut 'embed\.weight' of shape \[6, 4\] to \[7, 4\]"),
])
def test_pad_and_truncate_refuse_the_wrong_direction(tmp_path: Path, op: Op, message: str) -> None:
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError, match=message):
        run.forward(op)


def test_truncate_keeps_the_leading_slice_and_is_irreversible(tmp_path: Path, mmap: bool) -> None:
    run = Run(tmp_path, sample_sd())
    got = run.forward(lambda c: c.truncate("conv.weight", [1, 2, 4]), mmap=mmap)
    assert_same(got["conv.weight"], sample_sd()["conv.weight"][:1, :2, :4], "conv.weight")
    assert run.journal == [["irreversible", {"op": "truncate"}]]
    with pytest.raises(OpError, match="truncate cannot be undone"):
        run.backward()


def test_map_applies_any_function_now_and_is_irreversible(tmp_path: Path, mmap: bool) -> None:
    run = Run(tmp_path, sample_sd())
    got = run.forward(lambda c: c.map(r"layers\.\d+\.attn\.qkv\.bias", lambda t: (t * 2)[:6]), mmap=mmap)
    for i in range(2):
        key = f"layers.{i}.attn.qkv.bias"
        assert_same(got[key], (sample_sd()[key] * 2)[:6], key)
    assert run.journal == [["irreversible", {"op": "map"}]] * 2
    with pytest.raises(OpError, match="map: the function returned int"):
        Run(tmp_path, sample_sd(), name="bad").forward(lambda c: c.map("embed.weight", lambda t: 3))


# -- split and merge ------------------------------------------------------------------------------


def qkv_split(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = sd
    for i in range(2):
        for part in ("weight", "bias"):
            key = f"layers.{i}.attn.qkv.{part}"
            q, k, v = sd[key].chunk(3)
            out = replaced(out, key, {f"layers.{i}.attn.{n}.{part}": t for n, t in zip("qkv", (q, k, v), strict=True)})
    return out


def split_qkv(c: Checkpoint) -> None:
    for part in ("weight", "bias"):
        c.split(rf"layers\.(\d+)\.attn\.qkv\.{part}", [rf"layers.\1.attn.{n}.{part}" for n in "qkv"])


def test_split_fused_qkv_across_layers_and_merge_back(tmp_path: Path, mmap: bool) -> None:
    run = roundtrip(tmp_path, split_qkv, qkv_split(sample_sd()), mmap)
    assert run.journal[0] == ["merge", {
        "keys": [re.escape(f"layers.0.attn.{n}.weight") for n in "qkv"], "new_key": "layers.0.attn.qkv.weight",
        "dim": 0,
    }]


def test_merge_q_k_v_across_layers_and_split_back(tmp_path: Path, mmap: bool) -> None:
    split = qkv_split(sample_sd())

    def merge_qkv(c: Checkpoint) -> None:
        for part in ("weight", "bias"):
            c.merge([rf"layers\.(\d+)\.attn\.{n}\.{part}" for n in "qkv"], rf"layers.\1.attn.qkv.{part}")

    roundtrip(tmp_path, merge_qkv, sample_sd(), mmap, sd=split)


def test_split_with_sizes_along_dim_1(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    a, b = sd["embed.weight"].split([1, 3], dim=1)
    want = replaced(sd, "embed.weight", {"embed.a": a, "embed.b": b})
    roundtrip(tmp_path, lambda c: c.split("embed.weight", ["embed.a", "embed.b"], dim=1, sizes=[1, 3]), want, mmap)


def test_merge_places_the_result_where_its_first_source_was(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()
    parts = OrderedDict([("w.0", sd["embed.weight"]), ("other", sd["mask"]), ("w.1", sd["conv.weight"][0, :2])])
    want = OrderedDict([("w", torch.cat([sd["embed.weight"], sd["conv.weight"][0, :2]])), ("other", sd["mask"])])
    # walking back puts both parts where the merged tensor was: same tensors, different order
    roundtrip(tmp_path, lambda c: c.merge(["w.0", "w.1"], "w"), want, mmap, sd=parts, ordered=False)


@pytest.mark.parametrize("op, message", [
    (lambda c: c.split("embed.weight", ["a", "b", "c", "d", "e"]), "6 does not split into 5 equal parts"),
    (lambda c: c.split("embed.weight", ["a", "b"], sizes=[2, 3]), r"sizes \[2, 3\] do not add up to 6"),
    (lambda c: c.split("embed.weight", ["a", "b"], dim=2), "has no dim 2"),
    (lambda c: c.split("embed.weight", ["a", "conv.weight"]), "'conv.weight' already exists"),
    (lambda c: c.merge(["embed.weight", "conv.weight"], "x"), r"'conv\.weight' of shape \[2, 3, 4\] does not fit"),
    (lambda c: c.merge(["embed.weight", "head.weight"], "x", dim=1),
     r"'head\.weight' of shape \[3, 5\] does not fit"),
    (lambda c: c.merge([r"layers\.(\d+)\.attn\.qkv\.weight", r"layers\.\d+\.attn\.qkv\.bias"], "x"),
     "matches 0 keys alongside"),
])
def test_split_and_merge_refuse_what_does_not_fit(tmp_path: Path, op: Op, message: str) -> None:
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError, match=message):
        run.forward(op)


def test_merge_of_different_dtypes_is_refused_when_the_op_runs(tmp_path: Path) -> None:
    sd = OrderedDict([("a", torch.ones(2, 3)), ("b", torch.ones(1, 3, dtype=torch.float16))])
    run = Run(tmp_path, sd)
    with pytest.raises(OpError, match=r"merge: 'b' is float16"):
        run.forward(lambda c: c.merge(["a", "b"], "ab"))


# -- patterns that match nothing -----------------------------------------------------------------


NO_MATCH: dict[str, tuple[Callable[..., None], str]] = {
    "rename": (lambda c, **kw: c.rename("embed.wieght", "x", **kw), "embed.weight"),
    "rename_prefix": (lambda c, **kw: c.rename_prefix("layer.0.attn.qkv.", "x.", **kw), "layers.0.attn.qkv.bias"),
    "unwrap": (lambda c, **kw: c.unwrap("module.", **kw), ""),
    "rename_regex": (lambda c, **kw: c.rename_regex(r"layers\.(\d+)\.atn\.qkv\.weight", r"x.\1", **kw),
                     "layers.0.attn.qkv.weight"),
    "drop": (lambda c, **kw: c.drop("head.wieght", **kw), "head.weight"),
    "reshape": (lambda c, **kw: c.reshape("conv.wieght", [-1], **kw), "conv.weight"),
    "transpose": (lambda c, **kw: c.transpose("embed.weights", 0, 1, **kw), "embed.weight"),
    "permute": (lambda c, **kw: c.permute("conv_weight", [1, 0, 2], **kw), "conv.weight"),
    "cast": (lambda c, **kw: c.cast("head.wieght", torch.float32, **kw), "head.weight"),
    "pad": (lambda c, **kw: c.pad("embed.wieght", [9, 9], **kw), "embed.weight"),
    "truncate": (lambda c, **kw: c.truncate("embed.wieght", [1, 1], **kw), "embed.weight"),
    "map": (lambda c, **kw: c.map("head.bais", torch.neg, **kw), "head.bias"),
    "split": (lambda c, **kw: c.split(r"layers\.(\d+)\.attn\.qkv\.wieght", ["a", "b"], **kw),
              "layers.0.attn.qkv.weight"),
    "merge": (lambda c, **kw: c.merge([r"layer\.(\d+)\.attn\.q\.weight", "b"], "x", **kw),
              "layers.0.attn.qkv.weight"),
}


@pytest.mark.parametrize("name", list(NO_MATCH))
def test_a_pattern_that_matches_nothing_names_the_closest_keys(tmp_path: Path, name: str) -> None:
    op, closest = NO_MATCH[name]
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError) as err:
        run.forward(op)
    message = str(err.value)
    expected_op = name
    assert message.startswith(f"{expected_op}: ") and "matches no key" in message
    if name == "rename_regex":  # the error says which semantics apply: re.sub searches, selections fullmatch
        assert "as re.sub does; anchor it with ^" in message
    elif name in ("drop", "cast", "split", "merge", "reshape", "transpose", "permute", "pad", "truncate", "map"):
        assert "must match the whole key" in message
    assert err.value.op == expected_op
    if closest:
        assert "closest keys:" in message and closest in message.split("closest keys:")[1]
    else:
        assert "the checkpoint has 10 keys" in message


@pytest.mark.parametrize("name", list(NO_MATCH))
def test_missing_ok_skips_a_pattern_that_matches_nothing(tmp_path: Path, name: str) -> None:
    op, _ = NO_MATCH[name]
    run = Run(tmp_path, sample_sd())
    assert_state(run.forward(lambda c: op(c, missing_ok=True)), sample_sd())
    assert run.journal == []


def test_an_invalid_regular_expression_is_reported_as_such(tmp_path: Path) -> None:
    run = Run(tmp_path, sample_sd())
    with pytest.raises(OpError, match=re.escape(repr(r"layers.(\d+")) + " is not a valid pattern"):
        run.forward(lambda c: c.drop(r"layers.(\d+"))


# -- walking back -------------------------------------------------------------------------------


def test_a_chain_of_ops_walks_back_in_reverse_order(tmp_path: Path, mmap: bool) -> None:
    sd = sample_sd()

    def chain(c: Checkpoint) -> None:
        split_qkv(c)
        c.rename_prefix("layers.", "blocks.")
        c.transpose(r"blocks\.(\d+)\.attn\.q\.weight", 0, 1)
        c.reshape(r"blocks\.0\.attn\.q\.weight", [-1])
        c.cast("head.weight", torch.float32)
        c.pad("head.weight", [4, 6], value=-1)
        c.permute("conv.weight", [1, 2, 0])
        c.add("temperature", torch.ones(1))

    run = Run(tmp_path, sd)
    got = run.forward(chain, mmap=mmap)
    assert got["blocks.0.attn.q.weight"].shape == (16,)
    assert_same(got["blocks.1.attn.q.weight"], sd["layers.1.attn.qkv.weight"][:4].t(), "q")
    assert len(run.journal) == 2 * 2 + 1 + 2 + 1 + 1 + 1 + 1 + 1
    assert_state(run.backward(mmap=mmap), sd, ordered=False)


def test_apply_inverse_runs_only_the_ops_an_inverse_can_name(tmp_path: Path) -> None:
    """The journal comes from the file's envelope: a crafted one must not call ``write`` or ``close``."""
    victim = tmp_path / "victim.txt"
    run = Run(tmp_path, sample_sd())
    run.forward(lambda c: c.rename("mask", "keep"))
    with Checkpoint.open(run.up) as ckpt:
        for crafted in (["write", {"dest": str(victim), "envelope": None}], ["close", {}], ["__init__", {}]):
            with pytest.raises(OpError, match=rf"{crafted[0]!r} is not an op"):
                ckpt.apply_inverse([crafted])
        assert "keep" in ckpt.state_dict
    assert not victim.exists()


# -- optimizer state follows the weights -----------------------------------------------------------


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.qkv = nn.Linear(6, 18)
        self.head = nn.Linear(18, 3)


class Head(nn.Module):
    """The head's weight stored transposed, [in, out], as the migration below writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(18, 3))
        self.bias = nn.Parameter(torch.empty(3))


class Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = Head()


def trained_fused() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    torch.manual_seed(0)
    model = Fused()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model.head(model.qkv(model.embed(torch.randn(5, 4)))).square().sum().backward()
        opt.step()
    return model.state_dict(), opt.state_dict()


def to_separate(c: Checkpoint) -> None:
    c.split(r"qkv\.(weight|bias)", [r"q.\1", r"k.\1", r"v.\1"])
    c.transpose("head.weight", 0, 1)


def expected_separate_state(old: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Per new parameter name, the state Adam would have had for it: the old state, split/transposed."""
    names = list(dict(Fused().named_parameters()))
    by_name = {n: old["state"][i] for i, n in enumerate(names)}
    out: dict[str, dict[str, torch.Tensor]] = {"embed.weight": by_name["embed.weight"],
                                               "embed.bias": by_name["embed.bias"]}
    for part in ("weight", "bias"):
        pieces = {k: by_name[f"qkv.{part}"][k].chunk(3) for k in ("exp_avg", "exp_avg_sq")}
        for j, n in enumerate("qkv"):
            out[f"{n}.{part}"] = {"step": by_name[f"qkv.{part}"]["step"],
                                  **{k: pieces[k][j] for k in pieces}}
    out["head.weight"] = {"step": by_name["head.weight"]["step"],
                          **{k: by_name["head.weight"][k].t() for k in ("exp_avg", "exp_avg_sq")}}
    out["head.bias"] = by_name["head.bias"]
    return out


def test_optimizer_state_follows_split_and_transpose_in_the_new_models_order(tmp_path: Path, mmap: bool) -> None:
    sd, opt_sd = trained_fused()
    run = Run(tmp_path, {"model": sd, "optimizer": opt_sd, "epoch": 3})
    got = run.forward(to_separate, mmap=mmap)
    assert got["epoch"] == 3
    model = Separate()
    model.load_state_dict(got["model"])
    state = got["optimizer"]["state"]
    expected = expected_separate_state(opt_sd)
    names = [n for n, _ in model.named_parameters()]
    assert got["optimizer"]["param_groups"][0]["params"] == list(range(len(names)))
    for i, name in enumerate(names):
        for k, want in expected[name].items():
            assert_same(state[i][k], want, f"{name}.{k}")
    # and back: the optimizer state returns to the fused layout, index for index
    back = run.backward(mmap=mmap)
    for i in opt_sd["state"]:
        for k, want in opt_sd["state"][i].items():
            assert_same(back["optimizer"]["state"][i][k], want, f"{i}.{k}")


def test_optimizer_state_of_a_dropped_weight_goes_and_indices_close_up(tmp_path: Path) -> None:
    sd, opt_sd = trained_fused()
    run = Run(tmp_path, {"model": sd, "optimizer": opt_sd})
    got = run.forward(lambda c: c.drop(r"qkv\.(weight|bias)"))
    assert list(got["model"]) == ["embed.weight", "embed.bias", "head.weight", "head.bias"]
    assert got["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    for new, old in zip(range(4), (0, 1, 4, 5), strict=True):
        assert_same(got["optimizer"]["state"][new]["exp_avg"], opt_sd["state"][old]["exp_avg"], str(new))


def test_optimizer_state_follows_a_rename_with_param_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Fused()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    model.head(model.qkv(model.embed(torch.randn(5, 4)))).sum().backward()
    opt.step()
    run = Run(tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    got = run.forward(lambda c: c.rename_prefix("qkv.", "attn."))
    group = got["optimizer"]["param_groups"][0]
    assert group["param_names"] == ["embed.weight", "embed.bias", "attn.weight", "attn.bias",
                                    "head.weight", "head.bias"]
    assert_same(got["optimizer"]["state"][2]["momentum_buffer"], opt.state_dict()["state"][2]["momentum_buffer"],
                "attn.weight")
