"""A Qwen2 decoder stack (transformers' `Qwen2Model`) over input embeddings: the image-generation connector of
Ming-flash-omni 2.0 runs it bidirectionally; the talker's LM and the AudioVAE backbones are Qwen2 stacks too.

Reads top-down: attention (q / k / v projections with biases, o without; 1-D rotate-half RoPE over the whole head;
grouped-query attention through `ming_jax.pallas.attention.api`), the pre-norm decoder layer with its SwiGLU MLP,
then the stack: layers on a leading "layers" axis run with `nnx.scan`, and the final RMSNorm. The token embedding
table is kept (the release stores it; the connector never reads it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.config.runtime import Runtime
from ming_jax.layers import rotary
from ming_jax.layers.mlp import GatedMLP
from ming_jax.layers.norms import RMSNorm
from ming_jax.layers.params import fan_in_normal, normal, param, read, zeros
from ming_jax.pallas.attention.api import AttentionMask, attention

_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, runtime: Runtime, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pdt = jnp.dtype(runtime.param_dtype)
        self.impl = runtime.attention
        self.q = param(rngs, fan_in_normal(), (d, h, hd), ("embed", "heads", "head_dim"), pdt)
        self.q_bias = param(rngs, zeros, (h, hd), ("heads", "head_dim"), pdt)
        self.k = param(rngs, fan_in_normal(), (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.k_bias = param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"), pdt)
        self.v = param(rngs, fan_in_normal(), (d, kv, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.v_bias = param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"), pdt)
        self.out = param(rngs, fan_in_normal((0, 1)), (h, hd, d), ("heads", "head_dim", "embed"), pdt)

    def __call__(self, x, cos, sin, mask: AttentionMask):  # x [B, T, D], cos / sin [B, T, hd]
        dt = x.dtype
        q = jnp.einsum("btd,dhk->bthk", x, read(self.q, dt)) + read(self.q_bias, dt)  # [B, T, H, hd]
        k = jnp.einsum("btd,dhk->bthk", x, read(self.k, dt)) + read(self.k_bias, dt)  # [B, T, K, hd]
        v = jnp.einsum("btd,dhk->bthk", x, read(self.v, dt)) + read(self.v_bias, dt)
        q = rotary.apply_rotary(q, cos, sin)
        k = rotary.apply_rotary(k, cos, sin)
        o = attention(q, k, v, mask, impl=self.impl)  # [B, T, H, hd]
        return jnp.einsum("bthk,hkd->btd", o, read(self.out, dt))


class Qwen2Layer(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Qwen2Config, runtime: Runtime, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(runtime.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=pdt,
                                  rngs=rngs)
        self.attn = Qwen2Attention(cfg, runtime, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=pdt,
                                 rngs=rngs)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, param_dtype=pdt, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        with jax.named_scope("attention"):
            x = x + self.attn(self.input_norm(x), cos, sin, mask)
        with jax.named_scope("mlp"):
            return x + self.mlp(self.post_norm(x))


class Qwen2Model(nnx.Module):
    """embed [V, D] (stored, read only by `embed_tokens`), `layers` stacked [L, ...], `final_norm`."""

    def __init__(self, cfg: Qwen2Config, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        pdt = jnp.dtype(runtime.param_dtype)
        self.embed = param(rngs, normal(1.0), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
        def make(r):
            return Qwen2Layer(cfg, runtime, rngs=r)

        self.layers = make(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=pdt,
                                  rngs=rngs)

    def embed_tokens(self, ids):  # [B, T] -> [B, T, D]
        return jnp.take(read(self.embed), ids, axis=0).astype(self.runtime.dtype)

    def __call__(self, embeds, *, positions=None, segment_ids=None, causal: bool = True):
        """embeds [B, T, D] -> the final-norm hidden states [B, T, D] (transformers' `hidden_states[-1]`).

        positions [B, T] int (None: 0 .. T-1 in every row); segment_ids [B, T] int (0 = padding; None: every token
        real and one sequence per row); causal False: every token attends every real token of its row (the
        connector)."""
        b, t, _ = embeds.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = rotary.inv_frequencies(self.cfg.head_dim, self.cfg.rope_theta)
        cos, sin = rotary.rope_cos_sin(positions, inv_freq)  # [B, T, hd]
        mask = AttentionMask.self_attention(segment_ids, causal=causal)
        x = embeds.astype(self.runtime.dtype)

        def body(layer, x, cos, sin, mask):
            return layer(x, cos, sin, mask)

        if self.runtime.remat:
            body = nnx.remat(body)
        x = nnx.scan(body, in_axes=(0, nnx.Carry, None, None, None), out_axes=nnx.Carry)(self.layers, x, cos, sin,
                                                                                          mask)
        return self.final_norm(x)
