"""Grouped matmuls for MoE experts over expert-sorted rows (megablox-style Pallas TPU kernels).

Public API: `gmm` (any [G, K, N] weights) and `gmm_glu` (fused gate/up projection with the SiLU-times-up epilogue),
both differentiable; `BlockSizes` / `GmmTiling` / `get_default` for tiles; `reference` holds the plain-jnp references.
"""

from ming_jax.pallas.gmm import reference
from ming_jax.pallas.gmm.kernel import BlockSizes, GmmTiling, get_default
from ming_jax.pallas.gmm.vjp import IMPLEMENTATIONS, gmm, gmm_glu

__all__ = ["BlockSizes", "GmmTiling", "IMPLEMENTATIONS", "get_default", "gmm", "gmm_glu", "reference"]
