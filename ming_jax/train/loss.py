"""Losses of the train step: next-token cross-entropy (+ z-loss) that never materialises [B, T, V] logits, and the
sequence-wise MoE balance loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ming_jax import sharding


def chunked_cross_entropy(w_head, h, targets, weights, chunk: int = 512):
    """Weighted sums over tokens of the cross-entropy and of logsumexp^2 of the logits h @ w_head.

    h [B, T, D], w_head [D, V], targets [B, T] int, weights [B, T] (0 drops a token: prompt, padding). Returns
    (sum_t w_t * nll_t, sum_t w_t * lse_t^2), float32; the caller divides by the global weight sum.

    The sequence is cut into chunks of `chunk` tokens (every batch row at once, so each device works on its own
    rows; T is padded up to a multiple with weight-0 tokens). Each chunk's float32 logits are built, reduced and
    dropped, and rebuilt in the backward pass (checkpointed): at Ling-flash's 157k vocab a 4096-token row would
    otherwise hold ~2.6 GB of float32 logits, and as much again for their gradient. The weight is re-constrained to
    its parameter layout inside the loop so that its gradient accumulates sharded.
    """
    b, t, d = h.shape
    chunk = max(1, min(chunk, t))
    pad = -t % chunk
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hc = h.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, c, D]
    tc = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, c]
    wc = weights.astype(jnp.float32).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(totals, xs):
        x, tgt, w = xs
        wh = sharding.constrain(w_head, ("embed", "vocab"))
        logits = jnp.einsum("bcd,dv->bcv", x, wh.astype(x.dtype), preferred_element_type=jnp.float32)
        logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))  # [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, c]
        picked = jnp.take_along_axis(logits, tgt[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return (totals[0] + ((lse - picked) * w).sum(), totals[1] + (jnp.square(lse) * w).sum()), None

    zero = jnp.zeros((), jnp.float32)
    (nll, z), _ = jax.lax.scan(one, (zero, zero), (hc, tc, wc))
    return nll, z


def expert_loads(experts, num_experts: int, router, num_routers: int, valid):
    """Tokens per (router, expert): experts [L, N, K] int chosen per token and MoE layer, router [N] int (the gate
    that routed each token), valid [N] bool (real tokens) -> float32 [L, R, E]."""
    hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(-2)  # [L, N, E]
    by_router = jax.nn.one_hot(router, num_routers, dtype=jnp.float32) * valid[:, None].astype(jnp.float32)
    return jnp.einsum("lne,nr->lre", hot, by_router)


def sequence_balance_loss(experts, logits, segment, valid, num_experts: int, top_k: int, num_segments: int):
    """The DeepSeek-V3 sequence-wise balance loss (arXiv 2412.19437, eq. 17-20), summed over MoE layers and averaged
    over the batch's sequences (packed documents count separately): per sequence, sum_e f_e * P_e with
    f_e = E / (K * T_s) * #{tokens choosing e}, P_e = mean over tokens of s_e / sum_e' s_e' (s = sigmoid of the
    routing gate's logits). experts [L, N, K], logits [L, N, E] float32, segment [N] int (a sequence id per token,
    0..num_segments-1), valid [N] bool. The caller multiplies by alpha.

    One deviation from eq. 18, stated: the indicator counts the experts the router actually chose (biased,
    group-limited selection), not the top-k of the unbiased affinities; what is balanced is the real load. The
    mean runs over the sequences of the micro-batch; with gradient accumulation the micro-batch means are
    averaged."""
    n = num_segments
    v = valid.astype(jnp.float32)
    s = jax.nn.sigmoid(logits)
    p = s / s.sum(-1, keepdims=True)  # [L, N, E]
    hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(-2)  # [L, N, E]
    seg_sum = lambda x: jax.vmap(lambda y: jax.ops.segment_sum(y * v[:, None], segment, n))(x)  # noqa: E731
    tokens = jax.ops.segment_sum(v, segment, n)  # [S]
    f = seg_sum(hot) * num_experts / (top_k * jnp.maximum(tokens, 1.0))[None, :, None]  # [L, S, E]
    pm = seg_sum(p) / jnp.maximum(tokens, 1.0)[None, :, None]
    per_seq = (f * pm).sum(-1)  # [L, S]
    present = (tokens > 0).astype(jnp.float32)
    return (per_seq * present).sum(-1).sum() / jnp.maximum(present.sum(), 1.0)
