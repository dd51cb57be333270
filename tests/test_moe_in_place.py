"""Work the MoE layer used to do off TPU for nothing, and its removal (issue 13's densification audit).

1. The routed experts read in place inside the layer scan (`stacked=` of `ming_jax.pallas.gmm.api.grouped_glu`).
   Inside a scan over layers each layer's expert weights are a dynamic slice of the [L, E, ...] stacks, and XLA
   copies that slice whole before a loop can use it: every expert of every layer written and read again per
   forward, which at batch 1 decode is several times the work of the experts the tokens use. With the stacks passed
   in, the forward reads each step's expert out of the stacks; under differentiation the per-layer slices are used
   (their cotangents are what the scan stacks). Checked: same values and gradients as the per-layer path, and the
   compiled decode step, prefill and forward hold no copy of a layer's experts.
2. The router computes only the text gate when no token has another modality (not all three gates).
3. The combine gathers each token's rows off TPU (no [T*K, D] scatter and no [T, K] x [T, K, D] einsum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax.config import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.gen import steps
from ming_jax.layers import params as params_lib
from ming_jax.layers.kv_cache import KVCache
from ming_jax.models import llm as model_lib
from ming_jax.parity import numerics
from ming_jax.pallas import gmm as G

L, T, K, E, D, F = 3, 24, 2, 6, 32, 16


def _stack_inputs(dtype):
    k = jax.random.split(jax.random.key(0), 5)
    dt = jnp.dtype(dtype)
    x = jax.random.normal(k[0], (T, D), jnp.float32).astype(dt)
    wg = (jax.random.normal(k[1], (L, E, D, F)) / np.sqrt(D)).astype(dt)
    wu = (jax.random.normal(k[2], (L, E, D, F)) / np.sqrt(D)).astype(dt)
    wd = (jax.random.normal(k[3], (L, E, F, D)) / np.sqrt(F)).astype(dt)
    experts = jax.random.randint(k[4], (L, T, K), 0, E - 1)  # the last expert stays empty
    experts = experts.at[1].set(2)  # layer 1: one expert takes every row
    return x, wg, wu, wd, experts


def _scan_ffn(in_place: bool, impl: str):
    """A scan over L layers of the routed FFN (x -> x + ffn(x)), the weights scanned as xs like the model's layers."""

    def run(x, wg, wu, wd, experts):
        stacks = (wg, wu, wd) if in_place else None

        def body(h, layer):
            i, g, u, d, ex = layer
            order = jnp.argsort(ex.reshape(-1), stable=True).astype(jnp.int32)
            sizes = jnp.bincount(ex.reshape(-1), length=E).astype(jnp.int32)
            ys = G.grouped_glu(h, sizes, g, u, d, rows=order // K, implementation=impl,
                               stacked=None if stacks is None else (i, *stacks))
            back = jnp.zeros_like(ys).at[order].set(ys).reshape(T, K, D).sum(1)
            return h + back, None

        out, _ = jax.lax.scan(body, x, (jnp.arange(L, dtype=jnp.int32), wg, wu, wd, experts))
        return out

    return jax.jit(run)


