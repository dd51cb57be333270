"""The inspection hooks the quickstart notebook uses: `BailingMoeV2.layer(i)` (one decoder layer as a module, an MoE
layer sliced from the stack) and `attention_weights` (a layer's softmax weights recomputed from its input), over
`reference.probabilities`, the weights `reference.attend` applies."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax.config.llm import LLMConfig
from ming_jax.gen import text
from ming_jax.models import inputs, llm
from ming_jax.pallas.attention import reference
from ming_jax.pallas.attention.api import AttentionMask


def test_probabilities_are_the_weights_attend_applies():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8)))
    mask = reference.dense_mask(5, 7, causal=False) & (jnp.arange(7) < 6)[None, None, None]
    p = reference.probabilities(q, k, mask)  # [B, H, T, S]
    assert p.shape == (2, 4, 5, 7)
    np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, atol=1e-6)
    assert float(p[..., 6].max()) == 0.0  # a masked key
    v_per_head = jnp.repeat(v, 2, axis=2)  # query head h reads KV head h // 2
    out = jnp.einsum("bhts,bshd->bthd", p, v_per_head)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference.attend(q, k, v, mask)), atol=1e-5)


@pytest.fixture(scope="module")
def run():
    cfg = LLMConfig.tiny()
    model = llm.create(cfg, host=True)  # random weights drawn on the host: no initializer compiles
    ids, mask = text.pad_prompts([[1, 2, 3, 4, 5, 6], [7, 8, 9]], side="left")
    prep = inputs.prepare(cfg, ids, mask)
    embeds, out = text.forward(model, prep, collect=True)
    return cfg, model, prep, embeds, out


def test_layer_i_is_the_layer_the_forward_ran(run):
    cfg, model, prep, embeds, out = run
    @functools.partial(nnx.jit, static_argnums=1)
    def layer_out(model, i, x, positions, attention_mask):
        cos, sin = model.rotary(positions)
        mask = AttentionMask.self_attention(attention_mask.astype(jnp.int32), causal=True)
        return model.layer(i)(x, cos, sin, mask)[0]

    real = np.asarray(prep.attention_mask)
    for i in range(cfg.num_layers):
        x = embeds if i == 0 else out.layer_outputs[i - 1]
        y = layer_out(model, i, x, prep.positions, prep.attention_mask)
        np.testing.assert_allclose(np.asarray(y)[real], np.asarray(out.layer_outputs[i])[real], atol=2e-5)
    with pytest.raises(IndexError):
        model.layer(cfg.num_layers)


def test_attention_weights_of_every_layer(run):
    cfg, model, prep, embeds, out = run
    weights = nnx.jit(lambda m, i, x, p, a: m.attention_weights(i, x, p, attention_mask=a), static_argnums=1)
    for i in range(cfg.num_layers):
        x = embeds if i == 0 else out.layer_outputs[i - 1]
        w = np.asarray(weights(model, i, x, prep.positions, prep.attention_mask))
        assert w.shape == (2, cfg.num_heads, 6, 6)
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        assert np.triu(w, 1).max() == 0.0  # causal
        assert w[1, :, 3:, :3].max() == 0.0  # the left padding of row 1 is never attended
        assert np.isfinite(w).all()
