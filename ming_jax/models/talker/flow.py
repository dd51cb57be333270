"""The talker's flow-matching head: a small DiT that predicts the velocity of the next patch of acoustic latents,
and the Euler sampler (EPSS time grid with sway, classifier-free guidance, an optional SDE term) around it.

One DiT call (N rows; P = patch_size, Hp = history_patch_size, C = latent_dim, D = hidden_size):

    t [N] in [0, 1] -> sinusoid(1000 t) (256 wide, [sin, cos], f_k = exp(-k ln(1e4) / 127)) -> Linear-SiLU-Linear
    cond [N, H] (the LM's last hidden state) -> Linear(H, D); condition token = t_embed + c_embed       [N, 1, D]
    [history [N, Hp, C] ; noisy patch [N, P, C]] -> x_embed Linear(C, D)                                [N, Hp+P, D]
    [condition token ; embedded latents] -> blocks -> RMSNorm -> Linear(D, C)                        [N, 1+Hp+P, C]
    velocity = the last P rows.

Blocks (shared with the aggregator, `HeadBlocks`): x += attn(RMSNorm(x)), x += MLP(RMSNorm(x)); attention with biased
q / k / v / out, optional per-head RMSNorm on q and k (eps 1e-6), rope (x_transformers' RotaryEmbedding: theta 1e4,
interleaved channel pairs, positions 0 .. L-1, on all heads or the first `pe_attn_head`), no mask; tanh-GELU MLP.

Sampler (the release's `CFM.sample`): times t_i = sway(epss(steps)), sway(t) = t + coef (cos(pi t / 2) - 1 + t)
(coef -1: 1 - cos(pi t / 2)); for i < steps, dt = t_{i+1} - t_i:
    v = v(y | cond) + cfg (v(y | cond) - v(y | 0))        (one DiT call on the batch [cond ; zero cond])
    y <- y + v dt + sigma sqrt(temperature) sqrt(|dt|) eps_i
The Euler state stays float32 whatever the compute dtype. Noise y0 / eps comes from the caller (a JAX key or
recorded noise, see `ming_jax.gen.speech`).

Parameter axis names: "embed" (D), "heads", "head_dim", "mlp" (the block MLPs' and the timestep MLP's inner width),
"layers"; None for the latent channels, the LM width of the condition and the sinusoid. No new names.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.config.runtime import Runtime
from ming_jax.config.talker import HEAD_NORM_EPS, HEAD_ROPE_THETA, TIME_FREQ_DIM, FlowModelConfig, HeadBlocksConfig
from ming_jax.layers.linear import Linear
from ming_jax.layers.mlp import GeluMLP
from ming_jax.layers.norms import RMSNorm
from ming_jax.layers.params import fan_in_normal, param, read, zeros
from ming_jax.layers.rotary import apply_interleaved_rotary
from ming_jax.pallas.attention.api import attention

_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}

# EPSS time grids (units of 1/32) the release predefines; other step counts use a uniform grid.
_EPSS = {5: (0, 2, 4, 8, 16, 32), 6: (0, 2, 4, 6, 8, 16, 32), 7: (0, 2, 4, 6, 8, 16, 24, 32),
         10: (0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32), 12: (0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32),
         16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)}


# --- pure math: time grid, time embedding, rope ----------------------------------------------------------------------


def epss_times(steps: int) -> np.ndarray:
    """[steps + 1] float32 in [0, 1]: the predefined EPSS grid, or linspace(0, 1, steps + 1)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: at least one Euler step")
    if steps in _EPSS:
        return np.float32(1 / 32) * np.asarray(_EPSS[steps], np.float32)
    return np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)


def time_grid(steps: int, sway_coef: float | None = -1.0) -> np.ndarray:
    """[steps + 1] float32: the sampler's times after sway sampling (float32 arithmetic, as the release's)."""
    t = epss_times(steps)
    if sway_coef is None:
        return t
    warp = np.cos(np.float32(math.pi / 2) * t, dtype=np.float32) - np.float32(1) + t
    return (t + np.float32(sway_coef) * warp).astype(np.float32)


def timestep_sinusoid(t, dim: int = TIME_FREQ_DIM, scale: float = 1000.0):
    """t [N] -> [N, dim] float32 = [sin(scale t f), cos(scale t f)], f_k = exp(-k ln(1e4) / (dim/2 - 1)).

    The exponent is a float32 product as torch forms it, its exp correctly rounded; `scale * t` is formed first."""
    half = dim // 2
    step = np.float32(math.log(10000.0) / (half - 1))
    freqs = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)  # [half]
    args = (jnp.float32(scale) * t.astype(jnp.float32))[:, None] * freqs[None, :]  # [N, half]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