@pytest.mark.parametrize("impl", ["portable", "auto"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_place_equals_per_layer_forward_and_gradients(dtype, impl):
    x, wg, wu, wd, experts = _stack_inputs(dtype)
    ours, ref = _scan_ffn(True, impl), _scan_ffn(False, impl)
    numerics.assert_close("y", np.asarray(ours(x, wg, wu, wd, experts), np.float32),
                          np.asarray(ref(x, wg, wu, wd, experts), np.float32), dtype=dtype)

    def grads(fn):
        loss = lambda *a: jnp.sum(fn(*a, experts).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

    for name, g, want in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads(ours), grads(ref)):
        assert g.shape == want.shape and g.dtype == want.dtype
        numerics.assert_close(name, np.asarray(g, np.float32), np.asarray(want, np.float32), dtype=dtype)
    g_last = np.asarray(grads(ours)[1], np.float32)[:, E - 1]
    assert not g_last.any()  # an expert no token chose gets an exact zero gradient


def test_in_place_backward_keeps_no_per_layer_stack_cotangent():
    """Under jax.grad the stacks enter through stop_gradient: the backward holds the per-layer weight gradients the
    scan stacks, not a full [L, E, ...] cotangent per layer (which would be L times the weights in temporaries)."""
    x, wg, wu, wd, experts = _stack_inputs("float32")

    def compiled(fn):
        loss = lambda *a: jnp.sum(fn(*a, experts) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, wg, wu, wd).compile()

    ours = compiled(_scan_ffn(True, "portable")).memory_analysis().temp_size_in_bytes
    ref = compiled(_scan_ffn(False, "portable")).memory_analysis().temp_size_in_bytes
    assert ours <= ref + 4096, (ours, ref)


# ------------------------------------------------------------------------------------------ the model


CFG = LLMConfig.tiny(num_layers=4, first_k_dense_replace=1, hidden_size=128, num_experts=32,
                     moe_intermediate_size=128, num_experts_per_tok=4, n_group=4, topk_group=2)


def _expert_bytes_per_layer(cfg: LLMConfig, itemsize: int = 4) -> int:
    return 3 * cfg.num_experts * cfg.hidden_size * cfg.moe_intermediate_size * itemsize


def _decode_temp(runtime: Runtime | None = None) -> int:
    graphdef, state = nnx.split(model_lib.create_abstract(CFG, runtime))
    cache = jax.eval_shape(lambda: KVCache.create(CFG, 1, 64))
    tok = jax.ShapeDtypeStruct((1,), jnp.int32)
    step = jax.jit(steps.make_decode_step(graphdef), donate_argnums=(1,))
    return step.lower(state, cache, tok, tok).compile().memory_analysis().temp_size_in_bytes


def test_decode_step_holds_no_copy_of_a_layers_experts():
    """Before, the decode step's temporaries held the scan's copy of a layer's expert weights: 7.0 MiB here (6 MiB of
    experts per layer), 216 MiB at the benchmarks/vs_torch.py config (192 MiB per layer). Now 1.0 MiB: activations
    and the tiles of the experts in use."""
    bound = _expert_bytes_per_layer(CFG) / 2
    temp = _decode_temp()
    assert temp < bound, f"decode step temporaries {temp / 2**20:.2f} MiB >= {bound / 2**20:.2f} MiB: experts copied?"
    # the guard discriminates: without the stacks (layers unrolled) the per-layer expert copies are there again
    assert _decode_temp(Runtime(scan_layers=False)) >= bound


def test_prefill_and_forward_hold_no_copy_of_a_layers_experts():
    graphdef, state = nnx.split(model_lib.create_abstract(CFG))
    ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 16), jnp.bool_)
    pos = jax.ShapeDtypeStruct((3, 1, 16), jnp.int32)
    prefill = jax.jit(steps.make_prefill(graphdef, 32)).lower(state, ids, mask, pos).compile()

    def forward(state, ids, mask, pos):
        model = nnx.merge(graphdef, state)
        return model(model.embed_tokens(ids), pos, attention_mask=mask).logits

    fwd = jax.jit(forward).lower(state, ids, mask, pos).compile()
    bound = _expert_bytes_per_layer(CFG) / 2
    for name, c in (("prefill", prefill), ("forward", fwd)):
        temp = c.memory_analysis().temp_size_in_bytes
        assert temp < bound, f"{name}: {temp / 2**20:.2f} MiB temporaries >= {bound / 2**20:.2f} MiB"


@pytest.mark.slow
def test_model_in_place_equals_unrolled_layers():
    """The scanned model (experts read in place) against the same weights run layer by layer (per-layer slices):
    forward logits, the KV-cache prefill + decode, and the gradient of every parameter."""
    model = model_lib.create(CFG, seed=3)
    graphdef, state = nnx.split(model)
    unrolled = nnx.merge(*nnx.split(model_lib.create(CFG, Runtime(scan_layers=False), seed=3)))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), state, nnx.state(unrolled)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (3, 2, 12))

    def loss(m):
        return jnp.mean(m(m.embed_tokens(ids), pos).logits ** 2)

    for name, a, b in (("logits", model(model.embed_tokens(ids), pos).logits,
                        unrolled(unrolled.embed_tokens(ids), pos).logits),):
        numerics.assert_close(name, np.asarray(a), np.asarray(b))
    g_ours, g_ref = nnx.grad(loss)(model), nnx.grad(loss)(unrolled)
    flat_ours, flat_ref = dict(nnx.to_flat_state(g_ours)), dict(nnx.to_flat_state(g_ref))
    assert flat_ours.keys() == flat_ref.keys()
    for path in flat_ours:
        numerics.assert_close("/".join(map(str, path)), np.asarray(flat_ours[path].get_value()),
                              np.asarray(flat_ref[path].get_value()))

    def decode(m):
        logits, cache = steps.prefill(m, ids, jnp.ones((2, 12), bool), pos, None, None, None, max_len=16)
        out = [logits]
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        for i in range(3):
            logits, cache = steps.decode_step(m, tok, jnp.full((2,), 12 + i, jnp.int32), cache)
            out.append(logits)
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
        return jnp.stack(out)

    numerics.assert_close("decode logits", np.asarray(decode(model)), np.asarray(decode(unrolled)))


