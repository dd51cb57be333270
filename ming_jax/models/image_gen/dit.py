"""Z-Image DiT: the diffusion transformer that turns caption features and a noisy latent into a velocity, for
image generation and (with a reference latent) image editing.

Data flow of one call (B rows of the CFG batch; p = patch, pf = frame patch, m = seq_multiple = 32):

    x [B, C, F, H, W] noisy latent (+ ref_x [B, C, Fr, H, W] concatenated along F when editing)
      -> patchify: tokens in (f, y, x) order, channels in (pf, py, px, c) order         [B, N, pf*p*p*C]
      -> pad to Lx = ceil(N / m) * m by repeating the last token                        [B, Lx, pf*p*p*C]
      -> x_embed (Linear), pad slots -> learned x_pad_token                            [B, Lx, D]
      -> noise refiner (modulated blocks, image tokens only)
    cap_feats [B, L, Dc] (+ cap_lens [B]: each row's real length)
      -> per row: pad to ceil(len / m) * m by repeating its last row; batch padding up to Lc = ceil(L / m) * m
      -> cap_embed (RMSNorm + Linear), pad slots -> learned cap_pad_token                [B, Lc, D]
      -> context refiner (unmodulated blocks, caption tokens only, batch padding masked)
    t [B] model time (1 - sigma) -> sinusoid of t * t_scale -> MLP = the adaLN condition [B, min(D, 256)]
    [image ; caption] -> main blocks (modulated) -> final layer -> first N tokens -> unpatchify -> frame 0
                                                                                        [B, C, 1, H, W]

Facts of the official implementation this reproduces (they change numbers):
* Pad tokens are NOT masked: the pad slots of both streams hold the learned pad tokens and are attended to; only
  batch padding (rows whose caption is shorter than the longest one) is hidden, by segment id 0.
* Rope positions (frame, row, column): caption slot i -> (1 + i, 0, 0); image token (f, y, x) ->
  (Lcap_pad + 1 + f, y, x) with Lcap_pad the row's own padded caption length; image pad slots -> (0, 0, 0).
  Angles are float64 products rounded to float32 (tables built here with numpy, gathered by position), then
  cos / sin rotate interleaved (even, odd) channel pairs of the per-head-RMSNormed q and k.
* Block ("sandwich" adaLN): scale = 1 + s, gate = tanh(g), from a Linear of the condition WITHOUT a SiLU in front;
  x += gate * RMSNorm(attn(RMSNorm(x) * scale)), then x += gate' * RMSNorm(ffn(RMSNorm(x) * scale')). The context
  refiner is the same block without scale / gate. The final layer does have the SiLU: LayerNorm (no affine,
  eps 1e-6) * (1 + Linear(SiLU(c))) -> Linear.
* The q / k RMSNorm eps is 1e-5 whatever norm_eps is, k / v have n_heads heads whatever n_kv_heads is, and the
  output keeps frame 0 only (editing: the reference frame is dropped; the official code does so for any F).

Logical axis names of the parameters: "embed" (model width D), "heads", "head_dim", "mlp" (SwiGLU width and the
timestep MLP's hidden width), "norm" (norm scales), "patch" (a patchified token's width), "layers" (the stacked
blocks), None (the condition width min(D, 256), the caption feature width and the sinusoid width). No new names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax import sharding
from ming_jax.config.dit import DiTConfig
from ming_jax.config.runtime import Runtime
from ming_jax.layers.linear import Linear
from ming_jax.layers.mlp import GatedMLP
from ming_jax.layers.norms import RMSNorm, layer_norm
from ming_jax.layers.params import fan_in_normal, normal, param, read
from ming_jax.layers.rotary import apply_interleaved_rotary
from ming_jax.pallas.attention.api import AttentionMask, attention

_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}
_STREAM = ("batch", "seq", "act_embed")  # logical names of a [B, T, D] activation


def ceil_to(n, m: int):
    """Smallest multiple of m that is >= n (works on ints and integer arrays)."""
    return (n + m - 1) // m * m


# --- pure math: time embedding, rope ---------------------------------------------------------------------------------


def timestep_sinusoid(t, dim: int, max_period: float):
    """t [B] (already times t_scale) -> [B, dim] float32 = [cos(t * f), sin(t * f)] (+ a zero column if dim is odd).

    f_k = exp(-ln(max_period) * k / half), k < half = dim // 2: the exponent in float32 as torch forms it, the exp
    correctly rounded (closer to torch's float32 exp than numpy's float32 one). An ulp of f_k moves t * f_k by up to
    ~6e-5 at t * t_scale = 1000, the one place where float32 parity is only ~1e-5 rather than exact.
    """
    half = dim // 2
    k = np.arange(half, dtype=np.float32)
    exponent = np.float32(-math.log(max_period)) * k / np.float32(half)  # float32, as torch computes it
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)  # [half]
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


@functools.lru_cache(maxsize=None)
def rope_tables(axes_dims: tuple[int, ...], axes_lens: tuple[int, ...], theta: float):
    """Per position axis a: (cos, sin) tables [axes_lens[a], axes_dims[a] // 2] float32 (numpy, built once).

    The angle pos * theta^(-2k/d) is formed in float64 and rounded to float32 before cos / sin, as the official
    tables are: at positions of a few hundred a float32 product would be off by an ulp of the angle.
    """
    out = []
    for d, n in zip(axes_dims, axes_lens):
        inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))  # [d/2]
        angles = np.outer(np.arange(n, dtype=np.float64), inv).astype(np.float32)  # [n, d/2]
        out.append((np.cos(angles), np.sin(angles)))
    return tuple(out)


def rope_cos_sin(pos, cfg: DiTConfig):
    """pos [B, T, 3] int -> cos, sin [B, T, head_dim // 2] float32: each axis' table gathered, axes concatenated."""
    tables = rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)
    cos = [jnp.take(jnp.asarray(c), pos[..., a], axis=0) for a, (c, _) in enumerate(tables)]
    sin = [jnp.take(jnp.asarray(s), pos[..., a], axis=0) for a, (_, s) in enumerate(tables)]
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


# --- pure layout: patches, padding, positions ------------------------------------------------------------------------


def patchify(x, p: int, pf: int):
    """x [B, C, F, H, W] -> [B, (F/pf)(H/p)(W/p), pf*p*p*C]: tokens in (f, y, x) order, channels in (pf, py, px, c)."""
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f // pf, pf, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1)  # [B, Ft, Ht, Wt, pf, py, px, C]
    return x.reshape(b, (f // pf) * (h // p) * (w // p), pf * p * p * c)


def unpatchify(tokens, grid: tuple[int, int, int], p: int, pf: int, channels: int):
    """tokens [B, Ft*Ht*Wt, pf*p*p*C] -> [B, C, Ft*pf, Ht*p, Wt*p] (the inverse of `patchify`)."""
    ft, ht, wt = grid
    b = tokens.shape[0]
    x = tokens.reshape(b, ft, ht, wt, pf, p, p, channels)
    x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, Ft, pf, Ht, py, Wt, px]
    return x.reshape(b, channels, ft * pf, ht * p, wt * p)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Where every slot of the two streams comes from and where it sits (Lx image slots, Lc caption slots).

    The caption stream of row b is its own sequence of ceil(len_b / m) * m slots followed by batch padding: the
    official per-row layout inside one static [B, Lc] buffer.
    """

    x_pos: jax.Array  # [B, Lx, 3] int32 rope positions; pad slots (0, 0, 0)
    x_pad: jax.Array  # [B, Lx] bool: pad slot (holds x_pad_token)
    cap_pos: jax.Array  # [B, Lc, 3] int32 (1 + i, 0, 0); batch padding (0, 0, 0)
    cap_pad: jax.Array  # [B, Lc] bool: the row's pad slot (holds cap_pad_token)
    cap_valid: jax.Array  # [B, Lc] bool: part of the row's sequence (False = batch padding, masked)
    cap_src: jax.Array  # [B, Lc] int32: which caption row each slot copies (the last real one past the end)


def sequence_layout(grid: tuple[int, int, int], batch: int, cap_slots: int, cap_lens, m: int) -> SequenceLayout:
    """Positions and masks for an image token grid (Ft, Ht, Wt) and captions of `cap_lens` [B] (None: all of
    `cap_slots`, the static caption width). Shapes are static; only the values depend on `cap_lens`."""
    ft, ht, wt = grid
    n = ft * ht * wt
    lx, lc = ceil_to(n, m), ceil_to(cap_slots, m)
    lens = (jnp.full((batch,), cap_slots, jnp.int32) if cap_lens is None else jnp.asarray(cap_lens, jnp.int32))
    cap_padded = ceil_to(lens, m)  # [B] the row's padded caption length
    j = jnp.arange(lc, dtype=jnp.int32)[None, :]  # [1, Lc]
    cap_valid = j < cap_padded[:, None]
    cap_pad = (j >= lens[:, None]) & cap_valid
    cap_src = jnp.minimum(j, lens[:, None] - 1) * cap_valid  # batch padding copies row 0 (then zeroed)
    zeros_c = jnp.zeros((batch, lc), jnp.int32)
    cap_pos = jnp.stack([jnp.where(cap_valid, 1 + j, 0), zeros_c, zeros_c], axis=-1)

    idx = np.arange(lx)
    real = idx < n  # [Lx] static
    grid_pos = np.stack([idx // (ht * wt), (idx // wt) % ht, idx % wt], axis=-1).astype(np.int32)  # [Lx, 3]
    grid_pos = np.where(real[:, None], grid_pos, 0)
    t_pos = jnp.where(real[None, :], cap_padded[:, None] + 1 + grid_pos[None, :, 0], 0)  # [B, Lx]
    x_pos = jnp.concatenate([t_pos[..., None], jnp.broadcast_to(grid_pos[None, :, 1:], (batch, lx, 2))], axis=-1)
    x_pad = jnp.broadcast_to(~real[None, :], (batch, lx))
    return SequenceLayout(x_pos.astype(jnp.int32), x_pad, cap_pos.astype(jnp.int32), cap_pad, cap_valid,
                          cap_src.astype(jnp.int32))


def pad_repeat_last(tokens, length: int):
    """[B, N, P] -> [B, length, P], slots past N copying token N - 1."""
    idx = np.minimum(np.arange(length), tokens.shape[1] - 1)
    return tokens[:, idx]


# --- blocks ----------------------------------------------------------------------------------------------------------


class TimestepEmbedder(nnx.Module):
    """Model time scaled by t_scale -> [B, min(D, 256)]: sinusoid (float32) -> Linear -> SiLU -> Linear."""

    def __init__(self, cfg: DiTConfig, *, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.fc1 = Linear(cfg.t_freq_dim, cfg.t_mid_dim, (None, "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(cfg.t_mid_dim, cfg.adaln_dim, ("mlp", None), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, t_scaled, dtype):  # [B] -> [B, A]
        with jax.named_scope("t_embedder"):
            freq = timestep_sinusoid(t_scaled, self.cfg.t_freq_dim, self.cfg.t_max_period).astype(dtype)
            return self.fc2(jax.nn.silu(self.fc1(freq)))


class DiTAttention(nnx.Module):
    """Self-attention with per-head RMSNorm on q / k and the 3-axis rope; no biases."""

    def __init__(self, cfg: DiTConfig, *, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d, n, h = cfg.dim, cfg.n_heads, cfg.head_dim
        self.attention_impl = attention_impl
        qkv_axes = ("embed", "heads", "head_dim")
        self.q_kernel = param(rngs, fan_in_normal(), (d, n, h), qkv_axes, param_dtype)
        self.k_kernel = param(rngs, fan_in_normal(), (d, n, h), qkv_axes, param_dtype)
        self.v_kernel = param(rngs, fan_in_normal(), (d, n, h), qkv_axes, param_dtype)
        self.o_kernel = param(rngs, fan_in_normal((0, 1)), (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        norm = lambda: RMSNorm(h, eps=cfg.qk_norm_eps, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.q_norm = norm() if cfg.qk_norm else None
        self.k_norm = norm() if cfg.qk_norm else None

    def __call__(self, x, cos, sin, mask):  # x [B, T, D], cos / sin [B, T, hd/2]
        dt = x.dtype
        q = jnp.einsum("btd,dnh->btnh", x, read(self.q_kernel, dt))  # [B, T, N, hd]
        k = jnp.einsum("btd,dnh->btnh", x, read(self.k_kernel, dt))
        v = jnp.einsum("btd,dnh->btnh", x, read(self.v_kernel, dt))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_interleaved_rotary(q, cos, sin), apply_interleaved_rotary(k, cos, sin)
        o = attention(q, k, v, mask, impl=self.attention_impl)  # [B, T, N, hd]
        return jnp.einsum("btnh,nhd->btd", o, read(self.o_kernel, dt))


class DiTBlock(nnx.Module):
    """One transformer block; `modulated` (noise refiner, main layers) adds the adaLN scale / tanh gate."""

    def __init__(self, cfg: DiTConfig, *, modulated: bool, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d, eps = cfg.dim, cfg.norm_eps
        norm = lambda: RMSNorm(d, eps=eps, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.attention_norm1 = norm()
        self.attention = DiTAttention(cfg, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
        self.attention_norm2 = norm()
        self.ffn_norm1 = norm()
        self.feed_forward = GatedMLP(d, cfg.ffn_hidden, param_dtype=param_dtype, rngs=rngs)
        self.ffn_norm2 = norm()
        self.adaln = (Linear(cfg.adaln_dim, 4 * d, (None, "embed"), param_dtype=param_dtype, rngs=rngs)
                      if modulated else None)

    def __call__(self, x, cos, sin, mask, c):  # x [B, T, D], c [B, A] (None when unmodulated)
        with jax.named_scope("dit_block"):
            if self.adaln is None:
                x = x + self.attention_norm2(self.attention(self.attention_norm1(x), cos, sin, mask))
                return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
            b, d = x.shape[0], x.shape[-1]
            mod = self.adaln(c).reshape(b, 4, 1, d)  # [B, 4, 1, D]: scale_msa, gate_msa, scale_mlp, gate_mlp
            scale_msa, gate_msa, scale_mlp, gate_mlp = 1 + mod[:, 0], jnp.tanh(mod[:, 1]), 1 + mod[:, 2], \
                jnp.tanh(mod[:, 3])
            h = self.attention(self.attention_norm1(x) * scale_msa, cos, sin, mask)
            x = x + gate_msa * self.attention_norm2(h)
            h = self.feed_forward(self.ffn_norm1(x) * scale_mlp)
            return x + gate_mlp * self.ffn_norm2(h)


class FinalLayer(nnx.Module):
    """[B, T, D] -> [B, T, pf*p*p*C]: LayerNorm (no affine) * (1 + Linear(SiLU(c))) -> Linear."""

    def __init__(self, cfg: DiTConfig, out_dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.eps = cfg.final_norm_eps
        self.adaln = Linear(cfg.adaln_dim, cfg.dim, (None, "embed"), param_dtype=param_dtype, rngs=rngs)
        self.linear = Linear(cfg.dim, out_dim, ("embed", "patch"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, c):
        with jax.named_scope("final_layer"):
            d = x.shape[-1]
            scale = 1 + self.adaln(jax.nn.silu(c))  # [B, D]
            normed = layer_norm(x, jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32), self.eps)
            return self.linear(normed * scale[:, None, :])


def _block_stack(cfg: DiTConfig, count: int, *, modulated: bool, param_dtype, attention_impl: str,
                 rngs: nnx.Rngs) -> DiTBlock | None:
    """`count` blocks with their parameters stacked on a leading "layers" axis (None when count is 0)."""
    if count == 0:
        return None

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
    def make(rngs):
        return DiTBlock(cfg, modulated=modulated, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)

    return make(rngs)


def _run_stack(blocks: DiTBlock | None, x, cos, sin, mask, c, *, remat: bool):
    """The stacked blocks as one `nnx.scan` over the layers axis. The body is built per call on purpose: jax caches
    the trace of a scan body by function identity, and a module-level body would hide `weight_hook`s installed
    after its first trace."""
    if blocks is None:
        return x

    def body(x, block: DiTBlock, cos, sin, mask, c):
        return sharding.constrain(block(x, cos, sin, mask, c), _STREAM)

    if remat:
        body = nnx.remat(body)
    run = nnx.scan(body, in_axes=(nnx.Carry, 0, None, None, None, None), out_axes=nnx.Carry)
    return run(x, blocks, cos, sin, mask, c)


# --- the model -------------------------------------------------------------------------------------------------------


class ZImageDiT(nnx.Module):
    """The module whose parameters `ming_jax.weights.dit.dit_table` names. `__call__` is traceable; `dit_forward`
    is the jitted entry with host-side checks."""

    def __init__(self, cfg: DiTConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        pdt = jnp.dtype(runtime.param_dtype)
        d = cfg.dim
        self.x_embed = nnx.List([Linear(cfg.patch_dim(p, pf), d, ("patch", "embed"), param_dtype=pdt, rngs=rngs)
                                 for p, pf in cfg.patch_pairs])
        self.final = nnx.List([FinalLayer(cfg, cfg.patch_dim(p, pf), param_dtype=pdt, rngs=rngs)
                               for p, pf in cfg.patch_pairs])
        self.t_embed = TimestepEmbedder(cfg, param_dtype=pdt, rngs=rngs)
        self.cap_norm = RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.cap_proj = Linear(cfg.cap_feat_dim, d, (None, "embed"), param_dtype=pdt, rngs=rngs)
        self.x_pad_token = param(rngs, normal(0.02), (d,), ("embed",), pdt)
        self.cap_pad_token = param(rngs, normal(0.02), (d,), ("embed",), pdt)
        stack = functools.partial(_block_stack, cfg, param_dtype=pdt, attention_impl=runtime.attention, rngs=rngs)
        self.noise_refiner = stack(cfg.n_refiner_layers, modulated=True)
        self.context_refiner = stack(cfg.n_refiner_layers, modulated=False)
        self.layers = stack(cfg.n_layers, modulated=True)

    def patch_index(self, patch: tuple[int, int] | None) -> int:
        """Which embedder / final layer a (patch, frame patch) pair uses. None: the official call's default (2, 1)
        when configured, else the only configured pair."""
        pairs = self.cfg.patch_pairs
        if patch is None:
            if (2, 1) in pairs:
                return pairs.index((2, 1))
            if len(pairs) == 1:
                return 0
            raise ValueError(f"DiT: give patch=(patch, frame patch), one of {list(pairs)}")
        patch = tuple(int(v) for v in patch)
        if patch not in pairs:
            raise ValueError(f"DiT: patch {patch} is not configured (all_patch_size / all_f_patch_size give "
                             f"{list(pairs)})")
        return pairs.index(patch)

    def check_inputs(self, x, t, cap_feats, cap_lens, ref_x, patch) -> tuple[int, int, int]:
        """Static shape checks (ValueError naming the shape); returns the image token grid (Ft, Ht, Wt)."""
        cfg = self.cfg
        p, pf = cfg.patch_pairs[self.patch_index(patch)]
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"DiT: x must be [B, {cfg.in_channels}, F, H, W], got {tuple(x.shape)}")
        b, _, f, h, w = x.shape
        if ref_x is not None:
            if ref_x.ndim != 5 or ref_x.shape[:2] != (b, cfg.in_channels) or ref_x.shape[3:] != (h, w):
                raise ValueError(f"DiT: ref_x must be [{b}, {cfg.in_channels}, Fr, {h}, {w}] like x "
                                 f"{tuple(x.shape)}, got {tuple(ref_x.shape)}")
            f += ref_x.shape[2]
        if h % p or w % p or f % pf:
            raise ValueError(f"DiT: latent (F, H, W) = {(f, h, w)} (frames incl. ref_x) is not divisible by the "
                             f"patch (frame {pf}, spatial {p})")
        if t.shape not in ((), (b,)):
            raise ValueError(f"DiT: t must be [B] = [{b}] (or a scalar), got {tuple(t.shape)}")
        if cap_feats.ndim != 3 or cap_feats.shape[0] != b or cap_feats.shape[2] != cfg.cap_feat_dim:
            raise ValueError(f"DiT: cap_feats must be [{b}, L, cap_feat_dim={cfg.cap_feat_dim}], got "
                             f"{tuple(cap_feats.shape)}")
        if cap_feats.shape[1] == 0:
            raise ValueError("DiT: cap_feats has no caption token (L = 0)")
        if cap_lens is not None and tuple(cap_lens.shape) != (b,):
            raise ValueError(f"DiT: cap_lens must be [B] = [{b}], got {tuple(cap_lens.shape)}")
        grid = (f // pf, h // p, w // p)
        lc = ceil_to(cap_feats.shape[1], cfg.seq_multiple)
        need = (lc + grid[0] + 1, grid[1], grid[2])  # table lengths the largest positions need
        if any(n > have for n, have in zip(need, cfg.axes_lens)):
            raise ValueError(f"DiT: positions need rope tables of {need} (caption {lc} slots + {grid[0]} frames, "
                             f"{grid[1]} x {grid[2]} tokens), more than axes_lens={list(cfg.axes_lens)}")
        return grid

    def __call__(self, x, t, cap_feats, cap_lens=None, ref_x=None, *, patch: tuple[int, int] | None = None,
                 taps: bool = False):
        """x [B, C, F, H, W], t [B] model time, cap_feats [B, L, Dc], cap_lens [B] int or None, ref_x
        [B, C, Fr, H, W] or None -> [B, C, 1, H, W] in the compute dtype (and a dict of intermediates with taps)."""
        cfg, rt = self.cfg, self.runtime
        t = jnp.asarray(t)
        grid = self.check_inputs(x, t, cap_feats, cap_lens, ref_x, patch)
        k = self.patch_index(patch)
        p, pf = cfg.patch_pairs[k]
        dt = jnp.dtype(rt.dtype)
        b = x.shape[0]
        t = jnp.broadcast_to(t, (b,))
        if ref_x is not None:
            x = jnp.concatenate([x, ref_x.astype(x.dtype)], axis=2)  # the reference is one more frame
        n = grid[0] * grid[1] * grid[2]
        lx = ceil_to(n, cfg.seq_multiple)
        layout = sequence_layout(grid, b, cap_feats.shape[1], cap_lens, cfg.seq_multiple)

        with jax.named_scope("embed"):
            tokens = pad_repeat_last(patchify(x, p, pf), lx)  # [B, Lx, pf*p*p*C]
            c = self.t_embed(t.astype(jnp.float32) * cfg.t_scale, dt)  # [B, A]
            x_emb = self.x_embed[k](tokens.astype(dt))  # [B, Lx, D]
            xs = jnp.where(layout.x_pad[..., None], read(self.x_pad_token, dt), x_emb)
            cap_rows = jnp.take_along_axis(cap_feats, layout.cap_src[..., None], axis=1)  # [B, Lc, Dc]
            cap_emb = self.cap_proj(self.cap_norm(cap_rows.astype(dt)))  # [B, Lc, D]
            cs = jnp.where(layout.cap_pad[..., None], read(self.cap_pad_token, dt), cap_emb)
            cs = jnp.where(layout.cap_valid[..., None], cs, jnp.zeros((), dt))  # batch padding: zeros
            x_cos, x_sin = rope_cos_sin(layout.x_pos, cfg)
            cap_cos, cap_sin = rope_cos_sin(layout.cap_pos, cfg)

        cap_seg = layout.cap_valid.astype(jnp.int32)  # 1 = the row's sequence, 0 = batch padding
        cap_mask = None if cap_lens is None else AttentionMask.self_attention(cap_seg, causal=False)
        run = functools.partial(_run_stack, remat=rt.remat)
        with jax.named_scope("noise_refiner"):
            xs = run(self.noise_refiner, sharding.constrain(xs, _STREAM), x_cos, x_sin, None, c)
        with jax.named_scope("context_refiner"):
            cs = run(self.context_refiner, sharding.constrain(cs, _STREAM), cap_cos, cap_sin, cap_mask, None)
        with jax.named_scope("main_layers"):
            u = jnp.concatenate([xs, cs], axis=1)  # [B, Lx + Lc, D]
            u_cos, u_sin = jnp.concatenate([x_cos, cap_cos], axis=1), jnp.concatenate([x_sin, cap_sin], axis=1)
            u_mask = None if cap_lens is None else AttentionMask.self_attention(
                jnp.concatenate([jnp.ones((b, lx), jnp.int32), cap_seg], axis=1), causal=False)
            u = run(self.layers, sharding.constrain(u, _STREAM), u_cos, u_sin, u_mask, c)
        final = self.final[k](u, c)  # [B, Lx + Lc, pf*p*p*C]
        out = unpatchify(final[:, :n], grid, p, pf, cfg.out_channels)[:, :, :1]  # [B, C, 1, H, W]
        if not taps:
            return out
        return out, dict(
            x_tokens=tokens, x_pad_mask=layout.x_pad, cap_pad_mask=layout.cap_pad, cap_valid=layout.cap_valid,
            x_pos_ids=layout.x_pos, cap_pos_ids=layout.cap_pos, x_embed=x_emb, t_embed=c, cap_embed=cap_emb,
            after_noise_refiner=xs, after_context_refiner=cs, after_main_layers=u, final_layer=final)


@functools.partial(nnx.jit, static_argnames=("patch", "taps"))
def _forward(model: ZImageDiT, x, t, cap_feats, cap_lens, ref_x, *, patch, taps):
    return model(x, t, cap_feats, cap_lens, ref_x, patch=patch, taps=taps)


def dit_forward(model: ZImageDiT, x, t, cap_feats, *, cap_lens=None, ref_x=None,
                patch: tuple[int, int] | None = None, taps: bool = False) -> Any:
    """The official `ZImageTransformer2DModel.forward(list(x), t, list(cap_feats), patch, f_patch, ref_x=list(ref_x))`
    on stacked inputs, jitted: one compilation per distinct set of shapes (and patch / taps / with-or-without
    cap_lens / ref_x); new values of the same shapes reuse it.

    x [B, C, F, H, W]; t [B] model time (1 - sigma); cap_feats [B, L, Dc]; cap_lens [B] int, 1 <= len <= L, the real
    caption length of each row (rows of different lengths, as a list of captions is to the official code; None:
    every row has L); ref_x [B, C, Fr, H, W] the editing reference. Returns [B, C, 1, H, W] (frame 0), and with
    taps=True also the intermediates (`x_embed` / `cap_embed` before the pad-token substitution; per-row layouts
    as in `SequenceLayout`).
    """
    x, t, cap_feats = jnp.asarray(x), jnp.asarray(t), jnp.asarray(cap_feats)
    ref_x = None if ref_x is None else jnp.asarray(ref_x)
    if cap_lens is not None:
        if not isinstance(cap_lens, jax.core.Tracer):
            lens = np.asarray(cap_lens)
            if not np.issubdtype(lens.dtype, np.integer) or lens.ndim != 1:
                raise ValueError(f"DiT: cap_lens must be a 1-D integer array, got {lens.dtype} {lens.shape}")
            if lens.size and (lens.min() < 1 or lens.max() > cap_feats.shape[1]):
                raise ValueError(f"DiT: cap_lens {lens.tolist()} must lie in [1, L={cap_feats.shape[1]}]")
        cap_lens = jnp.asarray(cap_lens, jnp.int32)
    index = model.patch_index(patch)
    model.check_inputs(x, t, cap_feats, cap_lens, ref_x, patch)
    return _forward(model, x, t, cap_feats, cap_lens, ref_x, patch=model.cfg.patch_pairs[index], taps=taps)
