"""The ByT5 glyph branch of the image condition: the text to render, byte-tokenised, through a T5 encoder and the
release's mapper, to rows of the caption width appended after the condition rows.

    ids [B, L], mask [B, L]  ->  T5Encoder: embed -> N x (x + attn(norm x); x + ffn(norm x)) -> final norm  [B, L, D]
                             ->  GlyphMapper: M more T5 layers (their own position table) -> norm
                                 -> Linear(D, C) -> norm                                                  [B, L, C]
                             ->  x mask                                                   = the glyph rows [B, L, C]
    condition [B, N, C] ++ glyph rows  -> [B, N + L, C];  negative [B, N, C] ++ zeros  (`append_glyph_rows`)

T5 specifics, as transformers' T5 encoder computes them: one relative-position bias table [buckets, H] in the first
layer of a stack, its [H, T, T] bias shared by every layer of that stack (the mapper has a table of its own);
bidirectional log-spaced buckets; attention logits NOT scaled by 1/sqrt(d_kv); RMS layer norms without mean
subtraction, statistics in float32, no bias; the FFN gelu_tanh(x W0) * (x W1) W_out ("gated-gelu") or
relu(x W) W_out; padding keys masked out, padding queries computed and left for the final mask.

Attention is computed here in plain jnp, not through `ming_jax.pallas.attention.api`: that entry takes boolean
masks only, and T5 adds a learned [H, T, T] position bias to the logits before the softmax.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.config.glyph import GlyphConfig, T5EncoderConfig
from ming_jax.config.runtime import Runtime
from ming_jax.layers.linear import Linear
from ming_jax.layers.norms import RMSNorm
from ming_jax.layers.params import fan_in_normal, normal, param, read

_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}


# --- relative positions ----------------------------------------------------------------------------------------------


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[T, S] int32 bucket of (key slot - query slot), bidirectional, as T5's encoder buckets it.

    Half the buckets for keys after the query, half for the rest; within a half, distances below a quarter of the
    buckets are exact, larger ones log-spaced up to `max_distance` and clipped to the half's last bucket. Computed
    on the host in float32 with the same operation order as torch, so the integer truncation lands identically
    (the lengths are static, the table is a constant of the compiled program)."""
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    exact = half // 2
    dist = np.abs(rel)
    with np.errstate(divide="ignore"):  # log(0) of the exact region, discarded by the where below
        logs = np.log(dist.astype(np.float32) / np.float32(exact))
        scaled = logs / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    far = np.minimum(exact + np.where(dist < exact, 0, scaled).astype(np.int64), half - 1)
    return ((rel > 0) * half + np.where(dist < exact, dist, far)).astype(np.int32)


# --- one T5 layer --------------------------------------------------------------------------------------------------


