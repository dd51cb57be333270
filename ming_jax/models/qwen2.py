"""A Qwen2 decoder stack (transformers' `Qwen2Model`) over input embeddings: the image-generation connector of
Ming-flash-omni 2.0 runs it bidirectionally; the talker's LM and the AudioVAE backbones are Qwen2 stacks too.

Reads top-down: the KV cache, attention (q / k / v projections with biases, o without; 1-D rotate-half RoPE over
the whole head; grouped-query attention through `ming_jax.pallas.attention.api`), the pre-norm decoder layer with
its SwiGLU MLP, then the stack: layers on a leading "layers" axis run with `nnx.scan`, and the final RMSNorm. The
token embedding table is kept (the release stores it; the connector never reads it; the talker embeds its prompt).

Decoding (the talker's LM): a `Qwen2Cache` of preallocated per-layer keys / values is carried through the layer scan
(each layer writes its new keys / values into its slice of the stacks, in place) and handed back updated; queries
attend to every valid slot at or before their own. Without a cache the stack runs exactly as before.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.config.runtime import Runtime
from ming_jax.layers import rotary
from ming_jax.layers.kv_cache import CacheSlot
from ming_jax.layers.mlp import GatedMLP
from ming_jax.layers.norms import RMSNorm
from ming_jax.layers.params import fan_in_normal, normal, param, read, zeros
from ming_jax.pallas.attention.api import AttentionMask, attention

_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Qwen2Cache:
    """Preallocated keys / values of every layer, which slots hold a real token, and the next slot to write.

    Slots are shared by the batch and written left to right at `length`; a row's padding slots stay invalid, so rows
    of different prompt lengths share one layout (positions are per row and need not equal slots).
    """

    k: jax.Array  # [L, B, K, S_max, hd]
    v: jax.Array
    valid: jax.Array  # [B, S_max] bool
    length: jax.Array  # [] int32

    @classmethod
    def create(cls, cfg: Qwen2Config, batch: int, max_len: int, dtype="float32") -> "Qwen2Cache":
        """Zeros for `batch` rows of `max_len` slots; `dtype`: the model's compute dtype (`Runtime.dtype`)."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"Qwen2Cache: batch={batch} and max_len={max_len} must be positive")
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(dtype))
        return cls(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


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

    def __call__(self, x, cos, sin, mask: AttentionMask, kv_cache: CacheSlot | None = None, start=None):
        """x [B, T, D], cos / sin [B, T, hd] -> (out [B, T, D], the updated CacheSlot or None).

        With `kv_cache` the new keys / values go to slots start .. start+T-1 of its layer; the queries then read the
        whole layer cache, or only the T new keys when `attend_cache` is False (prefill of an empty cache)."""
        dt = x.dtype
        q = jnp.einsum("btd,dhk->bthk", x, read(self.q, dt)) + read(self.q_bias, dt)  # [B, T, H, hd]
        k = jnp.einsum("btd,dhk->bthk", x, read(self.k, dt)) + read(self.k_bias, dt)  # [B, T, K, hd]
        v = jnp.einsum("btd,dhk->bthk", x, read(self.v, dt)) + read(self.v_bias, dt)
        q = rotary.apply_rotary(q, cos, sin)
        k = rotary.apply_rotary(k, cos, sin)
        if kv_cache is not None:
            kv_cache = kv_cache.write(k, v, start)
            if kv_cache.attend_cache:
                k, v = kv_cache.read(dt)  # [B, S_max, K, hd]
        o = attention(q, k, v, mask, impl=self.impl)  # [B, T, H, hd]
        return jnp.einsum("bthk,hkd->btd", o, read(self.out, dt)), kv_cache


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

    def __call__(self, x, cos, sin, mask, kv_cache: CacheSlot | None = None, start=None):
        with jax.named_scope("attention"):
            a, kv_cache = self.attn(self.input_norm(x), cos, sin, mask, kv_cache, start)
            x = x + a
        with jax.named_scope("mlp"):
            return x + self.mlp(self.post_norm(x)), kv_cache


class Qwen2Model(nnx.Module):
    """embed [V, D] (stored, read only by `embed_tokens`), `layers` stacked [L, ...], `final_norm`."""

    def __init__(self, cfg: Qwen2Config, runtime: Runtime | None = None, *, rngs: nnx.Rngs, lm_head: bool = False):
        """lm_head: also hold a CausalLM checkpoint's untied `lm_head` [D, V] (stored and exported; nothing here
        reads it: the connector uses the final hidden states). A tied or bare model has none."""
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        pdt = jnp.dtype(runtime.param_dtype)
        self.embed = param(rngs, normal(1.0), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        self.lm_head = (param(rngs, fan_in_normal(), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt)
                        if lm_head and not cfg.tie_word_embeddings else None)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
        def make(r):
            return Qwen2Layer(cfg, runtime, rngs=r)

        self.layers = make(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=pdt,
                                  rngs=rngs)

    def embed_tokens(self, ids):  # [B, T] -> [B, T, D]
        return jnp.take(read(self.embed), ids, axis=0).astype(self.runtime.dtype)

    def __call__(self, embeds, *, positions=None, segment_ids=None, causal: bool = True,
                 cache: Qwen2Cache | None = None, prefill: bool = False):
        """embeds [B, T, D] -> the final-norm hidden states [B, T, D] (transformers' `hidden_states[-1]`); with a
        cache, (hidden states, the updated cache).

        positions [B, T] int (None: 0 .. T-1 in every row; with a cache, the slots cache.length ... ); segment_ids
        [B, T] int (0 = padding; None: every token real and one sequence per row); causal False: every token
        attends every real token of its row (the connector).

        cache: the T tokens go to slots cache.length ... (`prefill=True`: slots 0 .. T-1, whatever the cache held)
        and are marked valid where segment_ids > 0. A prefill attends within the T tokens with the causal + segment
        mask (what the kernels take); a step attends to every valid slot at or before its own (dense mask)."""
        b, t, _ = embeds.shape
        if cache is not None and not causal:
            raise ValueError("Qwen2Model: a KV cache needs causal attention")
        start = None if cache is None else (jnp.zeros((), jnp.int32) if prefill else cache.length)
        if positions is None:
            offset = 0 if start is None else start
            positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = rotary.inv_frequencies(self.cfg.head_dim, self.cfg.rope_theta)
        cos, sin = rotary.rope_cos_sin(positions, inv_freq)  # [B, T, hd]
        valid = None
        if cache is None or prefill:
            mask = AttentionMask.self_attention(segment_ids, causal=causal)
        if cache is not None:
            real = jnp.ones((b, t), bool) if segment_ids is None else jnp.asarray(segment_ids) > 0
            valid = jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(cache.valid) if prefill else cache.valid,
                                                        real, start, axis=1)
            if not prefill:
                slots = jnp.arange(cache.max_len)
                before = slots[None, :] <= (start + jnp.arange(t))[:, None]  # [T, S]
                mask = AttentionMask(dense=before[None, None] & valid[:, None, None, :])  # [B, 1, T, S]
        x = embeds.astype(self.runtime.dtype)

        def body(layer, carry, cos, sin, mask, start, index):
            x, kv = carry  # kv: the whole (k, v) stacks, carried so that each layer updates its slice in place
            slot = None if kv is None else CacheSlot(kv[0], kv[1], index, attend_cache=not prefill)
            x, slot = layer(x, cos, sin, mask, slot, start)
            return x, None if slot is None else (slot.k, slot.v)

        if self.runtime.remat:
            body = nnx.remat(body)
        kv = None if cache is None else (cache.k, cache.v)
        x, kv = nnx.scan(body, in_axes=(0, nnx.Carry, None, None, None, None, 0), out_axes=nnx.Carry)(
            self.layers, (x, kv), cos, sin, mask, start, jnp.arange(self.cfg.num_hidden_layers, dtype=jnp.int32))
        h = self.final_norm(x)
        if cache is None:
            return h
        return h, Qwen2Cache(kv[0], kv[1], valid, start + t)
