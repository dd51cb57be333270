"""The talker's aggregator: folds the P latents one step generated into the LM's next input embedding.

    [cls (a learned [1, Da] table row) ; x_embed(latents [B, P, C]) (Linear(C, Da))]       [B, 1 + P, Da]
      -> the DiT blocks of `flow.HeadBlocks` (bidirectional, rope over positions 0 .. P) -> RMSNorm -> Linear(Da, H)
      -> the cls row                                                                     [B, 1, H]

Parameter axis names: "embed", "heads", "head_dim", "mlp", "norm", "layers"; None for the latent channels, the
one-row cls table and the LM width of the output. No new names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.runtime import Runtime
from ming_jax.config.talker import AggregatorConfig
from ming_jax.layers.linear import Linear
from ming_jax.layers.params import normal, param, read
from ming_jax.models.talker.flow import HeadBlocks


class Aggregator(nnx.Module):
    def __init__(self, cfg: AggregatorConfig, out_dim: int, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        pdt = jnp.dtype(runtime.param_dtype)
        self.cfg = cfg
        self.runtime = runtime
        self.cls = param(rngs, normal(0.02), (1, cfg.hidden_size), (None, "embed"), pdt)
        self.x_embedder = Linear(cfg.in_channels, cfg.hidden_size, (None, "embed"), param_dtype=pdt, rngs=rngs)
        self.blocks = HeadBlocks(cfg, out_dim, runtime, rngs=rngs)

    def __call__(self, latents):  # [B, P, C] -> [B, 1, H]
        dt = jnp.dtype(self.runtime.dtype)
        with jax.named_scope("aggregator"):
            x = self.x_embedder(latents.astype(dt))  # [B, P, Da]
            cls = jnp.broadcast_to(read(self.cls, dt)[None], (x.shape[0], 1, x.shape[2]))
            return self.blocks(jnp.concatenate([cls, x], axis=1))[:, :1]
