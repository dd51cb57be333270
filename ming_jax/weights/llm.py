"""Official BailingMoeV2ForCausalLM state-dict names <-> `ming_jax.models.llm.BailingMoeV2` parameters."""

from __future__ import annotations

import numpy as np

from ming_jax.config.llm import LLMConfig
from ming_jax.config.modality import GATE_NAMES
from ming_jax.weights.table import IDENTITY, LINEAR, Rule, Table, Transform, linear_from


def grouped_qkv(cfg: LLMConfig, *, bias: bool = False) -> Transform:
    """Official fused rows [q heads (H) | k heads (K) | v heads (K)] x hd  <->  ours [D?, K, G + 2, hd]."""
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = h // kv

    def to_ours(a):
        a = a.reshape(h + 2 * kv, hd, *a.shape[1:])  # [H+2K, hd, (D)]
        q, k, v = a[:h].reshape(kv, g, hd, *a.shape[2:]), a[h:h + kv, None], a[h + kv:, None]
        grouped = np.concatenate([q, k, v], axis=1)  # [K, G+2, hd, (D)]
        return grouped if bias else np.moveaxis(grouped, -1, 0)  # weights: [D, K, G+2, hd]

    def to_official(a):
        if not bias:
            a = np.moveaxis(a, 0, -1)  # [K, G+2, hd, D]
        q, k, v = a[:, :g], a[:, g], a[:, g + 1]
        rows = np.concatenate([q.reshape(h, *q.shape[2:]), k, v], axis=0)  # [H+2K, hd, (D)]
        return rows.reshape((h + 2 * kv) * hd, *rows.shape[2:])

    return Transform("grouped_qkv_bias" if bias else "grouped_qkv", to_ours, to_official)


def llm_table(cfg: LLMConfig, prefix: str = "") -> Table:
    """`prefix` is what precedes `model.` / `lm_head.` (e.g. "model." inside the omni checkpoint)."""
    p = prefix
    dense = {"i": range(0, cfg.num_dense_layers)}
    moe = {"i": range(cfg.num_dense_layers, cfg.num_layers)}
    rules = [Rule(f"{p}model.word_embeddings.weight", "embed"),
             Rule(f"{p}model.norm.weight", "final_norm.scale")]
    if not cfg.tie_word_embeddings:
        rules.append(Rule(f"{p}lm_head.weight", "lm_head", LINEAR))

    for ranges, ours, idx in ((dense, "dense_layers.{i}", ()), (moe, "moe_layers", ("i",))):
        if not next(iter(ranges.values())):
            continue
        L = f"{p}model.layers.{{i}}"
        ours_i = ours  # dense layers come first, so their official index is their list index

        def r(official, path, transform=IDENTITY, extra=None, index=()):
            rng = dict(ranges, **(extra or {}))
            return Rule(official, path, transform, rng, idx + tuple(index))

        rules += [
            r(f"{L}.input_layernorm.weight", f"{ours_i}.input_norm.scale"),
            r(f"{L}.post_attention_layernorm.weight", f"{ours_i}.post_norm.scale"),
            r(f"{L}.attention.query_key_value.weight", f"{ours_i}.attn.qkv", grouped_qkv(cfg)),
            r(f"{L}.attention.q_norm.weight", f"{ours_i}.attn.q_norm.scale"),
            r(f"{L}.attention.k_norm.weight", f"{ours_i}.attn.k_norm.scale"),
            r(f"{L}.attention.dense.weight", f"{ours_i}.attn.out",
              linear_from((cfg.num_heads, cfg.head_dim), "out_proj_per_head")),
        ]
        if cfg.use_qkv_bias:
            rules.append(r(f"{L}.attention.query_key_value.bias", f"{ours_i}.attn.qkv_bias",
                           grouped_qkv(cfg, bias=True)))
        if cfg.use_bias:
            rules.append(r(f"{L}.attention.dense.bias", f"{ours_i}.attn.out_bias"))
        if ours == "moe_layers":
            for g in range(cfg.num_routers):
                rules += [
                    r(f"{L}.mlp.{GATE_NAMES[g]}.weight", f"{ours}.moe.router.kernel", LINEAR, index=(g,)),
                    r(f"{L}.mlp.{GATE_NAMES[g]}.expert_bias", f"{ours}.moe.router.expert_bias", index=(g,)),
                ]
            ex = {"e": range(cfg.num_experts)}
            for name, ours_w in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
                rules.append(r(f"{L}.mlp.experts.{{e}}.{name}.weight", f"{ours}.moe.{ours_w}", LINEAR, ex, ("e",)))
            if cfg.num_shared_experts:
                for name, ours_w in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                    rules.append(r(f"{L}.mlp.shared_experts.{name}.weight", f"{ours}.moe.shared.{ours_w}", LINEAR))
        else:
            for name, ours_w in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                rules.append(r(f"{L}.mlp.{name}.weight", f"{ours_i}.mlp.{ours_w}", LINEAR))
    return Table(rules)
