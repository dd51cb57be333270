"""The Pallas grouped matmuls reading one layer of the [L, G, ...] expert stacks in place (issue 17).

`kernel.grouped_matmul(layer=)` takes the whole stacks ([L * G, K, N] inside, a free reshape) and adds a
scalar-prefetch group offset layer * G in the weight and scale index maps, so the scan's per-layer slice of the
experts (a copy of every expert, every layer, every step on TPU) is never needed. Checked in the Pallas interpreter:
the same values as the kernels on the per-layer slice (float and int8, per-channel and sub-channel scales, fused
row gather, transposed weights), and `grouped_glu(stacked=)` inside a layer scan: forward and gradients equal to
the per-layer path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ming_jax.pallas import gmm as G
from ming_jax.pallas.gmm import kernel, quant

L, GR, M, D, F = 3, 4, 32, 128, 128


def _inputs():
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (M, D), jnp.float32)
    w = jax.random.normal(k[1], (L, GR, D, F), jnp.float32) / np.sqrt(D)
    sizes = jnp.asarray([9, 0, 15, 5], jnp.int32)  # an empty group, 3 padding rows
    rows = jax.random.randint(k[2], (M,), 0, M).astype(jnp.int32)
    return x, w, sizes, rows


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("variant", ["float", "gather_transposed", "int8", "int8_subchannel"])
def test_kernel_reads_the_layer_of_the_stack(variant, layer):
    x, w, sizes, rows = _inputs()
    kw = dict(terms=(((0, 0),),), out_dtypes=(jnp.float32,), interpret=True)
    if variant == "gather_transposed":
        w = jnp.swapaxes(w, 2, 3)  # [L, G, N, K]
        kw.update(transpose_rhs=True, lhs_rows=rows)
    if variant.startswith("int8"):
        q = quant.quantize(w, "int8", (2,), 32 if variant.endswith("subchannel") else None)
        stack, scales = q.qvalue, q.scale
        ref = kernel.grouped_matmul((x,), (stack[layer],), sizes, rhs_scales=(scales[layer],), **kw)[0]
        got = kernel.grouped_matmul((x,), (stack,), sizes, rhs_scales=(scales,), layer=jnp.int32(layer), **kw)[0]
    else:
        ref = kernel.grouped_matmul((x,), (w[layer],), sizes, **kw)[0]
        got = kernel.grouped_matmul((x,), (w,), sizes, layer=jnp.int32(layer), **kw)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_kernel_layer_argument_is_checked():
    x, w, sizes, _ = _inputs()
    with pytest.raises(ValueError, match="stacks"):
        kernel.grouped_matmul((x,), (w[0],), sizes, terms=(((0, 0),),), out_dtypes=(jnp.float32,), interpret=True,
                              layer=jnp.int32(0))


T, K, E = 8, 2, 4


def _scan(stacks_in_place: bool, quantized: bool):
    def run(x, wg, wu, wd, experts):
        stacks = (wg, wu, wd)

        def body(h, i):
            ex = experts[i]
            order = jnp.argsort(ex.reshape(-1), stable=True).astype(jnp.int32)
            sizes = jnp.bincount(ex.reshape(-1), length=E).astype(jnp.int32)
            ws = tuple(jax.tree.map(lambda a: a[i], s) for s in stacks)  # the scan's per-layer slices
            ys = G.grouped_glu(h, sizes, *ws, rows=order // K, implementation="pallas", interpret=True,
                               stacked=(i, *stacks) if stacks_in_place else None)
            back = jnp.zeros_like(ys).at[order].set(ys).reshape(T, K, D).sum(1)
            return h + back, None

        return jax.lax.scan(body, x, jnp.arange(L, dtype=jnp.int32))[0]

    return run


@pytest.mark.parametrize("quantized", [False, True])
def test_grouped_glu_in_place_in_a_layer_scan_equals_per_layer(quantized):
    k = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(k[0], (T, D), jnp.float32)
    wg, wu = (jax.random.normal(k[i], (L, E, D, F)) / np.sqrt(D) for i in (1, 2))
    wd = jax.random.normal(k[3], (L, E, F, D)) / np.sqrt(F)
    experts = jax.random.randint(k[4], (L, T, K), 0, E - 1)
    ws = (wg, wu, wd)
    if quantized:
        ws = tuple(quant.quantize(w, "int8", (2,)) for w in ws)
    ours, ref = _scan(True, quantized), _scan(False, quantized)
    assert "_stacked" in str(jax.make_jaxpr(ours)(x, *ws, experts))  # the kernels that index the stacks run
    np.testing.assert_allclose(np.asarray(ours(x, *ws, experts)), np.asarray(ref(x, *ws, experts)), rtol=0, atol=0)
    argnums = (0,) if quantized else (0, 1, 2, 3)  # quantized weights are constants

    def grads(fn):
        return jax.grad(lambda *a: jnp.sum(fn(*a, experts) ** 2), argnums=argnums)(x, *ws)

    for a, b in zip(grads(ours), grads(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_quantized_model_hands_the_stacks_on_and_matches_unrolled_layers():
    """An int8 model's scanned MoE layers get the QArray stacks (`_expert_stacks`); with gmm="pallas" (interpreted
    here) the kernels read them in place, and the logits match the same model run layer by layer."""
    from ming_jax.config import LLMConfig
    from ming_jax.config.runtime import Runtime
    from ming_jax.models import llm as model_lib
    from ming_jax.quant.model import quantize_model

    cfg = LLMConfig.tiny(num_layers=3, first_k_dense_replace=1, hidden_size=128, num_experts=8,
                         moe_intermediate_size=128, num_experts_per_tok=2, n_group=4, topk_group=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (3, 1, 8))
    logits = {}
    for name, runtime in (("pallas", Runtime(gmm="pallas")), ("unrolled", Runtime(scan_layers=False))):
        model = quantize_model(model_lib.create(cfg, runtime, seed=3), "int8")
        stacks = model._expert_stacks()
        assert (stacks is None) == (name == "unrolled")
        assert stacks is None or all(quant.is_quantized(s) and s.qvalue.ndim == 4 for s in stacks)
        logits[name] = np.asarray(model(model.embed_tokens(ids), pos).logits)
    np.testing.assert_allclose(logits["pallas"], logits["unrolled"], rtol=1e-5, atol=1e-5)
