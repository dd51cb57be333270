"""Dropless dispatch: sort the T*K (token, expert) pairs by expert, and put the results back, weighted.

    plan = sort_by_expert(experts, num_experts)     # who goes where
    xs = permute(x, plan)                           # [T*K, D], rows grouped by expert, group_sizes[e] rows each
    ys = grouped_ffn(xs, plan.group_sizes, ...)     # any grouped-matmul backend
    y = combine(ys, plan, weights)                  # [T, D] = sum_k w[t, k] * ys[row of (t, k)]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DispatchPlan:
    order: jax.Array  # [T*K] int32: row r of the sorted layout holds pair order[r] of the flat [T, K] pairs
    group_sizes: jax.Array  # [E] int32: rows per expert, in expert order
    top_k: int = dataclasses.field(metadata=dict(static=True))


def sort_by_expert(experts, num_experts: int) -> DispatchPlan:
    """experts [T, K] int -> plan. Stable sort, so rows of one expert keep token order."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return DispatchPlan(order, group_sizes, experts.shape[1])


def permute(x, plan: DispatchPlan):
    """x [T, D] -> [T*K, D] rows in expert order."""
    return x[plan.order // plan.top_k]


def combine(ys, plan: DispatchPlan, weights):
    """ys [T*K, D] in expert order, weights [T, K] -> [T, D]; the weighted sum is done in float32."""
    t, k = weights.shape
    unsorted = jnp.zeros_like(ys).at[plan.order].set(ys, unique_indices=True)  # [T*K, D] in (t, k) order
    out = jnp.einsum("tkd,tk->td", unsorted.reshape(t, k, -1).astype(jnp.float32), weights.astype(jnp.float32))
    return out.astype(ys.dtype)
