"""Attention kernels: jax's Pallas TPU splash attention wired to the project's layout and masks.

Public API: `splash_attention` (q [B, T, H, hd], k / v [B, S, K, hd]; causal and / or segment ids; differentiable),
`BlockSizes` / `get_default` for tiles, `reference.attention` (same contract, plain jnp). Backend choice (splash on
TPU, cuDNN on GPU, the XLA reference elsewhere) is `ming_jax.ops.attention`'s job, not this folder's.
"""

from ming_jax.pallas.attention import reference
from ming_jax.pallas.attention.kernel import BlockSizes, get_default
from ming_jax.pallas.attention.splash import splash_attention

__all__ = ["BlockSizes", "get_default", "reference", "splash_attention"]
