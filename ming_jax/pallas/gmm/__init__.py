"""Grouped matmuls for MoE experts over expert-sorted rows (megablox-style Pallas TPU kernels + an XLA path).

The entry is `api` (re-exported here): `gmm`, `gmm_glu`, `grouped_glu`, `IMPLEMENTATIONS`. `BlockSizes` /
`GmmTiling` / `get_default` for tiles; `reference` holds the plain-jnp references the tests compare against.
"""

from ming_jax.pallas.gmm import reference
from ming_jax.pallas.gmm.api import IMPLEMENTATIONS, gmm, gmm_glu, grouped_glu
from ming_jax.pallas.gmm.kernel import BlockSizes, GmmTiling, get_default
from ming_jax.pallas.gmm.xla import gather_rows

__all__ = ["BlockSizes", "GmmTiling", "IMPLEMENTATIONS", "gather_rows", "get_default", "gmm", "gmm_glu",
           "grouped_glu", "reference"]
