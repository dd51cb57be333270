"""Auxiliary-loss-free load balancing of the routed experts (what the routers' `expert_bias` is for).

After each train step, per MoE layer and per router (text, image, audio gate), with load_e the number of tokens
that router sent to expert e during the step:

    bias_e <- bias_e + rate * sign(mean_e'(load_e') - load_e)

Overloaded experts lose selection score, underloaded ones gain it; the bias only shifts which experts are chosen,
never the combine weights, and takes no gradient (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3, arXiv
2412.19437 section 2.1.2, rate 0.001; the release's `BailingMoeV2Gate.update_bias` is this rule with the same
coefficient, never called by the released inference code). A router that saw no tokens in the step keeps its bias.
"""

from __future__ import annotations

import jax.numpy as jnp


def update_bias(bias, loads, rate: float):
    """bias [..., E] float32, loads [..., E] (token counts of the same router) -> the updated bias."""
    loads = loads.astype(jnp.float32)
    delta = jnp.sign(loads.mean(-1, keepdims=True) - loads)
    return (bias.astype(jnp.float32) + rate * delta).astype(bias.dtype)


def max_violation(loads):
    """MaxVio (arXiv 2408.15664, eq. 6): (max_e load_e - mean load) / mean load, per router row [..., E] -> [...];
    0 for a perfectly balanced router, 0 too for one that saw no tokens."""
    loads = loads.astype(jnp.float32)
    mean = loads.mean(-1)
    return jnp.where(mean > 0, (loads.max(-1) - mean) / jnp.maximum(mean, 1e-9), 0.0)