@functools.lru_cache(maxsize=None)
def rope_table(length: int, head_dim: int, theta: float = HEAD_ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [1, length, head_dim / 2] float32 for positions 0 .. length-1: the float32 angle pos * inv_freq
    (x_transformers' einsum), cos / sin correctly rounded. Each pair (2k, 2k+1) of a head rotates by angle k."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)  # [hd / 2], float32 as torch's
    angles = (np.arange(length, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float64)
    return np.cos(angles).astype(np.float32)[None], np.sin(angles).astype(np.float32)[None]


# --- the blocks both heads share -------------------------------------------------------------------------------------


class HeadAttention(nnx.Module):
    def __init__(self, cfg: HeadBlocksConfig, *, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.impl = attention_impl
        self.rope_heads = cfg.rope_heads
        qkv = lambda: param(rngs, fan_in_normal(), (d, n, h), ("embed", "heads", "head_dim"), param_dtype)  # noqa
        bias = lambda: param(rngs, zeros, (n, h), ("heads", "head_dim"), param_dtype)  # noqa: E731
        self.q, self.q_bias, self.k, self.k_bias, self.v, self.v_bias = qkv(), bias(), qkv(), bias(), qkv(), bias()
        self.out = param(rngs, fan_in_normal((0, 1)), (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        self.out_bias = param(rngs, zeros, (d,), ("embed",), param_dtype)
        norm = lambda: RMSNorm(h, eps=HEAD_NORM_EPS, axis_name="head_dim", param_dtype=param_dtype,  # noqa: E731
                               rngs=rngs)
        self.q_norm = norm() if cfg.qk_norm else None
        self.k_norm = norm() if cfg.qk_norm else None

    def _rope(self, x, cos, sin):  # x [N, L, heads, hd]: the first `rope_heads` heads rotate
        r = self.rope_heads
        if r == 0:
            return x
        if r == x.shape[2]:
            return apply_interleaved_rotary(x, cos, sin)
        return jnp.concatenate([apply_interleaved_rotary(x[:, :, :r], cos, sin), x[:, :, r:]], axis=2)

    def __call__(self, x, cos, sin):  # x [N, L, D], cos / sin [1, L, hd / 2]
        dt = x.dtype
        q = jnp.einsum("btd,dnh->btnh", x, read(self.q, dt)) + read(self.q_bias, dt)  # [N, L, heads, hd]
        k = jnp.einsum("btd,dnh->btnh", x, read(self.k, dt)) + read(self.k_bias, dt)
        v = jnp.einsum("btd,dnh->btnh", x, read(self.v, dt)) + read(self.v_bias, dt)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        o = attention(q, k, v, None, impl=self.impl)  # [N, L, heads, hd]
        return jnp.einsum("btnh,nhd->btd", o, read(self.out, dt)) + read(self.out_bias, dt)


class HeadBlock(nnx.Module):
    """x + attn(RMSNorm(x)), then x + tanh-GELU MLP(RMSNorm(x))."""

    def __init__(self, cfg: HeadBlocksConfig, *, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.norm1 = RMSNorm(d, eps=HEAD_NORM_EPS, axis_name="embed", param_dtype=param_dtype, rngs=rngs)
        self.attn = HeadAttention(cfg, param_dtype=param_dtype, attention_impl=attention_impl, rngs=rngs)
        self.norm2 = RMSNorm(d, eps=HEAD_NORM_EPS, axis_name="embed", param_dtype=param_dtype, rngs=rngs)
        self.mlp = GeluMLP(d, cfg.mlp_hidden, approximate=True, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin):
        with jax.named_scope("head_block"):
            x = x + self.attn(self.norm1(x), cos, sin)
            return x + self.mlp(self.norm2(x))


class HeadBlocks(nnx.Module):
    """`depth` blocks stacked on a leading "layers" axis, run as one `nnx.scan`, then the final RMSNorm -> Linear."""

    def __init__(self, cfg: HeadBlocksConfig, out_dim: int, runtime: Runtime, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(runtime.param_dtype)
        self.cfg = cfg
        self.remat = runtime.remat

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
        def make(r):
            return HeadBlock(cfg, param_dtype=pdt, attention_impl=runtime.attention, rngs=r)

        self.layers = make(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, eps=HEAD_NORM_EPS, axis_name="embed", param_dtype=pdt, rngs=rngs)
        self.final = Linear(cfg.hidden_size, out_dim, ("embed", None), param_dtype=pdt, rngs=rngs)

    def __call__(self, x):  # [N, L, D] -> [N, L, out]
        cos, sin = rope_table(x.shape[1], self.cfg.head_dim)

        def body(x, block: HeadBlock, cos, sin):  # built per call: a module-level body would hide weight hooks
            return block(x, cos, sin)

        if self.remat:
            body = nnx.remat(body)
        x = nnx.scan(body, in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry)(x, self.layers, jnp.asarray(cos),
                                                                                    jnp.asarray(sin))
        with jax.named_scope("final_layer"):
            return self.final(self.final_norm(x))


# --- the DiT ---------------------------------------------------------------------------------------------------------


class TimestepEmbedder(nnx.Module):
    def __init__(self, dim: int, *, param_dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(TIME_FREQ_DIM, dim, (None, "mlp"), param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(dim, dim, ("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, t, dtype):  # [N] -> [N, D]
        with jax.named_scope("t_embedder"):
            return self.fc2(jax.nn.silu(self.fc1(timestep_sinusoid(t).astype(dtype))))


class FlowDiT(nnx.Module):
    """The release's `DiT` (`cfm.model`): `__call__` gives the final layer on all 1 + Hp + P tokens."""

    def __init__(self, cfg: FlowModelConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        pdt = jnp.dtype(runtime.param_dtype)
        d, c = cfg.hidden_size, cfg.in_channels
        self.cfg = cfg
        self.runtime = runtime
        self.t_embedder = TimestepEmbedder(d, param_dtype=pdt, rngs=rngs)
        self.x_embedder = Linear(c, d, (None, "embed"), param_dtype=pdt, rngs=rngs)
        self.c_embedder = Linear(cfg.llm_cond_dim, d, (None, "embed"), param_dtype=pdt, rngs=rngs)
        self.blocks = HeadBlocks(cfg, c, runtime, rngs=rngs)

    def __call__(self, x, t, cond, history):
        """x [N, P, C] noisy patch, t [N] times, cond [N, H] LM states, history [N, Hp, C] -> [N, 1+Hp+P, C]."""
        dt = jnp.dtype(self.runtime.dtype)
        with jax.named_scope("embed"):
            lat = self.x_embedder(jnp.concatenate([history, x], axis=1).astype(dt))  # [N, Hp + P, D]
            token = self.t_embedder(t, dt) + self.c_embedder(cond.astype(dt))  # [N, D]
            seq = jnp.concatenate([token[:, None, :], lat], axis=1)  # [N, 1 + Hp + P, D]
        return self.blocks(seq)


def guided_velocity(dit: FlowDiT, y, t, cond, history, cfg_strength):
    """v(y | cond) + cfg (v(y | cond) - v(y | 0)) from one DiT call on [cond ; zeros]: y [B, P, C], t [] time,
    cond [B, H], history [B, Hp, C]. Returns (v [B, P, C] float32, (the DiT's x [2B, P, C], t [2B], output
    [2B, 1+Hp+P, C]))."""
    b, p = y.shape[0], y.shape[1]
    x2 = jnp.concatenate([y, y], axis=0)
    t2 = jnp.broadcast_to(t, (2 * b,))
    out = dit(x2, t2, jnp.concatenate([cond, jnp.zeros_like(cond)], axis=0),
              jnp.concatenate([history, history], axis=0))
    pred = out[:, -p:].astype(jnp.float32)
    v_c, v_u = pred[:b], pred[b:]
    return v_c + (v_c - v_u) * cfg_strength, (x2, t2, out)


def sample(dit: FlowDiT, cond, history, y0, sde_noise, *, steps: int, cfg_strength, sigma, temperature,
           sway_coef: float | None = -1.0, taps: bool = False):
    """The Euler sampler: cond [B, H], history [B, Hp, C], y0 [B, P, C], sde_noise [steps, B, P, C]; cfg_strength,
    sigma, temperature scalars (traced: new values reuse the compiled program). Returns the latents [B, P, C]
    float32, and with taps the DiT inputs / outputs of every Euler step ({"dit_x": [steps, 2B, P, C], "dit_t":
    [steps, 2B], "dit_out": [steps, 2B, 1+Hp+P, C]})."""
    times = time_grid(steps, sway_coef)
    t, dts = jnp.asarray(times[:-1]), jnp.asarray(np.diff(times))  # [steps] each
    noise_scale = jnp.asarray(sigma, jnp.float32) * jnp.sqrt(jnp.asarray(temperature, jnp.float32))
    graphdef, state = nnx.split(dit)  # the module is rebuilt inside the loop body, at the body's trace level

    def euler(y, xs):
        t_i, dt_i, eps = xs
        v, tap = guided_velocity(nnx.merge(graphdef, state, copy=True), y, t_i, cond, history, cfg_strength)
        y = y + v * dt_i
        y = y + noise_scale * jnp.sqrt(jnp.abs(dt_i)) * eps.astype(jnp.float32)
        return y, (tap if taps else None)

    with jax.named_scope("cfm_sample"):
        y, recorded = jax.lax.scan(euler, y0.astype(jnp.float32), (t, dts, sde_noise))
    if not taps:
        return y
    x_in, t_in, out = recorded
    return y, {"dit_x": x_in, "dit_t": t_in, "dit_out": out}
