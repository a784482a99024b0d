"""Factories of the worked Llama example: the Hugging Face model (transformers' ``LlamaForCausalLM``)
at revision 0001, Meta's layout (:mod:`meta_llama`) at 0002, and the example inputs.

Weights are drawn at a scale where attention is sharp, so a wrong RoPE permutation changes the
logits by far more than the fixtures' tolerance.
"""

from __future__ import annotations

import torch
from torch import nn

from .meta_llama import ModelArgs, Transformer

ARGS = ModelArgs()


def _sharpen(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def hf_config() -> object:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=ARGS.vocab_size, hidden_size=ARGS.dim, intermediate_size=ARGS.hidden_dim,
                       num_hidden_layers=ARGS.n_layers, num_attention_heads=ARGS.n_heads,
                       num_key_value_heads=ARGS.n_kv_heads, tie_word_embeddings=True,
                       max_position_embeddings=ARGS.max_seq_len, rms_norm_eps=ARGS.norm_eps,
                       rope_theta=ARGS.rope_theta)


def hf_model() -> nn.Module:
    from transformers import LlamaForCausalLM

    class LlamaLogits(LlamaForCausalLM):
        """transformers' Llama, returning plain logits as Meta's does (same state dict)."""

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return super().forward(input_ids=tokens, use_cache=False).logits

    return _sharpen(LlamaLogits(hf_config()))


def meta_model() -> nn.Module:
    return _sharpen(Transformer(ARGS))


def example_inputs() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (2, 9))
