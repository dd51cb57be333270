"""BailingMoeV2 (Ling-flash-2.0) causal LM, the language backbone of Ming-flash-omni 2.0.

Reads top-down like the architecture:
  embeddings (+ multimodal features scattered into placeholder positions, see `ming_jax.models.inputs`)
  -> `first_k_dense_replace` dense decoder layers (attention + SwiGLU MLP)
  -> the remaining MoE decoder layers, stacked on a leading "layers" axis and run with `nnx.scan`
  -> final RMSNorm -> LM head.
Attention: fused QKV projection, per-head RMSNorm on q and k, grouped-query attention, partial rotary with the 3-D
"video rope" (text positions are the 1-D special case). The KV cache (`ming_jax.layers.kv_cache`) is preallocated.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.layers import rotary
from ming_jax.layers.kv_cache import CacheSlot, KVCache
from ming_jax.layers.mlp import GatedMLP
from ming_jax.layers.norms import RMSNorm
from ming_jax.layers.params import (QuantizedParam, fan_in_normal, has_weight_hooks, host_random, normal, param, read,
                                    zeros)
from ming_jax.moe.block import MoEBlock
from ming_jax.moe.router import Routing
from ming_jax.pallas.attention import reference as attention_reference
from ming_jax.pallas.attention.api import AttentionMask, as_mask, attention

_LAYERS_AXIS = {nnx.PARTITION_NAME: "layers"}  # the leading axis of the stacked MoE layers' parameters

# --- attention ----------------------------------------------------------------------------------------------------


def split_qkv(qkv, num_q_per_kv: int):
    """[B, T, K, G+2, hd] grouped layout -> q [B, T, K*G, hd], k, v [B, T, K, hd]."""
    b, t, kv, _, hd = qkv.shape
    q = qkv[:, :, :, :num_q_per_kv].reshape(b, t, kv * num_q_per_kv, hd)
    return q, qkv[:, :, :, num_q_per_kv], qkv[:, :, :, num_q_per_kv + 1]


class Attention(nnx.Module):
    """GQA attention with a fused QKV kernel laid out per KV group: [D, K, G + 2, hd].

    Group j holds its G query heads, then its key head, then its value head, so sharding the K axis (tensor
    parallelism) keeps every query head next to the KV head it reads. The official fused layout ([q heads | k | v])
    is regrouped by the weight table.
    """

    def __init__(self, cfg: LLMConfig, runtime: Runtime, *, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pdt = jnp.dtype(runtime.param_dtype)
        self.g = h // kv
        self.attention_impl = runtime.attention
        self.qkv = param(rngs, fan_in_normal(), (d, kv, self.g + 2, hd), ("embed", "kv_heads", "qkv", "head_dim"),
                         pdt)
        self.qkv_bias = (param(rngs, zeros, (kv, self.g + 2, hd), ("kv_heads", "qkv", "head_dim"), pdt)
                         if cfg.use_qkv_bias else None)
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, axis_name="head_dim", param_dtype=pdt, rngs=rngs)
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, axis_name="head_dim", param_dtype=pdt, rngs=rngs)
        self.out = param(rngs, fan_in_normal((0, 1)), (h, hd, d), ("heads", "head_dim", "embed"), pdt)
        self.out_bias = param(rngs, zeros, (d,), ("embed",), pdt) if cfg.use_bias else None

    def __call__(self, x, cos, sin, mask, kv_cache=None, start=None):
        """x [B, T, D]; cos/sin [B, T, rd]; mask: `AttentionMask` over S = T keys, or the cache length.

        With `kv_cache = CacheSlot(k [L, B, K, S_max, hd], v, layer, attend_cache)` the new keys / values are written
        into layer `layer` of the stacks at slot `start` (in place: the stacks are a loop carry / donated buffer);
        queries then read that layer's whole cache, or with `attend_cache=False` (prefill of an empty cache) only the
        T new keys. Returns (out [B, T, D], the updated CacheSlot or None).
        """
        dt = x.dtype
        q, k, v = self.project(x, cos, sin)
        if kv_cache is not None:
            kv_cache = kv_cache.write(k, v, start)
            if kv_cache.attend_cache:
                k, v = kv_cache.read(dt)
        o = attention(q, k, v, mask, impl=self.attention_impl)  # [B, T, H, hd]
        y = jnp.einsum("bthk,hkd->btd", o, read(self.out, dt))
        if self.out_bias is not None:
            y = y + read(self.out_bias, dt)
        return y, kv_cache

    def project(self, x, cos, sin):
        """x [B, T, D] -> q [B, T, H, hd], k, v [B, T, K, hd]: fused projection, q / k norms, rotary."""
        dt = x.dtype
        qkv = jnp.einsum("btd,dkgh->btkgh", x, read(self.qkv, dt))
        if self.qkv_bias is not None:
            qkv = qkv + read(self.qkv_bias, dt)
        q, k, v = split_qkv(qkv, self.g)
        return rotary.apply_rotary(self.q_norm(q), cos, sin), rotary.apply_rotary(self.k_norm(k), cos, sin), v

    def probabilities(self, x, cos, sin, mask):
        """Diagnostics: the softmax weights [B, H, T, S] float32 of the queries of x on its keys (no cache), as
        the reference attention computes them; `mask` as for `__call__`."""
        q, k, _ = self.project(x, cos, sin)
        return attention_reference.probabilities(q, k, as_mask(mask).to_dense(q.shape[1], k.shape[1]))


# --- decoder layers -----------------------------------------------------------------------------------------------


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); the MLP is dense or the MoE block."""

    def __init__(self, cfg: LLMConfig, runtime: Runtime, *, moe: bool, rngs: nnx.Rngs):
        pdt = jnp.dtype(runtime.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=pdt,
                                  rngs=rngs)
        self.attn = Attention(cfg, runtime, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=pdt,
                                 rngs=rngs)
        if moe:
            self.moe = MoEBlock(cfg, runtime, rngs=rngs)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, param_dtype=pdt, rngs=rngs)

    def __call__(self, x, cos, sin, mask, modality=None, kv_cache=None, start=None, collect=False, experts=None):
        """`experts`: (layer index, expert weight stacks) for the MoE block to read in place, see `MoEBlock`."""
        with jax.named_scope("attention"):
            a, kv_cache = self.attn(self.input_norm(x), cos, sin, mask, kv_cache, start)
        x = x + a
        h = self.post_norm(x)
        routing = None
        if hasattr(self, "moe"):
            with jax.named_scope("moe"):
                m, r, gates = self.moe(h, modality, per_gate=collect, stacked=experts)
            routing = (r, gates) if collect else None
        else:
            with jax.named_scope("mlp"):
                m = self.mlp(h)
        return x + m, kv_cache, routing


