"""MoE stages against independent references: transformers' DeepSeek-V3 router (same routing rule), a per-token
dense computation of the block, and the per-expert loop oracle; dropless dispatch under skewed routing; gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ming_jax.models import llm as model_lib
from ming_jax.parity import numerics
from ming_jax import weights
from ming_jax.config import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.moe import dispatch
from ming_jax.pallas import gmm
from ming_jax.moe.block import MoEBlock
from ming_jax.moe.router import route
from ming_jax.weights.llm import llm_table
from flax import nnx


@pytest.mark.torch
@pytest.mark.parametrize("e, n_group, topk_group, k", [(16, 4, 2, 4), (32, 8, 3, 6), (16, 1, 1, 2), (64, 8, 4, 8)])
def test_router_matches_transformers_deepseek_v3(e, n_group, topk_group, k):
    """DeepSeek-V3's router is the same rule (sigmoid, correction bias for selection, top-2 group scores).
    It fills excluded groups with 0 rather than -inf, so the bias is kept positive here to make that immaterial."""
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = LLMConfig.tiny(num_layers=2, num_experts=e, n_group=n_group, topk_group=topk_group, num_experts_per_tok=k)
    model = model_lib.create(cfg, seed=e + k)
    sd = weights.export_state_dict(model, llm_table(cfg))
    rng = np.random.default_rng(0)
    bias = np.abs(rng.normal(0, 0.1, e)).astype(np.float32)
    sd["model.layers.1.mlp.gate.expert_bias"] = bias
    hf = DeepseekV3TopkRouter(DeepseekV3Config(
        hidden_size=cfg.hidden_size, n_routed_experts=e, num_experts_per_tok=k, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=cfg.routed_scaling_factor))
    with torch.no_grad():
        hf.weight.copy_(torch.from_numpy(sd["model.layers.1.mlp.gate.weight"]))
        hf.e_score_correction_bias.copy_(torch.from_numpy(bias))
    x = rng.normal(size=(257, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref_idx, ref_w = hf(torch.from_numpy(x))
    logits = x @ sd["model.layers.1.mlp.gate.weight"].T
    r = route(jnp.asarray(logits), jnp.asarray(bias), top_k=k, n_group=n_group, topk_group=topk_group,
              scaling=cfg.routed_scaling_factor)
    order, ref_order = np.argsort(r.experts, -1), np.argsort(ref_idx.numpy(), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(r.experts), order, -1),
                                  np.take_along_axis(ref_idx.numpy(), ref_order, -1))
    numerics.assert_close("topk_weight", np.take_along_axis(np.asarray(r.weights), order, -1),
                          np.take_along_axis(ref_w.numpy(), ref_order, -1))


def _dense_reference(block: MoEBlock, x, modality):
    """Per token: sum_k w_k * expert_k(x) + shared(x), every expert evaluated directly (no sorting)."""
    tokens = np.asarray(x).reshape(-1, x.shape[-1])
    r = block.router(jnp.asarray(tokens), None if modality is None else jnp.asarray(modality).reshape(-1))
    wg, wu, wd = (np.asarray(w[...]) for w in (block.w_gate, block.w_up, block.w_down))
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    out = np.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for e, w in zip(np.asarray(r.experts[t]), np.asarray(r.weights[t])):
            out[t] += w * ((silu(tokens[t] @ wg[e]) * (tokens[t] @ wu[e])) @ wd[e])
    sg, su, sd = (np.asarray(w[...]) for w in (block.shared.gate, block.shared.up, block.shared.down))
    out += (silu(tokens @ sg) * (tokens @ su)) @ sd
    return out.reshape(x.shape)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_moe_block_matches_per_token_reference(impl):
    """"pallas" runs the TPU kernels in the Pallas interpreter here."""
    cfg = LLMConfig.tiny()
    block = MoEBlock(cfg, Runtime(gmm=impl), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 37, cfg.hidden_size)).astype(np.float32)
    modality = rng.integers(0, 3, size=(2, 37)).astype(np.int32)
    y, _, _ = block(jnp.asarray(x), jnp.asarray(modality))
    numerics.assert_close("moe_out", y, _dense_reference(block, x, modality))


def test_dropless_dispatch_with_skewed_routing_and_empty_experts():
    rng = np.random.default_rng(2)
    t, k, e, d, f = 61, 4, 16, 24, 8
    # Nearly every pair goes to expert 3; experts 8..15 get nothing.
    idx = np.where(rng.random((t, k)) < 0.9, 3, rng.integers(0, 8, (t, k)))
    idx[:, 0] = 3
    w = rng.random((t, k)).astype(np.float32)
    x = rng.normal(size=(t, d)).astype(np.float32)
    wg, wu = rng.normal(size=(2, e, d, f)).astype(np.float32) / np.sqrt(d)
    wd = rng.normal(size=(e, f, d)).astype(np.float32) / np.sqrt(f)
    plan = dispatch.sort_by_expert(jnp.asarray(idx), e)
    assert int(plan.group_sizes.sum()) == t * k and int(plan.group_sizes[8:].sum()) == 0
    xs = dispatch.permute(jnp.asarray(x), plan)
    ffns = {"xla": functools.partial(gmm.grouped_glu, implementation="xla"), "loop": gmm.reference.grouped_glu}
    wg, wu, wd = jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd)
    outs = {impl: dispatch.combine(ffn(xs, plan.group_sizes, wg, wu, wd), plan, jnp.asarray(w))
            for impl, ffn in ffns.items()}
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    ref = np.zeros((t, d), np.float32)
    for i in range(t):
        for j in range(k):
            ref[i] += w[i, j] * ((silu(x[i] @ wg[idx[i, j]]) * (x[i] @ wu[idx[i, j]])) @ wd[idx[i, j]])
    for impl, out in outs.items():
        numerics.assert_close(f"dispatch_{impl}", out, ref)


def test_moe_gradients_match_loop_oracle():
    """Gradients of the routed experts' XLA path (inputs and the three expert stacks) equal those of the per-group
    loop oracle, through dispatch and the weighted combine; the expert bias gets none."""
    cfg = LLMConfig.tiny()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 19, cfg.hidden_size)).astype(np.float32))
    block = MoEBlock(cfg, Runtime(gmm="xla"), rngs=nnx.Rngs(4))
    tokens = x.reshape(-1, cfg.hidden_size)
    routing = block.router(tokens)
    plan = dispatch.sort_by_expert(routing.experts, cfg.num_experts)

    def loss(ffn, xt, wg, wu, wd):
        ys = ffn(dispatch.permute(xt, plan), plan.group_sizes, wg, wu, wd)
        return jnp.sum(jnp.sin(dispatch.combine(ys, plan, routing.weights)))

    weights_ = (block.w_gate[...], block.w_up[...], block.w_down[...])
    g_x = jax.grad(functools.partial(loss, functools.partial(gmm.grouped_glu, implementation="xla")),
                   argnums=(0, 1, 2, 3))(tokens, *weights_)
    g_l = jax.grad(functools.partial(loss, gmm.reference.grouped_glu), argnums=(0, 1, 2, 3))(tokens, *weights_)
    for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down"), g_x, g_l):
        numerics.assert_close(name, a, b)

    def f(block, x):
        y, _, _ = block(x)
        return jnp.sum(jnp.sin(y))

    gb_x = nnx.grad(f)(block, x)
    # The expert bias steers selection only: it gets no gradient.
    assert float(jnp.abs(gb_x.router.expert_bias[...]).max()) == 0.0


def test_group_limited_selection_stays_in_best_groups():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(100, 32)).astype(np.float32)
    r = route(jnp.asarray(logits), jnp.zeros(32), top_k=6, n_group=8, topk_group=2, scaling=1.0)
    s = 1 / (1 + np.exp(-logits))
    group_score = np.sort(s.reshape(100, 8, 4), -1)[..., -2:].sum(-1)
    best = np.argsort(-group_score, -1)[:, :2]
    chosen_groups = np.asarray(r.experts) // 4
    assert all(set(chosen_groups[i]) <= set(best[i]) for i in range(100))
    np.testing.assert_allclose(np.asarray(r.weights).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_remat_changes_memory_not_gradients():
    cfg = LLMConfig.tiny(num_layers=3)
    rng = np.random.default_rng(5)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 9)))
    pos = jnp.broadcast_to(jnp.arange(9), (3, 2, 9))

    def grads(remat):
        m = model_lib.create(cfg, Runtime(remat=remat), seed=0)

        def loss(m):
            out = m(m.embed_tokens(ids), pos)
            return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0])

        return nnx.grad(loss)(m)

    g0, g1 = grads(False), grads(True)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)):
        numerics.assert_close(".".join(map(str, path)), b[...], a[...])
