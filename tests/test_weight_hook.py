"""Every weight of every tower enters its computation through the one read site, `ming_jax.layers.params.read`.

How it is checked, without a hand list of parameter names: a hook installed with `weight_hook` cuts the gradient of
every value that `read` hands out. Differentiating a random projection of the outputs with respect to every
parameter of the model then gives
  * without the hook: the parameters the output depends on (expected: all of them, except those the model itself
    keeps out of the gradient, i.e. zero in this run too);
  * with the hook: the parameters that reached the output some other way. That set must be empty: a new projection
    that reads `self.kernel[...]` (or passes the variable straight to jnp) shows up here by its path.
A second hook counts the reads, so the check also fails if the model stops calling `read` altogether.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax.config.runtime import Runtime
from ming_jax.config.audio import AudioConfig
from ming_jax.config.llm import LLMConfig
from ming_jax.config.vision import VisionConfig
from ming_jax.layers.params import read, weight_hook
from ming_jax.models import llm
from ming_jax.models.audio import AudioTower, clip_layout
from ming_jax.models.vision import VisionProjector, VisionTransformer, as_grid


def _path(p) -> str:
    return ".".join(str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey))


def _grad_paths(model, loss_fn, *, hooked: bool):
    """Paths of the parameters with a nonzero gradient of `loss_fn(model)`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params):
        return loss_fn(nnx.merge(graphdef, params, rest))

    if hooked:
        with weight_hook(lambda weight, value: jax.lax.stop_gradient(value)):
            grads = jax.grad(f)(params)
    else:
        grads = jax.grad(f)(params)
    return {_path(p) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
            if np.any(np.asarray(g) != 0)}


def _all_paths(model):
    return {_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}


def _random_weighted_sum(*outs):
    """A scalar depending on every output element (a plain sum would cancel through the L2 / layer norms)."""
    total = 0.0
    for i, o in enumerate(jax.tree.leaves(outs)):
        r = jax.random.normal(jax.random.key(i), o.shape, jnp.float32)
        total = total + jnp.sum(o.astype(jnp.float32) * r)
    return total


def _check(model, loss_fn, *, never_in_gradient: set[str] = frozenset()):
    every = _all_paths(model)
    reads = []
    with weight_hook(lambda weight, value: reads.append(weight) or value):
        used = _grad_paths(model, loss_fn, hooked=False)
    assert reads, "the model never called ming_jax.layers.params.read"
    bypass = _grad_paths(model, loss_fn, hooked=True)
    assert not bypass, f"parameters reaching the output without going through params.read: {sorted(bypass)}"
    # What the hook saw is everything the output depends on: all parameters but the ones kept out of the gradient.
    assert used == every - set(never_in_gradient), (sorted(every - used), sorted(used - every))


def _is_expert_bias(path: str) -> bool:
    return path.endswith("expert_bias")


@pytest.mark.slow
def test_every_llm_weight_goes_through_read():
    cfg = LLMConfig.tiny()
    model = llm.create(cfg)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(8), (3, 2, 8))

    def loss(m):
        return _random_weighted_sum(m(m.embed_tokens(ids), positions).logits)

    # The expert bias only ranks experts (stop_gradient in the router): it is read through the site, but no gradient.
    expert_bias = {p for p in _all_paths(model) if _is_expert_bias(p)}
    assert expert_bias
    _check(model, loss, never_in_gradient=expert_bias)


def test_every_llm_weight_goes_through_read_unscanned_and_tied():
    cfg = LLMConfig.tiny(tie_word_embeddings=True)
    model = llm.create(cfg, Runtime(scan_layers=False))
    ids = jax.random.randint(jax.random.key(1), (1, 6), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(6), (3, 1, 6))

    def loss(m):
        return _random_weighted_sum(m(m.embed_tokens(ids), positions).logits)

    _check(model, loss, never_in_gradient={p for p in _all_paths(model) if _is_expert_bias(p)})


@pytest.mark.slow
def test_every_vision_weight_goes_through_read():
    cfg = VisionConfig.tiny()
    tower = VisionTransformer(cfg, use_deepstack=True, rngs=nnx.Rngs(0))
    grid = as_grid(((1, 4, 4), (2, 2, 4)))
    n = sum(t * h * w for t, h, w in grid)
    px = jax.random.normal(jax.random.key(2), (n, cfg.patch_dim))

    _check(tower, lambda m: _random_weighted_sum(m(px, grid)))

    projector = VisionProjector(cfg.out_hidden_size, 96, 2, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(3), (5, cfg.out_hidden_size))
    _check(projector, lambda m: _random_weighted_sum(m(x)))


def test_every_audio_weight_goes_through_read():
    cfg = AudioConfig.tiny(mlp_depth=2)
    tower = AudioTower(cfg, rngs=nnx.Rngs(0))
    lengths = np.array([[12, 8], [16, 0]])
    feats = jax.random.normal(jax.random.key(4), (2, 20, cfg.encoder.n_mels))
    layout = clip_layout(lengths, feats.shape[1], cfg)

    def loss(m):
        out = m(feats, layout)
        return _random_weighted_sum(out.embeds, out.encoder_padded)

    _check(tower, loss)


def test_read_without_hooks_is_the_plain_cast():
    p = nnx.Param(jnp.arange(6, dtype=jnp.float32).reshape(2, 3))
    assert read(p) is p.get_value()  # the stored object itself: interceptors find the weight by identity
    assert read(p, jnp.float32) is p.get_value()
    np.testing.assert_array_equal(read(p, jnp.bfloat16), p[...].astype(jnp.bfloat16))
    wrapped = object()  # a wrapped weight (e.g. qwix's WithAux) is handed on untouched
    assert read(wrapped, jnp.bfloat16) is wrapped
