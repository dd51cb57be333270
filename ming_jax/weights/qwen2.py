"""Official (transformers `Qwen2ForCausalLM`) state-dict names <-> `ming_jax.models.qwen2.Qwen2Model` paths.

Official layout under `{prefix}`: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v}_proj.{weight,
bias}`, `o_proj.weight`, `mlp.{gate,up,down}_proj.weight`, `input_layernorm.weight`, `post_attention_layernorm.weight`,
`model.norm.weight`; `lm_head.weight` is a tied copy of the embeddings when `tie_word_embeddings` (accepted only as
that copy), else a tensor of its own.
"""

from __future__ import annotations

from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.weights.table import LINEAR, Rule, Table, Transform, linear_from, linear_to


def _heads(n: int, hd: int) -> Transform:
    """A bias [n * hd] <-> [n, hd]."""
    return Transform("bias_split_heads", lambda a: a.reshape(n, hd), lambda a: a.reshape(n * hd))


def qwen2_table(cfg: Qwen2Config, prefix: str = "", ours: str = "") -> Table:
    """A Qwen2ForCausalLM state dict: tied embeddings make `lm_head.weight` an optional exact copy; an untied head is
    its own tensor, our `lm_head` [D, V] (`Qwen2Model(..., lm_head=True)`; the connector stores it, never reads it)."""
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    m, o = f"{prefix}model.", ours
    layers = {"i": range(cfg.num_hidden_layers)}

    def layer(official: str, path: str, transform=None) -> Rule:
        args = () if transform is None else (transform,)
        return Rule(f"{m}layers.{{i}}.{official}", f"{o}layers.{path}", *args, ranges=layers, index=("i",))

    rules = [
        Rule(f"{m}embed_tokens.weight", f"{o}embed"),
        layer("self_attn.q_proj.weight", "attn.q", linear_to((h, hd))),
        layer("self_attn.q_proj.bias", "attn.q_bias", _heads(h, hd)),
        layer("self_attn.k_proj.weight", "attn.k", linear_to((kv, hd))),
        layer("self_attn.k_proj.bias", "attn.k_bias", _heads(kv, hd)),
        layer("self_attn.v_proj.weight", "attn.v", linear_to((kv, hd))),
        layer("self_attn.v_proj.bias", "attn.v_bias", _heads(kv, hd)),
        layer("self_attn.o_proj.weight", "attn.out", linear_from((h, hd))),
        layer("mlp.gate_proj.weight", "mlp.gate", LINEAR),
        layer("mlp.up_proj.weight", "mlp.up", LINEAR),
        layer("mlp.down_proj.weight", "mlp.down", LINEAR),
        layer("input_layernorm.weight", "input_norm.scale"),
        layer("post_attention_layernorm.weight", "post_norm.scale"),
        Rule(f"{m}norm.weight", f"{o}final_norm.scale"),
    ]
    if not cfg.tie_word_embeddings:
        return Table(rules + [Rule(f"{prefix}lm_head.weight", f"{o}lm_head", LINEAR)])
    return Table(rules, tied={f"{prefix}lm_head.weight": f"{m}embed_tokens.weight"})
