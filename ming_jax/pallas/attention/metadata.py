"""Segment ids and padding for splash attention: how our masks become a static mask plus per-token ids.

Every mask the project builds for full-sequence attention is "causal or not" and-ed with "same segment": padding is
segment 0 and real tokens 1, 2, ... (several documents packed in one row), the ViT's per-image block diagonal is one
segment per image / frame. Splash takes exactly that: a static mask (here causal or full) and segment ids.

Splash needs lengths that are multiples of its tiles, so sequences are padded at the end. The padded keys get
segment id -1, which no real query carries (ids are >= 0), so they are invisible to real rows. The padded queries
get the id of key 0, so each of them sees at least key 0 (key 0 is never after any query slot): no padded row is
empty, its softmax stays finite, and since its output is sliced off (zero cotangent) it adds nothing to dk / dv.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

PAD_KEY_ID = -1


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_lengths(q_len: int, kv_len: int, q_multiple: int, kv_multiple: int, causal: bool) -> tuple[int, int]:
    """Padded (query, key) lengths. Causal attention is self-attention (equal lengths) and stays square when padded."""
    if causal:
        if q_len != kv_len:
            raise ValueError(f"causal splash attention needs equal query and key lengths, got {q_len} and {kv_len} "
                             "(use the reference path for cached decoding)")
        n = round_up(q_len, math.lcm(q_multiple, kv_multiple))
        return n, n
    return round_up(q_len, q_multiple), round_up(kv_len, kv_multiple)


def segment_ids(q_ids, kv_ids, batch: int, q_len: int, kv_len: int, q_pad: int, kv_pad: int):
    """Per-row segment ids [B, q_pad] / [B, kv_pad] int32 for the kernel, or None when nothing needs masking.

    q_ids [B, q_len] / kv_ids [B, kv_len] are the caller's ids (None: one segment), both or neither.
    """
    if (q_ids is None) != (kv_ids is None):
        raise ValueError("give both query and key segment ids, or neither")
    if q_ids is None and q_pad == q_len and kv_pad == kv_len:
        return None
    if q_ids is None:
        q_ids = jnp.zeros((batch, q_len), jnp.int32)
        kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
    q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
    for name, ids, n in (("query", q_ids, q_len), ("key", kv_ids, kv_len)):
        if ids.shape != (batch, n):
            raise ValueError(f"{name} segment ids have shape {ids.shape}, expected {(batch, n)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} segment ids must be integers, got {ids.dtype}")
    q_ids, kv_ids = q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
    kv_full = jnp.pad(kv_ids, ((0, 0), (0, kv_pad - kv_len)), constant_values=PAD_KEY_ID)
    q_fill = jnp.broadcast_to(kv_ids[:, :1], (batch, q_pad - q_len))  # padded queries join key 0's segment
    q_full = jnp.concatenate([q_ids, q_fill], axis=1)
    return splash.SegmentIds(q=q_full, kv=kv_full)


def pad_sequence(x, length: int, axis: int):
    """Zero-pad axis `axis` of x up to `length`."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)
