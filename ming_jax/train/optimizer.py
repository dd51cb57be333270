"""The optimizer of the train step: gradient clipping, then optax AdamW on a linear-warmup + cosine schedule, with
float32 moments over (possibly bf16) parameters and weight decay on matrices only."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from ming_jax.sharding.place import logical_axes
from ming_jax.train.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """0 -> peak over `warmup_steps`, cosine to `final_lr_ratio` x peak at `total_steps` (then flat)."""
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, cfg.total_steps,
                                              cfg.learning_rate * cfg.final_lr_ratio)


def decay_mask(params: nnx.State) -> nnx.State:
    """True for parameters that are matrices per layer (a stacked layers axis does not count): projections, expert
    stacks, embeddings, router kernels. Norm scales and biases are not decayed."""

    def one(v):
        axes = logical_axes(v)
        per_layer = v.get_value().ndim - (1 if "layers" in axes else 0)
        return per_layer >= 2

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask(params))
    return adamw if cfg.max_grad_norm is None else optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)

