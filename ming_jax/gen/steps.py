"""The step bodies every generation program is built from: a prefill of the prompt into a fresh KV cache, and one
decode step (one token per row against the cache). `ming_jax.gen.text` loops them inside jit; `ming_jax.aot`
compiles the same functions for TPU topologies, so the planned program is the one users run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.layers.kv_cache import KVCache


def last_real_index(attention_mask):
    """[B, S] bool -> index of each row's last real token (works for left and right padding)."""
    s = attention_mask.shape[1]
    return s - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)


def prefill(model, input_ids, attention_mask, positions, modality, features, feature_index, *, max_len: int):
    """The prompt ([B, S] ids, mask, positions [3, B, S], modality or None, features [N, D] + their flat index or
    None) into a new cache of `max_len` slots -> (logits at each row's last real token [B, V] float32, cache).
    The cache is made here, inside the caller's jit, so there is no second copy to donate."""
    cache = KVCache.create(model.cfg, input_ids.shape[0], max_len, model.runtime.dtype)
    x = model.embed_tokens(input_ids, features, feature_index)
    out = model(x, positions, attention_mask=attention_mask, modality=modality, cache=cache,
                logits_at=last_real_index(attention_mask), prefill=True)
    return out.logits, out.cache


def decode_step(model, tokens, positions, cache, presliced=None):
    """tokens [B] (the last sampled), positions [B] (their rope positions) -> (logits [B, V] float32, cache with
    the tokens written at slot `cache.length`). Text positions: the three rope rows are equal. `presliced`: the
    model's `preslice_moe_layers()`, made outside the loop that calls this (see `decode_loop`)."""
    b = tokens.shape[0]
    x = model.embed_tokens(tokens[:, None])
    pos3 = jnp.broadcast_to(positions[None, :, None], (3, b, 1))
    out = model(x, pos3, cache=cache, logits_at=jnp.zeros((b,), jnp.int32), presliced=presliced)
    return out.logits, out.cache


def decode_loop(graphdef, state, run):
    """`run(presliced)` builds a decode loop (e.g. a `lax.while_loop`) whose steps call
    `decode_step(..., presliced=presliced)`; this runs it with the weights as the platform reads them best.

    On CPU the per-layer weights of the stacked MoE layers are sliced once, here, before the loop
    (`BailingMoeV2.preslice_moe_layers`): XLA:CPU copies a dot operand that is a slice of a bigger array every time
    the dot runs, which in the loop meant every layer's weights once per token. Elsewhere the loop keeps the layer
    scan (`presliced=None`): XLA:TPU reads a slice of the stacks in place; on GPU neither form has been measured
    (no GPU lent yet). The choice is made when lowering (`lax.platform_dependent`), so an ahead-of-time compile for
    TPU from a CPU host gets the TPU program. Both programs compute the same tokens.
    """
    if not nnx.merge(graphdef, state).can_preslice():  # nothing to slice (no MoE layers, weight hooks, ...)
        return run(None)

    def on_cpu():
        return run(nnx.merge(graphdef, state).preslice_moe_layers())

    return jax.lax.platform_dependent(cpu=on_cpu, default=lambda: run(None))


def make_decode_step(graphdef):
    """(params, cache, tokens [B], positions [B]) -> (logits [B, V] float32, cache)."""

    def step(params, cache, tokens, positions):
        return decode_step(nnx.merge(graphdef, params), tokens, positions, cache)

    return step


def make_prefill(graphdef, max_len: int):
    """(params, input_ids [B, S], attention_mask [B, S], positions [3, B, S]) -> (logits [B, V], cache of
    `max_len` slots): the text prefill as a function of the parameters (what `ming_jax.aot` compiles)."""

    def step(params, input_ids, attention_mask, positions):
        return prefill(nnx.merge(graphdef, params), input_ids, attention_mask, positions, None, None, None,
                       max_len=max_len)

    return step
