"""User story: "my model library migrates MoE, Llama and ViT checkpoints with ops that know these
architectures, and every one of them can be walked back or says why not."

Each op is written to a real file, read back with ``torch.load`` and compared with an independent
computation (``torch.stack``, the RoPE permutation of Llama's reference conversion, ``F.interpolate``);
invertible ones are undone from the JSON journal bit for bit, and optimizer moments follow.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.ops.operations import OpError


def reference_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The permutation of Llama's reference conversion (transformers' convert_llama_weights_to_hf)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def migrate(tmp_path: Path, payload: Any, op: Any, name: str = "c") -> tuple[Any, Path, list[Any]]:
    src = tmp_path / f"{name}.pt"
    torch.save(payload, src)
    with Checkpoint.open(src) as ckpt:
        op(ckpt)
        journal = json.loads(json.dumps(ckpt.journal))
        up = ckpt.write(tmp_path / f"{name}.up.pt", Envelope.build(ckpt.state_dict.entries, layout=ckpt.layout.name))
    return torch.load(up, weights_only=True), up, journal


def walk_back(tmp_path: Path, up: Path, journal: list[Any]) -> Any:
    with Checkpoint.open(up) as ckpt:
        ckpt.apply_inverse(journal)
        down = ckpt.write(tmp_path / "down.pt", Envelope.build(ckpt.state_dict.entries, layout=ckpt.layout.name))
    return torch.load(down, weights_only=True)


def assert_equal_dicts(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def experts(n: int = 4) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict(norm=torch.ones(3))
    for layer in range(2):
        for e in range(n):
            sd[f"layers.{layer}.experts.{e}.w1.weight"] = torch.randn(5, 3, generator=g)
    sd["head.weight"] = torch.randn(2, 3, generator=g)
    return sd


def test_per_expert_weights_stack_into_one_tensor_per_layer_and_back(tmp_path: Path) -> None:
    sd = experts()
    got, up, journal = migrate(tmp_path, sd, lambda c: c.stack(r"layers\.(\d+)\.experts\.(\d+)\.w1\.weight",
                                                               r"layers.\1.experts.w1"))
    assert list(got) == ["norm", "layers.0.experts.w1", "layers.1.experts.w1", "head.weight"]
    for layer in range(2):
        want = torch.stack([sd[f"layers.{layer}.experts.{e}.w1.weight"] for e in range(4)])
        assert torch.equal(got[f"layers.{layer}.experts.w1"], want)
    assert_equal_dicts(walk_back(tmp_path, up, journal), sd)


def test_a_fused_expert_tensor_unstacks_by_template_and_restacks(tmp_path: Path) -> None:
    fused = OrderedDict(w=torch.arange(24.0).reshape(4, 2, 3), b=torch.zeros(1))
    got, up, journal = migrate(tmp_path, fused, lambda c: c.unstack("w", "experts.{i}.w"))
    assert list(got) == ["experts.0.w", "experts.1.w", "experts.2.w", "experts.3.w", "b"]
    assert all(torch.equal(got[f"experts.{i}.w"], fused["w"][i]) for i in range(4))
    assert_equal_dicts(walk_back(tmp_path, up, journal), fused)


def test_stack_refuses_a_gap_in_the_expert_indices(tmp_path: Path) -> None:
    sd = experts()
    del sd["layers.0.experts.2.w1.weight"]
    with pytest.raises(OpError, match=r"indices .* are \[0, 1, 3\]"):
        migrate(tmp_path, sd, lambda c: c.stack(r"layers\.(\d+)\.experts\.(\d+)\.w1\.weight", r"layers.\1.w1"))


def test_rope_rows_match_the_reference_conversion_and_walk_back(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    n_heads, n_kv, head_dim, dim = 4, 2, 6, 24
    meta = OrderedDict(wq=torch.randn(n_heads * head_dim, dim, generator=g),
                       wk=torch.randn(n_kv * head_dim, dim, generator=g))

    def to_hf(c: Checkpoint) -> None:
        c.permute_rope("wq")  # head count from ckpt.config
        c.permute_rope("wk", n_kv)

    payload = {"state_dict": meta, "hyper_parameters": {"num_attention_heads": n_heads}}
    got, up, journal = migrate(tmp_path, payload, to_hf)
    assert torch.equal(got["state_dict"]["wq"], reference_meta_to_hf(meta["wq"], n_heads))
    assert torch.equal(got["state_dict"]["wk"], reference_meta_to_hf(meta["wk"], n_kv))
    assert not torch.equal(got["state_dict"]["wq"], meta["wq"])
    assert_equal_dicts(walk_back(tmp_path, up, journal)["state_dict"], meta)


def test_grouped_query_attention_splits_with_sizes_from_the_config(tmp_path: Path) -> None:
    heads, kv, head_dim = 8, 2, 4
    qkv = torch.arange((heads + 2 * kv) * head_dim * 16, dtype=torch.float32).reshape(-1, 16)
    payload = {"state_dict": OrderedDict(qkv=qkv),
               "hyper_parameters": {"num_attention_heads": heads, "num_key_value_heads": kv}}
    got, up, journal = migrate(tmp_path, payload, lambda c: c.split_qkv("qkv", ["q", "k", "v"]))
    q, k, v = torch.split(qkv, [heads * head_dim, kv * head_dim, kv * head_dim])
    assert [got["state_dict"][n].shape[0] for n in "qkv"] == [32, 8, 8]
    assert torch.equal(got["state_dict"]["q"], q) and torch.equal(got["state_dict"]["v"], v)
    assert_equal_dicts(walk_back(tmp_path, up, journal)["state_dict"], OrderedDict(qkv=qkv))


def test_split_qkv_without_head_counts_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(OpError, match="pass n_heads="):
        migrate(tmp_path, OrderedDict(qkv=torch.zeros(12, 2)), lambda c: c.split_qkv("qkv", ["q", "k", "v"]))


def test_a_position_embedding_is_resampled_to_a_new_grid_and_cannot_be_walked_back(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    pos = torch.randn(1, 1 + 4 * 4, 8, generator=g)
    got, _up, journal = migrate(tmp_path, OrderedDict(pos=pos), lambda c: c.interpolate("pos", (6, 6), prefix_tokens=1))
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 8)
    assert got["pos"].shape == (1, 37, 8)
    assert torch.equal(got["pos"][:, :1], pos[:, :1])
    assert torch.allclose(got["pos"][:, 1:], want)
    assert journal == [["irreversible", {"op": "interpolate"}]]


def test_a_grown_vocabulary_starts_new_rows_at_the_mean_and_shrinks_back_exactly(tmp_path: Path) -> None:
    emb = torch.arange(12.0).reshape(4, 3)
    got, up, journal = migrate(tmp_path, OrderedDict(emb=emb), lambda c: c.resize("emb", (6, 3)))
    assert torch.equal(got["emb"][:4], emb)
    assert torch.equal(got["emb"][4:], emb.mean(0).expand(2, 3))
    assert_equal_dicts(walk_back(tmp_path, up, journal), OrderedDict(emb=emb))


def test_resize_carries_adam_moments_and_new_rows_start_at_zero(tmp_path: Path) -> None:
    model = torch.nn.Embedding(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.tensor([0, 1, 2, 3])).sum().backward()
    opt.step()
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    got, _up, _journal = migrate(tmp_path, payload, lambda c: c.resize("weight", (6, 3), init="zeros"))
    state = got["optimizer"]["state"][0]
    old = opt.state_dict()["state"][0]
    assert state["exp_avg"].shape == (6, 3)
    assert torch.equal(state["exp_avg"][:4], old["exp_avg"]) and not state["exp_avg"][4:].any()
    grown = torch.nn.Embedding(6, 3)
    grown.load_state_dict(got["model"])
    resumed = torch.optim.Adam(grown.parameters())
    resumed.load_state_dict(got["optimizer"])
    grown(torch.tensor([5])).sum().backward()
    resumed.step()  # a training step runs on the resized state


def test_an_untied_head_gets_its_own_copy_and_ties_back(tmp_path: Path) -> None:
    emb = torch.randn(5, 3)
    sd = OrderedDict([("embed.weight", emb), ("norm", torch.ones(3))])
    got, up, journal = migrate(tmp_path, sd, lambda c: c.untie("lm_head.weight", "embed.weight"))
    assert torch.equal(got["lm_head.weight"], emb)
    assert got["lm_head.weight"].untyped_storage().data_ptr() != got["embed.weight"].untyped_storage().data_ptr()
    assert journal == [["tie", {"key": "lm_head.weight", "source": "embed.weight"}]]
    back = walk_back(tmp_path, up, journal)
    assert torch.equal(back["lm_head.weight"], emb)
    assert back["lm_head.weight"].untyped_storage().data_ptr() == back["embed.weight"].untyped_storage().data_ptr()


def test_tying_over_different_values_is_irreversible(tmp_path: Path) -> None:
    sd = OrderedDict([("embed.weight", torch.ones(2, 2)), ("lm_head.weight", torch.zeros(2, 2))])
    got, _up, journal = migrate(tmp_path, sd, lambda c: c.tie("lm_head.weight", "embed.weight"))
    assert torch.equal(got["lm_head.weight"], torch.ones(2, 2))
    assert journal == [["irreversible", {"op": "tie"}]]


# -- refusals: each op says what is wrong instead of guessing -----------------------------------------


@pytest.mark.parametrize(("op", "message"), [
    (lambda c: c.stack(r"layers\.0\.experts\.\d+\.w1\.weight", "fused"), "needs a group that captures the index"),
    (lambda c: c.unstack("head.weight", ["a", "b", "c"]), "has 2 entries along dim 0, but 3 keys were named"),
    (lambda c: c.unstack("head.weight", ["norm", "b"]), "'norm' already exists"),
    (lambda c: c.unstack("norm", "x.{i}", dim=1), "has no dim 1"),
    (lambda c: c.permute_rope("head.weight", 4), "does not have 4 heads of an even size"),
    (lambda c: c.permute_rope("head.weight", 1, to="llama"), "use 'hf' or 'meta'"),
    (lambda c: c.resize("head.weight", (4,)), "has 2 dims, the new shape 1"),
    (lambda c: c.resize("head.weight", (4, 3), init="ones"), "use 'zeros', 'mean' or 'normal'"),
    (lambda c: c.interpolate("head.weight", (2, 2)), "is not 0 prefix tokens and a square grid"),
    (lambda c: c.interpolate("norm", (2, 2)), "neither a position embedding nor a conv kernel"),
    (lambda c: c.tie("head.weight", "norm"), r"cannot share 'norm' of shape \[3\]"),
    (lambda c: c.split_qkv("head.weight", ["q", "k", "v"], n_heads=1, n_kv_heads=1), r"are not \(1 \+ 2×1\) heads"),
], ids=["stack-no-group", "unstack-count", "unstack-clash", "unstack-dim", "rope-heads", "rope-direction",
        "resize-dims", "resize-init", "interpolate-grid", "interpolate-rank", "tie-shape", "qkv-sizes"])
def test_an_op_that_cannot_apply_names_the_problem(tmp_path: Path, op: Any, message: str) -> None:
    with pytest.raises(OpError, match=message):
        migrate(tmp_path, experts(), op)


def test_stack_refuses_experts_of_different_shapes(tmp_path: Path) -> None:
    sd = experts()
    sd["layers.1.experts.3.w1.weight"] = torch.zeros(6, 3)
    with pytest.raises(OpError, match="needs tensors of one shape and dtype"):
        migrate(tmp_path, sd, lambda c: c.stack(r"layers\.(\d+)\.experts\.(\d+)\.w1\.weight", r"layers.\1.w1"))


def test_stack_along_another_dim_and_an_explicit_key_list(tmp_path: Path) -> None:
    sd = experts()
    keys = [f"layers.0.experts.{e}.w1.weight" for e in (2, 0)]
    got, up, journal = migrate(tmp_path, sd, lambda c: c.stack(keys, "pair", dim=-1))
    assert torch.equal(got["pair"], torch.stack([sd[k] for k in keys], dim=-1))
    back = walk_back(tmp_path, up, journal)
    assert all(torch.equal(back[k], sd[k]) for k in keys)


def test_rope_of_a_bias_and_head_counts_from_other_config_names(tmp_path: Path) -> None:
    bias = torch.arange(16.0)
    payload = {"state_dict": OrderedDict(bq=bias), "hyper_parameters": {"n_heads": 2}}
    got, _up, _j = migrate(tmp_path, payload, lambda c: c.permute_rope("bq"))
    assert torch.equal(got["state_dict"]["bq"], reference_meta_to_hf(bias[:, None], 2)[:, 0])


def test_split_qkv_takes_an_explicit_head_dim_and_plain_attention_without_kv_heads(tmp_path: Path) -> None:
    qkv = torch.arange(18.0 * 2).reshape(18, 2)
    got, _up, _j = migrate(tmp_path, OrderedDict(qkv=qkv), lambda c: c.split_qkv("qkv", ["q", "k", "v"], n_heads=3))
    assert [got[n].shape[0] for n in "qkv"] == [6, 6, 6]
    got, _up, _j = migrate(tmp_path, OrderedDict(qkv=qkv[:16]), lambda c: c.split_qkv(
        "qkv", ["q", "k", "v"], n_heads=2, n_kv_heads=1, head_dim=4), name="d")
    assert [got[n].shape[0] for n in "qkv"] == [8, 4, 4]
    with pytest.raises(OpError, match=r"18 rows of 'qkv' are not \(2 \+ 2×1\) heads"):
        migrate(tmp_path, OrderedDict(qkv=qkv), lambda c: c.split_qkv(
            "qkv", ["q", "k", "v"], n_heads=2, n_kv_heads=1, head_dim=4), name="e")


def test_a_conv_kernel_is_resampled_like_f_interpolate(tmp_path: Path) -> None:
    kernel = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(5))
    got, _up, journal = migrate(tmp_path, OrderedDict(k=kernel), lambda c: c.interpolate("k", (5, 5), mode="bilinear"))
    assert torch.allclose(got["k"], F.interpolate(kernel, size=(5, 5), mode="bilinear", align_corners=False))
    assert journal == [["irreversible", {"op": "interpolate"}]]


def test_resize_with_normal_rows_is_seeded_and_shrinking_is_irreversible(tmp_path: Path) -> None:
    emb = torch.zeros(2, 3)
    first, _u, _j = migrate(tmp_path, OrderedDict(e=emb), lambda c: c.resize("e", (4, 3), init="normal", std=1.0))
    again, _u, _j = migrate(tmp_path, OrderedDict(e=emb), lambda c: c.resize("e", (4, 3), init="normal", std=1.0),
                            name="again")
    assert torch.equal(first["e"], again["e"]) and first["e"][2:].abs().sum() > 0
    assert torch.equal(first["e"][:2], emb)
    _got, _u, journal = migrate(tmp_path, OrderedDict(e=torch.ones(4, 3)), lambda c: c.resize("e", (2, 3)), name="s")
    assert journal == [["irreversible", {"op": "resize"}]]


def test_tying_an_already_shared_head_is_undone_exactly(tmp_path: Path) -> None:
    emb = torch.randn(3, 2)
    sd = OrderedDict([("embed.weight", emb), ("lm_head.weight", emb)])  # torch.save keeps them one storage
    _got, _up, journal = migrate(tmp_path, sd, lambda c: c.tie("lm_head.weight", "embed.weight"))
    assert journal == [["untie", {"key": "lm_head.weight", "source": "embed.weight"}]]
