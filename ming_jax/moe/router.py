"""BailingMoeV2 routing: sigmoid scores, expert bias for selection only, group-limited top-k, MultiRouter.

Per token with router logits l (float32) and expert bias b:
  s = sigmoid(l); r = s + b (selection score only)
  group score = sum of the two best r in each of n_group contiguous expert groups; keep the topk_group best groups
  experts = top-k of r among kept groups; weights = s[experts] / (sum + 1e-20) * routed_scaling_factor
(the normalisation is skipped when k == 1). The MultiRouter keeps separate gates for text, image and audio tokens;
each token is routed by the gate of its modality.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.modality import AUDIO, GATE_NAMES, TEXT, VISION  # noqa: F401  (re-exported)
from ming_jax.layers.params import param, read, uniform_fan_in, zeros



@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Routing:
    experts: jax.Array  # [T, K] int32, in top-k order (not sorted)
    weights: jax.Array  # [T, K] float32
    logits: jax.Array  # [T, E] float32, of the gate that routed each token


def group_limited_topk(scores, *, top_k: int, n_group: int, topk_group: int):
    """scores [T, E] -> expert ids [T, top_k] chosen among the topk_group best of n_group contiguous groups."""
    t, e = scores.shape
    grouped = scores.reshape(t, n_group, e // n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
    _, best_groups = jax.lax.top_k(group_scores, topk_group)  # [T, topk_group]
    keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], best_groups].set(True)
    masked = jnp.where(jnp.repeat(keep, e // n_group, axis=1), scores, -jnp.inf)
    return jax.lax.top_k(masked, top_k)[1]


def route(logits, bias, *, top_k: int, n_group: int, topk_group: int, scaling: float) -> Routing:
    """logits [T, E] float32, bias [E] or [T, E]."""
    logits = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits)
    experts = group_limited_topk(scores + bias.astype(jnp.float32), top_k=top_k, n_group=n_group,
                                 topk_group=topk_group)
    w = jnp.take_along_axis(scores, experts, axis=-1)
    if top_k > 1:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), w * scaling, logits)


class Router(nnx.Module):
    """One or three gates (kernel [R, D, E], expert bias [R, E]); token modality picks the gate."""

    def __init__(self, dim: int, num_experts: int, num_gates: int, *, top_k: int, n_group: int, topk_group: int,
                 scaling: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.top_k, self.n_group, self.topk_group, self.scaling = top_k, n_group, topk_group, scaling
        self.kernel = param(rngs, uniform_fan_in(axis=1), (num_gates, dim, num_experts),
                            ("gates", "embed", "router_experts"), param_dtype)
        # The expert bias is updated by a load-balancing rule outside the gradient, never by backprop.
        self.expert_bias = param(rngs, zeros, (num_gates, num_experts), ("gates", "router_experts"), jnp.float32)

    def all_logits(self, x):
        """x [T, D] -> logits of every gate [R, T, E] (float32, as the release computes them)."""
        return jnp.einsum("td,rde->rte", x.astype(jnp.float32), read(self.kernel, jnp.float32))

    def __call__(self, x, modality=None) -> Routing:
        """x [T, D], modality [T] int (TEXT / VISION / AUDIO) or None (all text)."""
        bias = jax.lax.stop_gradient(read(self.expert_bias))
        if modality is None or bias.shape[0] == 1:  # the text gate alone: the other gates' logits would go unused
            sel_logits = jnp.einsum("td,de->te", x.astype(jnp.float32), read(self.kernel, jnp.float32)[0])
            sel_bias = bias[0]
        else:
            logits = self.all_logits(x)  # [R, T, E]
            sel_logits = jnp.take_along_axis(logits, modality[None, :, None], axis=0)[0]
            sel_bias = bias[modality]  # [T, E]
        return route(sel_logits, sel_bias, top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                     scaling=self.scaling)

    def per_gate(self, x) -> Routing:
        """Diagnostics: every gate's routing of every token, stacked on a leading gate axis ([R, T, ...])."""
        one = lambda logits, bias: route(logits, bias, top_k=self.top_k, n_group=self.n_group,  # noqa: E731
                                         topk_group=self.topk_group, scaling=self.scaling)
        return jax.vmap(one)(self.all_logits(x), read(self.expert_bias))
