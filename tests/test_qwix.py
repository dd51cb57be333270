"""qwix on the tiny LLM: int8 weight PTQ (`qwix.quantize_model`) and LoRA (`qwix.apply_lora_to_model`).

qwix rewrites a module's weights while the module runs (PTQ replaces a kernel by a `WithAux` holding a `QArray`,
LoRA adds `<name>_lora_a` / `_lora_b` parameters), which a scan body cannot do, so these run with
`scan_layers=False`: the MoE layers as a Python loop over slices of the same stacked parameters. Every projection
reads its weight through `ming_jax.layers.params.read`, which hands a quantized weight to the intercepted einsum
untouched. The routed experts (grouped matmuls, `ragged_dot` / Pallas) are not intercepted by qwix and stay float;
the routers are kept out of the rules (quantizing gate logits can flip top-k choices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax.config.runtime import Runtime
from ming_jax.config.llm import LLMConfig
from ming_jax.models import llm

qwix = pytest.importorskip("qwix")

NOT_ROUTER = r"^(?!.*router).*$"

UNROLLED = Runtime(scan_layers=False)  # the MoE layers as a Python loop: what qwix's providers need


@pytest.fixture(scope="module")
def setup():
    cfg = LLMConfig.tiny()
    model = llm.create(cfg, UNROLLED)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), (3, 2, 8))
    embeds = model.embed_tokens(ids)
    return model, embeds, positions, model(embeds, positions).logits


def _flat(state):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def test_unrolled_layers_equal_the_scan():
    cfg = LLMConfig.tiny()
    scanned, unrolled = llm.create(cfg), llm.create(cfg, UNROLLED)
    assert _flat(nnx.state(scanned, nnx.Param)).keys() == _flat(nnx.state(unrolled, nnx.Param)).keys()
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), (3, 2, 8))
    e = scanned.embed_tokens(ids)
    a, b = scanned(e, positions, collect=True), unrolled(e, positions, collect=True)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a.layer_outputs, b.layer_outputs, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(a.routing.experts, b.routing.experts)


def test_int8_weight_ptq(setup):
    model, embeds, positions, ref = setup
    rules = [qwix.QuantizationRule(module_path=NOT_ROUTER, weight_qtype="int8")]
    q = qwix.quantize_model(model, qwix.PtqProvider(rules), embeds, positions)
    params = _flat(nnx.state(q))
    # Every dense projection of every layer (the stacked MoE layers too) now holds an int8 QArray.
    for name in ("dense_layers.0.attn.qkv", "dense_layers.0.attn.out", "dense_layers.0.mlp.gate",
                 "moe_layers.attn.qkv", "moe_layers.attn.out", "moe_layers.moe.shared.down", "lm_head"):
        assert params[f"{name}.array.qvalue"].get_value().dtype == jnp.int8, name
    assert params["moe_layers.attn.qkv.array.qvalue"].shape[0] == model.cfg.num_moe_layers  # still stacked
    assert "moe_layers.moe.router.kernel" in params and "moe_layers.moe.w_gate" in params  # float, same paths
    out = q(embeds, positions).logits
    assert bool(jnp.all(jnp.isfinite(out)))
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel
    jitted = nnx.jit(lambda m, e, p: m(e, p).logits)(q, embeds, positions)
    np.testing.assert_allclose(jitted, out, atol=1e-4, rtol=1e-4)


def test_lora(setup):
    model, embeds, positions, ref = setup
    rules = [qwix.LoraRule(module_path=NOT_ROUTER, rank=4, alpha=8.0)]
    lora = qwix.apply_lora_to_model(model, qwix.LoraProvider(rules), embeds, positions, rngs=nnx.Rngs(0))
    factors = _flat(nnx.state(lora, nnx.LoRAParam))
    assert {"dense_layers.0.attn.qkv_lora_a", "moe_layers.attn.qkv_lora_a", "moe_layers.moe.shared.up_lora_b",
            "lm_head_lora_a"} <= factors.keys()
    assert factors["moe_layers.attn.qkv_lora_a"].shape[0] == model.cfg.num_moe_layers  # stacked like the layer
    # B starts at zero: the adapted model is the base model.
    np.testing.assert_allclose(lora(embeds, positions).logits, ref, atol=1e-5, rtol=1e-5)

    # Gradients reach the LoRA factors; after a step the output moves.
    def loss(m):
        return jnp.sum(m(embeds, positions).logits ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(lora)
    g = _flat(grads)
    assert any(float(jnp.max(jnp.abs(v.get_value()))) > 0 for k, v in g.items() if k.endswith("_lora_b"))
    nnx.update(lora, jax.tree.map(lambda p, d: p - 1e-3 * d, nnx.state(lora, nnx.LoRAParam), grads))
    assert float(jnp.max(jnp.abs(lora(embeds, positions).logits - ref))) > 0
