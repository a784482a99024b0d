"""Meta's reference layout: wq/wk/wv/wo, w1/w2/w3, interleaved RoPE rows, an untied output head.

Revision ID: 0002
Revises: 0001
"""

revision = "0002"
down_revision = "0001"

NAMES = {
    r"self_attn\.q_proj": "attention.wq", r"self_attn\.k_proj": "attention.wk",
    r"self_attn\.v_proj": "attention.wv", r"self_attn\.o_proj": "attention.wo",
    r"mlp\.gate_proj": "feed_forward.w1", r"mlp\.down_proj": "feed_forward.w2", r"mlp\.up_proj": "feed_forward.w3",
    r"input_layernorm": "attention_norm", r"post_attention_layernorm": "ffn_norm",
}


def upgrade(ckpt):
    for hf, meta in NAMES.items():
        ckpt.rename_regex(rf"^model\.layers\.(\d+)\.{hf}\.weight$", rf"layers.\1.{meta}.weight")
    ckpt.rename("model.embed_tokens.weight", "tok_embeddings.weight")
    ckpt.rename("model.norm.weight", "norm.weight")
    ckpt.rename("lm_head.weight", "output.weight")  # tied to the embedding: one tensor under two names
    ckpt.untie("output.weight", "tok_embeddings.weight")  # Meta's output head is a tensor of its own
    # HF rotates half-split pairs, Meta interleaved ones: the q and k rows are permuted per head
    ckpt.permute_rope(r"layers\.\d+\.attention\.wq\.weight", ckpt.config["num_attention_heads"], to="meta")
    ckpt.permute_rope(r"layers\.\d+\.attention\.wk\.weight", ckpt.config["num_key_value_heads"], to="meta")
