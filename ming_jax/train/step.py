"""The train step: loss, gradients and one optimizer update, jitted and sharded by the caller (`ming_jax.aot`
compiles exactly this function for TPU topologies)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ming_jax import sharding
from ming_jax.train.loss import chunked_cross_entropy


def make_train_step(graphdef, tx: optax.GradientTransformation):
    """(params, opt_state, input_ids [B, T], labels [B, T]) -> (params, opt_state, loss)."""

    def step(params, opt_state, input_ids, labels):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            b, t = input_ids.shape
            x = sharding.constrain(model.embed_tokens(input_ids), ("batch", "seq", "act_embed"))
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, None], (3, b, t))
            h = model(x, positions).hidden  # the model's full logits are dead code here: XLA drops them
            w_head = model.embed[...].T if model.lm_head is None else model.lm_head[...]  # as model.head
            return chunked_cross_entropy(w_head, h, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)  # float32 moments promote the arithmetic
        params = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), params, updates)
        return params, opt_state, loss

    return step
