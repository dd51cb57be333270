"""Splash attention in the project's layout: q [B, T, H, hd], k / v [B, S, K, hd] with H a multiple of K.

The public function does the layout work around jax's kernel and nothing else:
  scale q (splash takes pre-scaled queries), move heads before sequence ([B, H, T, hd]), pad both sequences to the
  tiles (`metadata`), build segment ids, call the cached single-device kernel (`kernel.make_kernel`) vmapped over the
  batch, slice and move the heads back.
Gradients are splash's own custom VJP (dq and dkv kernels); padding and transposes differentiate as plain jnp.
Under a mesh, wrap this in `shard_map` (batch and heads shard freely; the kv sequence must stay whole per device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ming_jax.pallas.attention import metadata
from ming_jax.pallas.attention.kernel import BlockSizes, make_kernel


def splash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, causal: bool = False,
                     scale: float | None = None, block_sizes: BlockSizes | None = None, interpret=False):
    """Grouped-query attention with a causal-or-full static mask and optional segment ids ([B, T] / [B, S] int, >= 0).

    Query i attends key j iff (not causal or j <= i) and q_segment_ids[i] == kv_segment_ids[j]; every query must see
    at least one key (true for self-attention). Causal requires T == S. Returns [B, T, H, hd] in q's dtype; softmax
    and accumulation are float32 inside the kernel. `interpret` runs the kernels in a Pallas interpreter (CPU tests).
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, T, H, hd] and k = v [B, S, K, hd]; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {k.shape} does not match q {q.shape} in batch or head dim")
    if h % kv_heads:
        raise ValueError(f"{h} query heads are not a multiple of {kv_heads} kv heads")
    if t == 0 or s == 0:
        raise ValueError(f"empty sequence: T={t}, S={s}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    blocks = block_sizes or BlockSizes.get_default(t, s)
    t_pad, s_pad = metadata.padded_lengths(t, s, blocks.q_multiple, blocks.kv_multiple, causal)
    segments = metadata.segment_ids(q_segment_ids, kv_segment_ids, b, t, s, t_pad, s_pad)
    kernel = make_kernel(h, t_pad, s_pad, causal, blocks, interpret)

    scale = d**-0.5 if scale is None else scale
    qh = jnp.swapaxes(metadata.pad_sequence(q * jnp.asarray(scale, q.dtype), t_pad, 1), 1, 2)  # [B, H, Tp, hd]
    kh = jnp.swapaxes(metadata.pad_sequence(k, s_pad, 1), 1, 2)  # [B, K, Sp, hd]
    vh = jnp.swapaxes(metadata.pad_sequence(v, s_pad, 1), 1, 2)
    with jax.named_scope("splash_attention"):
        if segments is None:
            out = jax.vmap(kernel)(qh, kh, vh)
        else:
            out = jax.vmap(kernel)(qh, kh, vh, segments)  # [B, H, Tp, hd]
    return jnp.swapaxes(out, 1, 2)[:, :t]