def t5_attention(x, wq, wk, wv, wo, bias, key_valid):
    """x [B, T, D], wq / wk / wv [D, H, K], wo [H, K, D], bias [H, T, T] float32, key_valid [B, T] bool -> [B, T, D].

    Unscaled logits plus the position bias, padding keys at the float32 minimum (a row with no valid key averages
    its values instead of producing NaN), softmax in float32."""
    dt = x.dtype
    q = jnp.einsum("btd,dhk->bthk", x, wq)
    k = jnp.einsum("bsd,dhk->bshk", x, wk)
    v = jnp.einsum("bsd,dhk->bshk", x, wv)
    logits = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) + bias[None]  # [B, H, T, S]
    logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    o = jnp.einsum("bhts,bshk->bthk", probs, v)  # [B, T, H, K]
    return jnp.einsum("bthk,hkd->btd", o, wo)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, param_dtype, *, rngs: nnx.Rngs):
        d, h, hd = cfg.d_model, cfg.num_heads, cfg.d_kv
        self.q = param(rngs, fan_in_normal(), (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.k = param(rngs, fan_in_normal(), (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.v = param(rngs, fan_in_normal(), (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.out = param(rngs, fan_in_normal((0, 1)), (h, hd, d), ("heads", "head_dim", "embed"), param_dtype)

    def __call__(self, x, bias, key_valid):
        dt = x.dtype
        return t5_attention(x, read(self.q, dt), read(self.k, dt), read(self.v, dt), read(self.out, dt), bias,
                            key_valid)


class T5FeedForward(nnx.Module):
    """gated: gelu_tanh(x gate) * (x up) down; else relu(x up) down. No biases."""

    def __init__(self, cfg: T5EncoderConfig, param_dtype, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.gated = cfg.gated
        if self.gated:
            self.gate = param(rngs, fan_in_normal(), (d, f), ("embed", "mlp"), param_dtype)
        self.up = param(rngs, fan_in_normal(), (d, f), ("embed", "mlp"), param_dtype)
        self.down = param(rngs, fan_in_normal(), (f, d), ("mlp", "embed"), param_dtype)

    def __call__(self, x):
        dt = x.dtype
        up = jnp.einsum("btd,df->btf", x, read(self.up, dt))
        if self.gated:
            h = jax.nn.gelu(jnp.einsum("btd,df->btf", x, read(self.gate, dt)), approximate=True) * up
        else:
            h = jax.nn.relu(up)
        return jnp.einsum("btf,fd->btd", h, read(self.down, dt))


class T5Layer(nnx.Module):
    """x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: T5EncoderConfig, param_dtype, *, rngs: nnx.Rngs):
        eps = cfg.layer_norm_epsilon
        self.attn_norm = RMSNorm(cfg.d_model, eps=eps, axis_name="norm", param_dtype=param_dtype, rngs=rngs)
        self.attn = T5Attention(cfg, param_dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=eps, axis_name="norm", param_dtype=param_dtype, rngs=rngs)
        self.ffn = T5FeedForward(cfg, param_dtype, rngs=rngs)

    def __call__(self, x, bias, key_valid):
        with jax.named_scope("attention"):
            x = x + self.attn(self.attn_norm(x), bias, key_valid)
        with jax.named_scope("ffn"):
            return x + self.ffn(self.ffn_norm(x))


class T5Blocks(nnx.Module):
    """A stack of T5 layers: `rel_bias` [buckets, H] (the first layer's table, its bias used by all) and `layers`
    stacked on a leading "layers" axis, run with `nnx.scan`."""

    def __init__(self, cfg: T5EncoderConfig, num_layers: int, runtime: Runtime, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(runtime.param_dtype)
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.remat = runtime.remat
        self.rel_bias = param(rngs, normal(1.0), (self.num_buckets, cfg.num_heads), ("pos", "heads"), pdt)

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
        def make(r):
            return T5Layer(cfg, pdt, rngs=r)

        self.layers = make(rngs)

    def position_bias(self, length: int):
        """[H, T, T] float32: the table looked up at each (query, key) bucket."""
        buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance)
        return jnp.take(read(self.rel_bias, jnp.float32), jnp.asarray(buckets), axis=0).transpose(2, 0, 1)

    def __call__(self, x, key_valid):  # x [B, T, D], key_valid [B, T] bool -> [B, T, D]
        bias = self.position_bias(x.shape[1])

        def body(layer, x, bias, key_valid):
            return layer(x, bias, key_valid)

        if self.remat:
            body = nnx.remat(body)
        return nnx.scan(body, in_axes=(0, nnx.Carry, None, None), out_axes=nnx.Carry)(self.layers, x, bias,
                                                                                       key_valid)


# --- the encoder and the mapper ------------------------------------------------------------------------------------


class T5Encoder(nnx.Module):
    """`embed` [V, D], `blocks` (T5Blocks), `final_norm`: transformers' T5EncoderModel / the release's T5Stack."""

    def __init__(self, cfg: T5EncoderConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        pdt = jnp.dtype(runtime.param_dtype)
        self.embed = param(rngs, normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdt)
        self.blocks = T5Blocks(cfg, cfg.num_layers, runtime, rngs=rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, axis_name="norm", param_dtype=pdt,
                                  rngs=rngs)

    def __call__(self, ids, mask):
        """ids [B, L] int, mask [B, L] (1 = token, 0 = padding) -> the final-norm hidden states [B, L, D]."""
        with jax.named_scope("t5_encoder"):
            x = jnp.take(read(self.embed), ids, axis=0).astype(self.runtime.dtype)
            return self.final_norm(self.blocks(x, mask > 0))


class GlyphMapper(nnx.Module):
    """The release's T5EncoderBlockByT5Mapper: `blocks` (T5 layers of the encoder's shape; None when byt5.json has
    num_layers 0), `norm` over D, then, when it has sdxl_channels C, `proj` Linear(D, C) with bias and
    `final_norm` over C (else None: the output stays D wide)."""

    def __init__(self, cfg: T5EncoderConfig, glyph: GlyphConfig, runtime: Runtime | None = None, *,
                 rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        pdt = jnp.dtype(runtime.param_dtype)
        eps = cfg.layer_norm_epsilon
        self.blocks = T5Blocks(cfg, glyph.mapper_layers, runtime, rngs=rngs) if glyph.mapper_layers else None
        self.norm = RMSNorm(cfg.d_model, eps=eps, axis_name="norm", param_dtype=pdt, rngs=rngs)
        channels = glyph.mapper_channels
        self.proj = None if channels is None else Linear(cfg.d_model, channels, ("embed", "mlp"), param_dtype=pdt,
                                                          rngs=rngs)
        self.final_norm = None if channels is None else RMSNorm(channels, eps=eps, axis_name="norm",
                                                                param_dtype=pdt, rngs=rngs)

    @property
    def out_dim(self) -> int | None:
        return None if self.proj is None else self.proj.kernel.shape[1]

    def __call__(self, x, mask):
        """x [B, L, D] (the encoder's output), mask [B, L] -> [B, L, C] (padding rows NOT zeroed here)."""
        with jax.named_scope("glyph_mapper"):
            if self.blocks is not None:
                x = self.blocks(x, mask > 0)
            x = self.norm(x)
            if self.proj is not None:
                x = self.final_norm(self.proj(x))
            return x


# --- entry points ----------------------------------------------------------------------------------------------------


def glyph_rows(encoder: T5Encoder, mapper: GlyphMapper, ids, mask):
    """Traceable: ids / mask [B, L] -> mapper(encoder(ids, mask), mask) * mask  [B, L, C]."""
    rows = mapper(encoder(ids, mask), mask)
    return rows * mask[..., None].astype(rows.dtype)


@functools.partial(jax.jit, static_argnames=("g_encoder", "g_mapper"))
def _encode(g_encoder, s_encoder, g_mapper, s_mapper, ids, mask):
    return glyph_rows(nnx.merge(g_encoder, s_encoder), nnx.merge(g_mapper, s_mapper), ids, mask)


def check_glyph_inputs(vocab_size: int, ids, mask) -> None:
    """Raise ValueError on ids / mask the encoder cannot take: not [B, L] integers of one shape, and (when the values
    are concrete, not jit tracers) ids outside [0, vocab_size) or a mask other than 0 / 1."""
    if np.ndim(ids) != 2 or np.shape(mask) != np.shape(ids):
        raise ValueError(f"glyph ids {np.shape(ids)} and mask {np.shape(mask)}: expected two [B, L] arrays of the "
                         f"same shape")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"glyph ids have dtype {jnp.result_type(ids)}; expected integers")
    if not isinstance(ids, jax.core.Tracer) and np.size(ids):
        lo, hi = int(np.min(ids)), int(np.max(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"glyph ids span [{lo}, {hi}] but the encoder has {vocab_size} embeddings (a tokenizer "
                             f"with more added tokens than the checkpoint?)")
    if not isinstance(mask, jax.core.Tracer) and not np.isin(np.asarray(mask), (0, 1)).all():
        raise ValueError("the glyph mask must hold only 0 (padding) and 1 (token)")


def encode_glyphs(encoder: T5Encoder, mapper: GlyphMapper, ids, mask):
    """ids [B, L] int, mask [B, L] 0/1 (from `ming_jax.processors.glyph.ByteTokenizer`) -> the glyph rows
    [B, L, C] in the runtime dtype, already multiplied by the mask. Jitted (one program per shape); inputs checked
    on the host first (`check_glyph_inputs`)."""
    check_glyph_inputs(encoder.cfg.vocab_size, ids, mask)
    g_enc, s_enc = nnx.split(encoder)
    g_map, s_map = nnx.split(mapper)
    return _encode(g_enc, s_enc, g_map, s_map, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))


def append_glyph_rows(condition, negative, rows):
    """The release's join: condition [B, N, C] ++ rows [B, L, C] -> [B, N + L, C]; the negative [B, N, C] gets
    zeros of the rows' shape. Both before the DiT wrapper (L2 x 1000, identity / ToClip MLP), which therefore sees
    the glyph rows too."""
    if rows.shape[0] != condition.shape[0] or rows.shape[2] != condition.shape[2]:
        raise ValueError(f"glyph rows {rows.shape} do not fit the condition {condition.shape} (batch and width "
                         f"must agree: byt5.json's sdxl_channels must be the condition width)")
    dt = jnp.promote_types(condition.dtype, rows.dtype)  # the release's torch.cat: bf16 condition + f32 rows -> f32
    return (jnp.concatenate([condition.astype(dt), rows.astype(dt)], axis=1),
            jnp.concatenate([negative.astype(dt), jnp.zeros_like(rows, dt)], axis=1))