def test_weight_hooks_see_each_layers_weights():
    """With a weight hook installed, the experts are read through `read` per layer (the stacks are not used), so a
    hook sees [E, D, F] expert weights, as before."""
    model = model_lib.create(CFG, seed=1)
    seen = []

    def hook(weight, value):
        seen.append(tuple(value.shape))
        return value

    ids = jnp.zeros((1, 4), jnp.int32)
    pos = jnp.zeros((3, 1, 4), jnp.int32)
    with params_lib.weight_hook(hook):
        model(model.embed_tokens(ids), pos)
    assert (CFG.num_experts, CFG.hidden_size, CFG.moe_intermediate_size) in seen
    assert not any(len(s) == 4 and s[0] == CFG.num_moe_layers and s[1] == CFG.num_experts for s in seen)


# ------------------------------------------------------------------------------------------ the router


def test_text_only_routing_computes_one_gate():
    """modality None (text prompts, decode steps): only the text gate's logits are computed, not all three gates'
    of the MultiRouter (the release computes all three on every token and keeps one). Same routing either way."""
    from ming_jax.moe.router import Router

    t, d, e = 64, 32, 16
    router = Router(d, e, 3, top_k=4, n_group=4, topk_group=2, scaling=2.5, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(router)
    x = jax.random.normal(jax.random.key(1), (t, d))
    text = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    tagged = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, jnp.zeros((t,), jnp.int32)))  # every token text
    a, b = text(state, x), tagged(state, x)
    np.testing.assert_array_equal(np.asarray(a.experts), np.asarray(b.experts))
    numerics.assert_close("weights", np.asarray(a.weights), np.asarray(b.weights))
    flops = text.lower(state, x).compile().cost_analysis()["flops"]
    assert flops < 1.5 * 2 * t * d * e, flops  # one [T, D] x [D, E] matmul (plus the top-k), not three


# ------------------------------------------------------------------------------------------ the combine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_combine_by_gather_equals_the_scatter_form(dtype):
    """Off TPU `dispatch.combine` gathers each token's K rows (no [T*K, D] scatter); same values and gradients."""
    from ming_jax.moe import dispatch

    t, k, d, e = 40, 4, 24, 8
    rng = np.random.default_rng(2)
    experts = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32))
    experts = experts.at[:5].set(jnp.arange(k, dtype=jnp.int32))  # some experts shared by many tokens
    plan = dispatch.sort_by_expert(experts, e)
    ys = jnp.asarray(rng.standard_normal((t * k, d)), dtype)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)

    def loss(fn):
        return jax.value_and_grad(lambda ys, w: jnp.sum(jnp.sin(fn(ys, plan.order, w).astype(jnp.float32))),
                                  argnums=(0, 1))(ys, w)

    (v, (d_ys, d_w)), (v_ref, (d_ys_ref, d_w_ref)) = (jax.jit(lambda: loss(f))() for f in (
        dispatch.combine_by_gather, dispatch._combine_by_scatter))
    y, y_ref = dispatch.combine(ys, plan, w), dispatch._combine_by_scatter(ys, plan.order, w)
    assert y.dtype == ys.dtype and d_ys.dtype == ys.dtype and d_w.dtype == w.dtype
    for name, a, b in (("y", y, y_ref), ("loss", v, v_ref), ("d_ys", d_ys, d_ys_ref), ("d_w", d_w, d_w_ref)):
        numerics.assert_close(name, np.asarray(a, np.float32), np.asarray(b, np.float32), dtype=dtype)


def test_combine_on_cpu_keeps_no_rows_sized_temporary():
    """The CPU combine reads each token's rows once: its compiled temporaries are far below one [T*K, D] copy (the
    scatter form holds that copy: 64 MiB at 2048 tokens x top-8, D 1024; 12 vs 100 ms on the 2-core CPU)."""
    from ming_jax.moe import dispatch

    t, k, d = 512, 8, 256
    args = (jax.ShapeDtypeStruct((t * k, d), jnp.float32), jax.ShapeDtypeStruct((t * k,), jnp.int32),
            jax.ShapeDtypeStruct((t, k), jnp.float32))
    rows_bytes = t * k * d * 4

    def temp(fn):
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    got = temp(lambda ys, order, w: dispatch.combine(ys, dispatch.DispatchPlan(order, jnp.zeros((1,), jnp.int32),
                                                                                k), w))
    assert got < rows_bytes / 8, got
    assert temp(dispatch._combine_by_scatter) >= rows_bytes  # the guard discriminates
