"""Next-token losses that never materialise [B, T, V] logits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from ming_jax import sharding


def chunked_cross_entropy(w_head, h, labels, chunk: int = 512):
    """Mean token cross-entropy of the logits h @ w_head without materialising [B, T, V] logits.

    h [B, T, D], w_head [D, V], labels [B, T]. The sequence is cut into chunks of `chunk` tokens (every batch row at
    once, so each device works on its own rows); each chunk's float32 logits are built, reduced and dropped, and
    rebuilt in the backward pass (checkpointed). At Ling-flash's 157k vocab a 4096-token row would otherwise hold
    ~7 GB of logits and their gradients per chip. The weight is re-constrained to its parameter layout inside the
    loop so that its gradient accumulates sharded.
    """
    b, t, d = h.shape
    chunk = math.gcd(t, chunk)
    hc = h.reshape(b, t // chunk, chunk, d).swapaxes(0, 1)  # [n, B, c, D]
    lc = labels.reshape(b, t // chunk, chunk).swapaxes(0, 1)  # [n, B, c]

    @jax.checkpoint
    def one(total, xs):
        w = sharding.constrain(w_head, ("embed", "vocab"))
        logits = jnp.einsum("bcd,dv->bcv", xs[0], w.astype(xs[0].dtype), preferred_element_type=jnp.float32)
        logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))  # [B, c, V]
        return total + optax.softmax_cross_entropy_with_integer_labels(logits, xs[1]).sum(), None

    total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), (hc, lc))
    return total / (b * t)
