"""The optimizer of the train step: optax AdamW with float32 moments over (possibly bf16) parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def optimizer(learning_rate: float = 1e-4) -> optax.GradientTransformation:
    """AdamW; its state is initialised from float32 views of the parameters, so both moments are float32."""
    return optax.adamw(learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def f32(tree):
    """The tree with every leaf cast to float32 (the optimizer state is initialised from these views)."""
    return jax.tree.map(lambda a: a.astype(jnp.float32), tree)