# --- the model ----------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] (or [B, V] when `logits_at` is given)
    hidden: jax.Array  # [B, T, D] output of the final norm
    cache: KVCache | None
    layer_outputs: jax.Array | None = None  # [L, B, T, D] residual stream after each layer (collect=True)
    routing: Routing | None = None  # stacked over MoE layers: experts [Lm, B*T, K], ... (collect=True)
    gate_routing: Routing | None = None  # every gate on every token: experts [Lm, R, B*T, K], ... (collect=True)


class BailingMoeV2(nnx.Module):
    """`cfg`: the architecture (what config.json says); `runtime`: dtypes, kernels, remat, layer scanning, expert
    parallelism (`ming_jax.config.runtime.Runtime`)."""

    def __init__(self, cfg: LLMConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        pdt = jnp.dtype(runtime.param_dtype)
        self.embed = param(rngs, normal(1.0), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
        self.dense_layers = nnx.List([DecoderLayer(cfg, runtime, moe=False, rngs=rngs) for _ in range(cfg.num_dense_layers)])
        if cfg.num_moe_layers:

            @nnx.split_rngs(splits=cfg.num_moe_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS_AXIS)
            def make(r):
                return DecoderLayer(cfg, runtime, moe=True, rngs=r)

            self.moe_layers = make(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="embed", param_dtype=pdt,
                                  rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        param(rngs, fan_in_normal(), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pdt))

    # -- pieces usable on their own --
    def embed_tokens(self, input_ids, features=None, feature_index=None):
        """input_ids [B, T] -> [B, T, D]; `features [N, D]` overwrite the flat positions `feature_index [N]`."""
        x = jnp.take(read(self.embed), input_ids, axis=0).astype(self.runtime.dtype)
        if features is not None:
            b, t, d = x.shape
            x = x.reshape(b * t, d).at[feature_index].set(features.astype(x.dtype)).reshape(b, t, d)
        return x

    def rotary(self, positions):
        """positions [3, B, T] -> cos, sin [B, T, rd]."""
        inv_freq = rotary.inv_frequencies(self.cfg.rotary_dim, self.cfg.rope_theta)  # a compile-time constant
        if self.cfg.rope_type == "video_rope":
            return rotary.video_rope_cos_sin(positions, inv_freq, self.cfg.mrope_section)
        return rotary.rope_cos_sin(positions[0], inv_freq)

    def head_weight(self, dtype=None):
        """The LM head's [D, V] weight (the transposed embedding when tied), read through the one weight-read site."""
        return read(self.embed, dtype).T if self.lm_head is None else read(self.lm_head, dtype)

    def head(self, h):
        return jnp.einsum("...d,dv->...v", h, self.head_weight(h.dtype), preferred_element_type=jnp.float32)

    # -- forward --
    def __call__(self, embeds, positions, *, attention_mask=None, modality=None, cache: KVCache | None = None,
                 logits_at=None, collect: bool = False, prefill: bool = False, presliced=None) -> ModelOutput:
        """embeds [B, T, D] (from `embed_tokens`), positions [3, B, T] int.

        attention_mask [B, T] bool marks real tokens (None: all real); without a cache it may also be int segment ids
        (0 = padding, 1, 2, ... = documents packed in a row, attending only within themselves). modality [B, T] int
        picks each token's router (None: text gate for all, as in decode steps). With `cache`, the T tokens go to
        slots cache.length ... (row b from cache.length[b] when the length is per row, [B]) and attend to every
        valid earlier slot; with `prefill=True` the cache starts over instead (the T tokens go to slots 0 .. T-1,
        whatever it held) and attention runs on the T tokens alone with the causal + segment mask, so the attention
        kernels (splash, cuDNN) serve the prompt. logits_at [B] int: compute logits only at these positions
        (-> [B, V]).
        presliced: `preslice_moe_layers()`'s per-layer weights, computed outside a loop that calls the model many times
        (the decode loop on CPU): the MoE layers then run as a Python loop reading those per-layer arrays, and the
        routed experts read their stacks in place.
        """
        cfg = self.cfg
        b, t, _ = embeds.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        segments = jnp.asarray(attention_mask).astype(jnp.int32)  # 0 = padding, 1.. = real (bool -> 0 / 1)
        attention_mask = segments > 0
        cos, sin = self.rotary(positions)
        if cache is None or prefill:
            mask = AttentionMask.self_attention(segments, causal=True)  # what kernels take (splash, cuDNN)
        if cache is None:
            start = None
        elif prefill:  # the cache starts over: slots 0 .. T-1, nothing earlier is valid
            start = jnp.zeros((), jnp.int32)
            valid = jnp.zeros_like(cache.valid).at[:, :t].set(attention_mask)
        elif jnp.ndim(cache.length) == 1:  # every row at its own slot (decode slots, `ming_jax.gen.serving`)
            start = cache.length
            q_slots = start[:, None] + jnp.arange(t)[None, :]  # [B, T]
            valid = cache.valid.at[jnp.arange(b)[:, None], q_slots].set(attention_mask, mode="drop")
            k_slots = jnp.arange(cache.max_len)
            mask = AttentionMask(dense=(k_slots[None, None, :] <= q_slots[:, :, None])[:, None] &
                                 valid[:, None, None, :])
        else:
            start = cache.length
            q_slots = start + jnp.arange(t)
            valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, start, axis=1)
            k_slots = jnp.arange(cache.max_len)
            mask = AttentionMask(dense=(k_slots[None, :] <= q_slots[:, None])[None, None] & valid[:, None, None, :])

        def slot(k_stack, v_stack, layer):
            return None if cache is None else CacheSlot(k_stack, v_stack, jnp.asarray(layer, jnp.int32),
                                                        attend_cache=not prefill)

        x = embeds.astype(self.runtime.dtype)
        layer_outputs = []
        k_dense, v_dense = (None, None) if cache is None else (cache.k_dense, cache.v_dense)
        for i, layer in enumerate(self.dense_layers):
            x, kv, _ = layer(x, cos, sin, mask, None, slot(k_dense, v_dense, i), start)
            if cache is not None:
                k_dense, v_dense = kv.k, kv.v
            if collect:
                layer_outputs.append(x)

        routing = None
        k_moe = v_moe = None
        if cfg.num_moe_layers:

            def body(layer, carry, cos, sin, mask, modality, start, index, stacks):
                x, kv = carry  # kv: the whole (k, v) MoE stacks, carried so that each layer updates them in place
                x, kv, r = layer(x, cos, sin, mask, modality, None if kv is None else slot(*kv, index), start,
                                 collect, None if stacks is None else (index, *stacks))
                return (x, None if kv is None else (kv.k, kv.v)), r, (x if collect else None)

            if self.runtime.remat:  # recompute each layer's activations in the backward pass instead of storing them
                body = nnx.remat(body)
            if presliced is not None:
                run_moe = functools.partial(self._unrolled, body, presliced=presliced)
            elif self.runtime.scan_layers:
                run_moe = nnx.scan(body, in_axes=(0, nnx.Carry, None, None, None, None, None, 0, None),
                                   out_axes=(nnx.Carry, 0, 0))
            else:
                run_moe = functools.partial(self._unrolled, body)
            kv_in = None if cache is None else (cache.k_moe, cache.v_moe)
            (x, kv_out), routing, ys = run_moe(self.moe_layers, (x, kv_in), cos, sin, mask, modality, start,
                                               jnp.arange(cfg.num_moe_layers, dtype=jnp.int32),
                                               self._expert_stacks(unrolled=presliced is not None))
            if cache is not None:
                k_moe, v_moe = kv_out
            if collect:
                layer_outputs.extend(list(ys))

        h = self.final_norm(x)
        if logits_at is not None:
            logits = self.head(h[jnp.arange(b), logits_at])
        else:
            logits = self.head(h)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k_dense, v_dense, cache.k_moe if k_moe is None else k_moe,
                                cache.v_moe if v_moe is None else v_moe, valid, start + t)
        if collect and routing is not None:
            return ModelOutput(logits, h, new_cache, jnp.stack(layer_outputs), routing[0], routing[1])
        return ModelOutput(logits, h, new_cache, jnp.stack(layer_outputs) if collect else None)

    def _expert_stacks(self, unrolled: bool = False):
        """The MoE layers' routed-expert weights as stored, [L, E, D, F] / [L, E, F, D], for the scanned layers to
        read in place (`MoEBlock`, `ming_jax.pallas.gmm.portable.grouped_glu`): the scan's per-layer slice of them is
        otherwise copied whole every layer, every step. None (each layer uses its slice) when the layers are not
        scanned (nor presliced), when reading them would change them (a cast to the compute dtype, a weight hook, a
        wrapped weight such as qwix's), and without MoE layers. Quantized stacks (`QuantizedParam`) are handed on as
        `qwix.QArray` stacks of their int8 / fp8 values and float32 scales, which the Pallas kernels read in place
        too.
        `unrolled`: for the Python loop over presliced layers (`preslice_moe_layers`), which reads them in place too."""
        if not ((self.runtime.scan_layers or unrolled) and self.cfg.num_moe_layers) or has_weight_hooks():
            return None
        moe = self.moe_layers.moe
        weights = (moe.w_gate, moe.w_up, moe.w_down)
        if all(isinstance(w, QuantizedParam) for w in weights):  # int8 / fp8 stacks: (qvalue, scale) as QArrays
            return tuple(read(w, quantized=True) for w in weights)
        if not all(isinstance(w, nnx.Variable) for w in weights):
            return None
        values = tuple(read(w) for w in weights)
        if any(v.dtype != jnp.dtype(self.runtime.dtype) for v in values):
            return None
        return values

    def can_preslice(self) -> bool:
        """Whether `preslice_moe_layers` has layers to slice (see there)."""
        return bool(self.cfg.num_moe_layers) and self._expert_stacks(unrolled=True) is not None

    def preslice_moe_layers(self):
        """Per-layer arrays of the stacked MoE layers' parameters, the routed experts' stacks excepted: a list of L
        {path: array} dicts for `__call__(presliced=)`, or None where the layers cannot run that way (no MoE layers,
        weight hooks, expert stacks that are not read in place; `_expert_stacks`).

        Why: XLA:CPU gives a dot only whole buffers, so a dot operand that is a slice of a bigger array is copied out
        every time the dot runs: in the decode loop, every layer's attention, router and shared-expert weights once
        per layer and token (`benchmarks/decode_profile.py`: with the KV cache's slices, 21% of a B=1 decode step at
        issue 13's config; 4% after). Sliced
        once before the loop, they are whole buffers of their own inside it. Cost: one more copy of those weights
        (not of the routed experts: a few percent of a Ling-flash model) while the loop runs."""
        if not self.can_preslice():
            return None
        _, params, _ = nnx.split(self.moe_layers, nnx.Param, ...)
        leaves = [(jax.tree_util.keystr(path), a) for path, a in jax.tree_util.tree_flatten_with_path(params)[0]
                  if not _is_routed_expert(path)]
        return [{key: a[i] for key, a in leaves} for i in range(self.cfg.num_moe_layers)]

    # -- diagnostics --
    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer `i` (0 .. num_layers - 1) as a module of its own; an MoE layer is the i-th slice of the
        stacked parameters (a view for inspection: changing it does not change the model)."""
        n_dense = len(self.dense_layers)
        if not 0 <= i < self.cfg.num_layers:
            raise IndexError(f"layer {i}: the model has layers 0 .. {self.cfg.num_layers - 1}")
        if i < n_dense:
            return self.dense_layers[i]
        graphdef, params, rest = nnx.split(self.moe_layers, nnx.Param, ...)
        params = nnx.spmd.remove_axis(jax.tree.map(lambda a: a[i - n_dense], params), 0, _LAYERS_AXIS)
        return nnx.merge(graphdef, params, rest)

    def attention_weights(self, layer: int, layer_input, positions, *, attention_mask=None):
        """Diagnostics (attention maps): the softmax weights [B, H, T, T] float32 that the queries of decoder layer
        `layer` put on the keys of the same T tokens (causal, no cache), recomputed from the layer's input: the
        embeddings for layer 0, else `ModelOutput.layer_outputs[layer - 1]` of a `collect=True` forward.
        positions [3, B, T]; attention_mask [B, T] bool or segment ids, as for `__call__`."""
        b, t, _ = layer_input.shape
        segments = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask).astype(
            jnp.int32)
        cos, sin = self.rotary(positions)
        block = self.layer(layer)
        x = jnp.asarray(layer_input).astype(self.runtime.dtype)
        return block.attn.probabilities(block.input_norm(x), cos, sin,
                                        AttentionMask.self_attention(segments, causal=True))

    def _unrolled(self, body, layers, carry, cos, sin, mask, modality, start, index, stacks=None, presliced=None):
        """`scan_layers=False`: the scan of `body` over the stacked MoE layers as a Python loop over per-layer
        slices of the same stacked parameters. The parameter layout stays [L, ...] ("layers" axis, same paths).

        Each layer runs as a module of its own (`nnx.merge` of the slice), so a tool that replaces or adds weights
        of a module while it runs (qwix PTQ puts a quantized `WithAux` in place of a kernel, LoRA adds lora_a /
        lora_b) may do so; a scan body cannot change its carry's structure. When the layers come out with a new
        structure, their parameters are stacked back on the layers axis and become the stacked module (the
        per-layer quantized leaves / LoRA factors are then [L, ...] too, and sliced again on the next call).

        presliced (`preslice_moe_layers`): layer i's arrays replace its slices (which are then unused and dropped by
        XLA); the routed experts, absent from it, read `stacks` in place (their slices go unused too).
        """
        graphdef, params, rest = nnx.split(layers, nnx.Param, ...)
        if presliced is not None and len(presliced) != int(index.shape[0]):
            raise ValueError(f"presliced holds {len(presliced)} layers, the model {int(index.shape[0])} MoE layers")
        ran, routes, ys = [], [], []
        for i in range(int(index.shape[0])):
            if presliced is None:
                sliced = jax.tree.map(lambda a, i=i: a[i], params)
            else:
                sliced = jax.tree_util.tree_map_with_path(
                    lambda path, a, i=i: presliced[i].get(jax.tree_util.keystr(path), a[i]), params)
            layer_params = nnx.spmd.remove_axis(sliced, 0, _LAYERS_AXIS)
            layer = nnx.merge(graphdef, layer_params, rest)
            carry, r, y = body(layer, carry, cos, sin, mask, modality, start, index[i],
                               None if presliced is None else stacks)
            ran.append(layer)
            routes.append(r)
            ys.append(y)
        new_graphdef, _, new_rest = nnx.split(ran[0], nnx.Param, ...)
        if new_graphdef != graphdef:
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(m, nnx.Param) for m in ran])
            stacked = nnx.spmd.add_axis(stacked, 0, _LAYERS_AXIS)
            self.moe_layers = nnx.merge(new_graphdef, stacked, new_rest)
        stack = lambda xs: None if xs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
        return carry, stack(routes), stack(ys)


def _is_routed_expert(path) -> bool:
    """A tree path into the MoE layers' parameters that leads to a routed-expert stack (moe.w_gate / w_up / w_down)."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return any(a == "moe" and b in ("w_gate", "w_up", "w_down") for a, b in itertools.pairwise(names))


def create(cfg: LLMConfig, runtime: Runtime | None = None, *, seed: int = 0, host: bool = False) -> BailingMoeV2:
    """Random weights from the modules' initializers, or with `host=True` drawn with numpy into the abstract model
    (`ming_jax.layers.params.host_random`: no initializer compiles, much faster on a CPU; norm scales 1, biases 0,
    every other tensor N(0, 0.02^2))."""
    if host:
        return host_random(create_abstract(cfg, runtime), seed)
    return BailingMoeV2(cfg, runtime, rngs=nnx.Rngs(seed))


def create_abstract(cfg: LLMConfig, runtime: Runtime | None = None) -> BailingMoeV2:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory allocated, any size."""
    return nnx.eval_shape(lambda: BailingMoeV2(cfg, runtime, rngs=nnx.Rngs(0)))


def param_count(model) -> int:
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
