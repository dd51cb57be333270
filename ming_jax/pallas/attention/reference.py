"""Plain-jnp reference for the splash wiring: the same (segment ids, causal) contract as a dense boolean mask fed to
the project's one reference attention, `ming_jax.layers.attention_core.attend` (float32 softmax, no tiling)."""

from __future__ import annotations

import jax.numpy as jnp

from ming_jax.layers.attention_core import attend


def dense_mask(q_len: int, kv_len: int, *, q_segment_ids=None, kv_segment_ids=None, causal: bool = False):
    """[B|1, 1, T, S] bool: key slot <= query slot (if causal) and equal segment ids (if given); True = attend."""
    mask = jnp.ones((1, 1, q_len, kv_len), bool)
    if causal:
        mask = mask & (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])[None, None]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    return mask


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool = False, scale: float | None = None):
    """q [B, T, H, hd], k / v [B, S, K, hd] -> [B, T, H, hd], the contract of `splash.splash_attention`."""
    mask = dense_mask(q.shape[1], k.shape[1], q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                      causal=causal)
    return attend(q, k, v, mask, scale=scale)
