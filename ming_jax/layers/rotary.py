"""Rotary position embeddings: 1-D, 2-D (vision) and the BailingMoeV2 3-D "video rope" (rotate-half layout), and
the interleaved-pair rotation of the Z-Image DiT and the talker's flow head.

All functions are pure and work in float32. Text positions are the special case of 3-D positions whose three rows
are equal, for which the video rope is exactly the ordinary 1-D rope.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def inv_frequencies(rotary_dim: int, theta: float) -> jnp.ndarray:
    """Default RoPE inverse frequencies: theta ** (-2i / rotary_dim), i < rotary_dim / 2.  # [rotary_dim // 2]"""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    return jnp.asarray(1.0 / (theta**exponents), dtype=jnp.float32)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotate the first `cos.shape[-1]` channels of x ([..., T, N, hd]) with cos/sin ([..., T, rd]); rest passes."""
    rd = cos.shape[-1]
    cos = cos[..., None, :].astype(jnp.float32)  # broadcast over heads
    sin = sin[..., None, :].astype(jnp.float32)
    x_rot = x[..., :rd].astype(jnp.float32)
    out = x_rot * cos + rotate_half(x_rot) * sin
    return jnp.concatenate([out.astype(x.dtype), x[..., rd:]], axis=-1)


@functools.lru_cache(maxsize=None)
def video_rope_rows(rotary_dim: int, mrope_section: tuple[int, int, int] = (8, 12, 12)) -> tuple[int, ...]:
    """For each rotary channel, which position row (0 = t, 1 = h, 2 = w) drives it.

    The layout of BailingMoeV2's video rope, over the frequency channels of `concat(freqs, freqs)`: for each of the
    two halves, the first (h + w) channels alternate h, w, h, w, ... and the next t channels take the time row; the
    section sizes come from `mrope_section = (t, h, w)` (the release hard-codes (8, 12, 12), which fits rotary_dim
    64). Channels past `2 * sum(mrope_section)` are not rotated, as in the release.
    """
    t, h, w = mrope_section
    rows: list[int] = []
    for _ in range(2):
        rows += [1 if j % 2 == 0 else 2 for j in range(h + w)]
        rows += [0] * t
    return tuple(rows[:rotary_dim])


def video_rope_cos_sin(positions, inv_freq, mrope_section: Sequence[int] = (8, 12, 12)):
    """positions [3, B, T] (t, h, w rows) -> cos, sin [B, T, rd] with rd = min(rotary_dim, 2 * sum(sections))."""
    rotary_dim = 2 * inv_freq.shape[0]
    rows = np.asarray(video_rope_rows(rotary_dim, tuple(mrope_section)))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, rd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [3, B, T, rotary_dim]
    channels = np.arange(len(rows))
    picked = emb[rows, ..., channels]  # advanced indices first: [rd, B, T]
    picked = jnp.moveaxis(picked, 0, -1)  # [B, T, rd]
    return jnp.cos(picked), jnp.sin(picked)


def rope_cos_sin(positions, inv_freq):
    """1-D rope: positions [B, T] -> cos, sin [B, T, 2 * len(inv_freq)]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_interleaved_rotary(x, cos, sin):
    """x [B, T, N, hd], cos / sin [B, T, hd / 2]: rotate each (even, odd) channel pair by its angle, in float32.

    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin): the complex product (x0 + i x1) e^{i angle}.
    """
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [B, T, N, hd/2, 2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
