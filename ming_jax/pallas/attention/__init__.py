"""Attention: jax's Pallas TPU splash attention wired to the project's layout and masks, cuDNN on GPU, and the
plain-XLA reference.

The entry is `api` (re-exported here): `attention(q, k, v, mask, impl=)` with `AttentionMask`, the one backend
choice. `splash_attention` is the kernel wrapper (q [B, T, H, hd], k / v [B, S, K, hd]; causal and / or segment
ids; differentiable), `BlockSizes` / `get_default` its tiles, `reference` the plain-jnp attention and masks.
"""

from ming_jax.pallas.attention import reference
from ming_jax.pallas.attention.api import IMPLEMENTATIONS, AttentionMask, as_mask, attention
from ming_jax.pallas.attention.kernel import BlockSizes, get_default
from ming_jax.pallas.attention.splash import splash_attention

__all__ = ["AttentionMask", "BlockSizes", "IMPLEMENTATIONS", "as_mask", "attention", "get_default", "reference",
           "splash_attention"]
