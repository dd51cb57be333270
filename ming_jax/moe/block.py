"""The BailingMoeV2 sparse MoE block: routed experts (dropless) plus one always-on shared expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.layers.mlp import GatedMLP
from ming_jax.layers.params import fan_in_normal, param, read
from ming_jax.moe import dispatch, expert_parallel
from ming_jax.pallas.gmm import api as gmm
from ming_jax.moe.router import Router


class MoEBlock(nnx.Module):
    def __init__(self, cfg: LLMConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        pdt = jnp.dtype(runtime.param_dtype)
        self.num_experts = e
        self.impl = runtime.gmm
        self.expert_parallel = runtime.expert_parallel
        self.capacity_factor = runtime.capacity_factor
        self.router = Router(d, e, cfg.num_routers, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
                             topk_group=cfg.topk_group, scaling=cfg.routed_scaling_factor, param_dtype=pdt, rngs=rngs)
        # Experts stacked on a leading axis: [E, D, F] / [E, F, D]. Their model dim is "expert_embed", not "embed":
        # dense weights may shard "embed" over the expert axis too, which an expert weight already uses for E.
        self.w_gate = param(rngs, fan_in_normal((1,)), (e, d, f), ("experts", "expert_embed", "expert_mlp"), pdt)
        self.w_up = param(rngs, fan_in_normal((1,)), (e, d, f), ("experts", "expert_embed", "expert_mlp"), pdt)
        self.w_down = param(rngs, fan_in_normal((1,)), (e, f, d), ("experts", "expert_mlp", "expert_embed"), pdt)
        self.shared = (GatedMLP(d, f * cfg.num_shared_experts, param_dtype=pdt, rngs=rngs)
                       if cfg.num_shared_experts else None)

    def __call__(self, x, modality=None, *, per_gate: bool = False, stacked=None):
        """x [B, S, D], modality [B, S] int or None -> (y [B, S, D], routing of the B*S tokens, per-gate routing).

        The per-gate routing (every gate on every token, [R, B*S, ...]) is a diagnostic, computed only on request.
        stacked: inside the layer scan, (layer index, w_gate, w_up, w_down stacks of all MoE layers) for the routed
        experts to read in place (`ming_jax.pallas.gmm.api.grouped_glu`); None: this block's own weights.
        """
        b, s, d = x.shape
        tokens = x.reshape(b * s, d)
        with jax.named_scope("router"):
            routing = self.router(tokens, None if modality is None else modality.reshape(-1))
        with jax.named_scope("routed_experts"):
            # Under a mesh whose `expert` axis splits the experts: one shard_map with the token exchange.
            ep = expert_parallel.plan(self.num_experts, mode=self.expert_parallel,
                                      capacity_factor=self.capacity_factor, impl=self.impl)
            dt = x.dtype
            # Quantized expert stacks (ming_jax.quant) stay quantized: the grouped matmuls take the qwix.QArrays.
            w_gate, w_up, w_down = (read(w, dt, quantized=True) for w in (self.w_gate, self.w_up, self.w_down))
            if ep is not None:
                y = expert_parallel.routed_experts(tokens, routing.experts, routing.weights, w_gate, w_up, w_down, ep,
                                                   stacked=stacked)
            else:
                plan = dispatch.sort_by_expert(routing.experts, self.num_experts)
                # The permute is fused into the gate/up kernel's loads (impl "pallas"): no [B*S*K, D] copy.
                ys = gmm.grouped_glu(tokens, plan.group_sizes, w_gate, w_up, w_down,
                                     rows=plan.order // plan.top_k, implementation=self.impl,
                                     stacked=stacked)  # [B*S*K, D]
                y = dispatch.combine(ys, plan, routing.weights)
        if self.shared is not None:
            with jax.named_scope("shared_expert"):
                y = y + self.shared(tokens)
        gates = self.router.per_gate(tokens) if per_gate else None
        return y.reshape(b, s, d), routing, gates
