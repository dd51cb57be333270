"""Official `BailingTalker2` state-dict names <-> `ming_jax.models.talker.talker.Talker` paths.

    model.*                                       -> llm.*         (a bare transformers Qwen2Model: `qwen2_table`)
    cfm.model.t_embedder.time_mlp.{0,2}.*         -> flow.t_embedder.{fc1,fc2}.*
    cfm.model.{x_embedder,c_embedder.cond_embedder}.*   -> flow.{x_embedder,c_embedder}.*
    cfm.model.blocks.{i}.*, cfm.model.final_layer.*     -> flow.blocks.layers.*[i], flow.blocks.{final_norm,final}.*
    aggregator.word_embedder.weight               -> aggregator.cls
    aggregator.x_embedder.*, aggregator.blocks.{i}.*, aggregator.final_layer.*  -> as the flow DiT's
    stop_head.*, spk_head.*                       -> stop_head.*, spk_head.*
Block tensors: norm1 / norm2 -> norm1 / norm2.scale; attn.to_{q,k,v} -> attn.{q,k,v} [D, heads, hd] (+ biases
[heads, hd]); attn.to_out.0 -> attn.out [heads, hd, D] (+ out_bias); attn.{q,k}_norm -> attn.{q,k}_norm.scale (only
with qk_norm); mlp.ff.0.0 / mlp.ff.2 -> mlp.w_in / b_in, w_out / b_out.

The rope buffers `cfm.model.rotary_embed.inv_freq` and `aggregator.rotary_embed.inv_freq` (x_transformers keeps them
in the state dict) are constants of the config, not parameters: the table lists them as `Table.constants`, so every
loader requires them and checks them against the values the config implies, and the export writes them back.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ming_jax.config.talker import HEAD_ROPE_THETA, HeadBlocksConfig, TalkerConfig
from ming_jax.weights.qwen2 import qwen2_table
from ming_jax.weights.table import (LINEAR, Rule, Table, Transform, export_state_dict, linear_from, linear_to,
                                    load_state_dict)

def _heads(n: int, hd: int) -> Transform:
    return Transform("bias_split_heads", lambda a: a.reshape(n, hd), lambda a: a.reshape(n * hd))


def _linear(official: str, ours: str) -> list[Rule]:
    return [Rule(f"{official}.weight", f"{ours}.kernel", LINEAR), Rule(f"{official}.bias", f"{ours}.bias")]


def head_blocks_rules(cfg: HeadBlocksConfig, official: str, ours: str) -> list[Rule]:
    """The blocks and final layer of one head: `{official}blocks.{i}.*`, `{official}final_layer.*`."""
    n, hd = cfg.num_heads, cfg.head_dim
    ranges = {"i": range(cfg.depth)}

    def block(name: str, path: str, transform=None) -> Rule:
        args = () if transform is None else (transform,)
        return Rule(f"{official}blocks.{{i}}.{name}", f"{ours}blocks.layers.{path}", *args, ranges=ranges,
                    index=("i",))

    rules = [block("norm1.weight", "norm1.scale"), block("norm2.weight", "norm2.scale")]
    for x in "qkv":
        rules += [block(f"attn.to_{x}.weight", f"attn.{x}", linear_to((n, hd))),
                  block(f"attn.to_{x}.bias", f"attn.{x}_bias", _heads(n, hd))]
    rules += [block("attn.to_out.0.weight", "attn.out", linear_from((n, hd))),
              block("attn.to_out.0.bias", "attn.out_bias"),
              block("mlp.ff.0.0.weight", "mlp.w_in", LINEAR), block("mlp.ff.0.0.bias", "mlp.b_in"),
              block("mlp.ff.2.weight", "mlp.w_out", LINEAR), block("mlp.ff.2.bias", "mlp.b_out")]
    if cfg.qk_norm:
        rules += [block("attn.q_norm.weight", "attn.q_norm.scale"), block("attn.k_norm.weight", "attn.k_norm.scale")]
    rules += [Rule(f"{official}final_layer.norm_final.weight", f"{ours}blocks.final_norm.scale"),
              *_linear(f"{official}final_layer.linear", f"{ours}blocks.final")]
    return rules


def talker_table(cfg: TalkerConfig) -> Table:
    # The talker's LM is a bare Qwen2Model (no LM head), so the head's tying is moot: the Qwen2 table is built as
    # for a tied LM, which only adds the optional `lm_head.weight` alias.
    lm = qwen2_table(cfg.llm.replace(tie_word_embeddings=True), prefix="", ours="llm.")
    f, a = "cfm.model.", "aggregator."
    rules = [*_linear(f"{f}t_embedder.time_mlp.0", "flow.t_embedder.fc1"),
             *_linear(f"{f}t_embedder.time_mlp.2", "flow.t_embedder.fc2"),
             *_linear(f"{f}x_embedder", "flow.x_embedder"),
             *_linear(f"{f}c_embedder.cond_embedder", "flow.c_embedder"),
             *head_blocks_rules(cfg.flow, f, "flow."),
             Rule(f"{a}word_embedder.weight", "aggregator.cls"),
             *_linear(f"{a}x_embedder", "aggregator.x_embedder"),
             *head_blocks_rules(cfg.aggregator, a, "aggregator."),
             *_linear("stop_head", "stop_head"), *_linear("spk_head", "spk_head")]
    return lm + Table(rules, constants=talker_constants(cfg))


def _inv_freq(head_dim: int) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    return (1.0 / (HEAD_ROPE_THETA ** exponents)).astype(np.float32)


def talker_constants(cfg: TalkerConfig) -> dict[str, np.ndarray]:
    """The non-parameter tensors of the official state dict and the values the config implies."""
    return {"cfm.model.rotary_embed.inv_freq": _inv_freq(cfg.flow.head_dim),
            "aggregator.rotary_embed.inv_freq": _inv_freq(cfg.aggregator.head_dim)}


def load_talker(model, tensors: Mapping[str, np.ndarray], *, put: Callable | None = None):
    """Fill every parameter of a (possibly abstract) `Talker` from the official state dict (strict both ways; the
    rope buffers checked)."""
    return load_state_dict(model, talker_table(model.cfg), tensors, put=put)


def export_talker(model) -> dict[str, np.ndarray]:
    """The official state dict (parameters and the rope buffers) of a `Talker`."""
    return export_state_dict(model, talker_table(model.cfg))
