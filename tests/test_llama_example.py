"""User story: "I convert a Llama between the Hugging Face and Meta layouts with a chain, and I can
prove it is right against an implementation I did not write."

The chain in tests/llama_example/migrations takes transformers' ``LlamaForCausalLM`` state dict
(grouped-query attention, tied embeddings) to Meta's reference layout: renames, an untied output
head, and the RoPE row permutation. It is checked key by key against transformers' own
``PermuteForRope``, and by outputs: the converted weights in Meta's reference model
(tests/llama_example/meta_llama.py) give transformers' logits. The recorded fixtures catch one
wrong line, and the walk back gives the Hugging Face checkpoint bit for bit.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")  # a dev dependency: scripts/setup.sh installs it
from transformers.core_model_loading import PermuteForRope  # noqa: E402

from ckptmigrate.chain.engine import apply, plan_for  # noqa: E402
from ckptmigrate.chain.fixtures import paths  # noqa: E402
from ckptmigrate.chain.scripts import ScriptDirectory  # noqa: E402
from ckptmigrate.checkpoint.lazy import Checkpoint  # noqa: E402

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS / "llama_example"
MODEL = "llama_example.models:meta_model"
Cli = Callable[..., subprocess.CompletedProcess[str]]


def hf_fixture() -> Path:
    return paths(ScriptDirectory(EXAMPLE / "migrations").load().get("0001"))[0]


def test_q_and_k_rows_match_transformers_own_rope_permutation() -> None:
    graph = ScriptDirectory(EXAMPLE / "migrations").load()
    original = torch.load(hf_fixture(), weights_only=True)
    with Checkpoint.open(hf_fixture()) as ckpt:
        ckpt.config = {"num_attention_heads": 4, "num_key_value_heads": 2}
        apply(ckpt, plan_for(ckpt, graph, to="head"))
        meta = ckpt.materialize()
    to_meta = PermuteForRope(inverse=True)
    for layer in range(2):
        q = original[f"model.layers.{layer}.self_attn.q_proj.weight"]
        k = original[f"model.layers.{layer}.self_attn.k_proj.weight"]
        assert torch.equal(meta[f"layers.{layer}.attention.wq.weight"],
                           to_meta._permute_for_rope(q, SimpleNamespace(num_attention_heads=4)))
        assert torch.equal(meta[f"layers.{layer}.attention.wk.weight"],
                           to_meta._permute_for_rope(k, SimpleNamespace(num_attention_heads=2)))
        assert torch.equal(meta[f"layers.{layer}.feed_forward.w1.weight"],
                           original[f"model.layers.{layer}.mlp.gate_proj.weight"])
    assert torch.equal(meta["output.weight"], original["lm_head.weight"])
    assert meta["output.weight"].data_ptr() != meta["tok_embeddings.weight"].data_ptr()


def test_the_converted_weights_give_transformers_logits_in_metas_model(cli: Cli) -> None:
    proc = cli("test", "--migrations", EXAMPLE / "migrations", "--model", MODEL, cwd=TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   fixture 0001 upgrade to head (0002)" in proc.stdout
    assert "ok   fixture 0001 to head and back (0002 -> back to 0001): tensors identical" in proc.stdout


@pytest.mark.parametrize(("old", "new"), [
    ('["num_attention_heads"], to="meta")', '["num_attention_heads"], to="hf")'),  # the inverse swapped
    ('    ckpt.permute_rope(r"layers\\.\\d+\\.attention\\.wk\\.weight"', '    pass  # ckpt.permute_rope(r"x"'),
], ids=["inverse-permutation", "k-not-permuted"])
def test_one_wrong_line_in_the_conversion_fails_the_fixture(tmp_path: Path, cli: Cli, old: str, new: str) -> None:
    chain = tmp_path / "migrations"
    shutil.copytree(EXAMPLE / "migrations", chain)
    script = chain / "versions" / "0002_meta_layout.py"
    assert old in script.read_text()
    script.write_text(script.read_text().replace(old, new))
    proc = cli("test", "--migrations", chain, "--model", MODEL, cwd=TESTS)
    assert proc.returncode == 1, proc.stdout
    assert "FAIL fixture 0001 upgrade to head (0002)" in proc.stdout
    assert "broken by 0002" in proc.stderr


def test_a_hugging_face_checkpoint_upgrades_with_its_config_json_and_walks_back_bit_for_bit(
    tmp_path: Path, cli: Cli
) -> None:
    from llama_example.models import hf_config  # tests/ is on sys.path under pytest's rootdir

    hf = tmp_path / "pytorch_model.bin"
    shutil.copyfile(hf_fixture(), hf)
    hf_config().to_json_file(str(tmp_path / "config.json"))  # where ckpt.config comes from
    up = cli("upgrade", hf, "-o", tmp_path / "meta.pth", "--migrations", EXAMPLE / "migrations")
    assert up.returncode == 0, up.stderr
    down = cli("downgrade", tmp_path / "meta.pth", "--to", "0001", "-o", tmp_path / "back.bin",
               "--migrations", EXAMPLE / "migrations")
    assert down.returncode == 0, down.stderr
    original = torch.load(hf, weights_only=True)
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert list(back) == list(original)
    for key, tensor in original.items():
        assert torch.equal(back[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert back["lm_head.weight"].data_ptr() == back["model.embed_tokens.weight"].data_ptr()  # tied again
