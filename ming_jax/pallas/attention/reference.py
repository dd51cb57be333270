"""The plain-XLA attention: the implementation every backend falls back to and the oracle every kernel is tested
against. Grouped-query attention without repeating KV heads, float32 softmax, boolean masks; plus the masks
(causal, segment ids) as dense booleans, and the splash kernel's contract (segment ids + causal) in plain jnp."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


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


def attend(q, k, v, mask=None, *, scale: float | None = None):
    """q [B, T, H, hd], k/v [B, S, K, hd] with H % K == 0; mask broadcastable to [B, H, T, S] (True = attend).

    Returns [B, T, H, hd]. Query head h uses KV head h // (H // K), as in `repeat_kv`. Rows whose mask is all False
    (padding queries) return an average of values rather than NaN.
    """
    b, t, h, d = q.shape
    probs = _grouped_probabilities(q, k, mask, scale)  # [B, K, G, T, S] float32

    def low_precision(probs, v):  # the probabilities in v's dtype, float32 accumulation
        return jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)

    def cpu(probs, v):
        # XLA:CPU's dot thunk has no bf16 x bf16 -> f32 kernel for the layout this product gets inside the decode
        # loop at batch > 1 ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"): the same values
        # (probabilities rounded to v's dtype) as float32 operands, whose products are exact, so the numerics stay
        # those of the low-precision product.
        return jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype).astype(jnp.float32), v.astype(jnp.float32))

    if v.dtype == jnp.float32:
        out = low_precision(probs, v)
    else:
        out = lax.platform_dependent(probs, v, cpu=cpu, default=low_precision)
    return out.reshape(b, t, h, d).astype(q.dtype)


def probabilities(q, k, mask=None, *, scale: float | None = None):
    """The softmax weights `attend` puts on each key: q [B, T, H, hd], k [B, S, K, hd] -> [B, H, T, S] float32
    (query head h reads KV head h // (H // K)). For inspection (attention maps); the kernels never form them."""
    b, t, h, _ = q.shape
    return _grouped_probabilities(q, k, mask, scale).reshape(b, h, t, k.shape[1])


def _grouped_probabilities(q, k, mask, scale):
    """[B, K, G, T, S] float32 softmax over keys, masked keys at 0 (an all-masked row: uniform)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"{h} query heads are not a multiple of {kv} kv heads")
    g = h // kv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)  # [B, K, G, T, S]
    if mask is not None:
        mask = jnp.broadcast_to(mask, (b, h, t, k.shape[1])).reshape(b, kv, g, t, k.shape[1])
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def segment_mask(q_segments, kv_segments):
    """Block-diagonal mask from segment ids: [B, T], [B, S] -> [B, 1, T, S] (True where ids match)."""
    return (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]


def causal_mask(q_positions, kv_positions):
    """[B, T], [B, S] slot indices -> [B, 1, T, S], True where the key slot is not after the query slot."""
    return (kv_positions[:, None, :] <= q_positions[:, :, None])[:, None]
