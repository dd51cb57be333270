"""cuDNN flash attention through `ming_jax.pallas.attention.api.attention` against the reference `attend` (NVIDIA GPU only).

Marked `gpu`: CI deselects them (`-m "not gpu"`); on a machine without a GPU backend they skip with that reason.
cuDNN takes bfloat16 / float16 only, so tolerances are numerics' bfloat16 row; the reference sees the same rounded
inputs in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ming_jax.parity import numerics
from ming_jax.pallas.attention import api as ops
from ming_jax.pallas.attention.reference import attend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU backend (jax[cuda])"),
]


def _f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def _inputs(b, t, h, kv, hd, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    bf = jnp.bfloat16
    return (jax.random.normal(k1, (b, t, h, hd)).astype(bf), jax.random.normal(k2, (b, t, kv, hd)).astype(bf),
            jax.random.normal(k3, (b, t, kv, hd)).astype(bf), jax.random.normal(k4, (b, t, h, hd)))


def _vjp(fn, q, k, v, ct):
    out, pull = jax.vjp(fn, q, k, v)
    return out, pull(ct.astype(out.dtype))


@pytest.mark.parametrize("causal,layout", [(True, "padding"), (True, "packed"), (False, "images"), (False, "none")])
def test_cudnn_matches_attend(causal, layout):
    b, t, h, kv, hd = 2, 256, 8, 2, 128
    q, k, v, ct = _inputs(b, t, h, kv, hd)
    seg = {
        "padding": np.stack([np.r_[np.zeros(37), np.ones(t - 37)], np.r_[np.ones(t - 90), np.zeros(90)]]),
        "packed": np.tile(np.r_[np.full(70, 1), [2], np.full(100, 3), np.zeros(t - 171)], (b, 1)),
        "images": np.tile(np.repeat(np.arange(3), [64, 100, 92]), (b, 1)),
        "none": None,
    }[layout]
    mask = ops.AttentionMask.self_attention(None if seg is None else jnp.asarray(seg, jnp.int32), causal=causal)
    assert ops.resolve_attention_impl("auto", q, k, mask) == "cudnn"
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    out, grads = jax.jit(lambda *a: _vjp(lambda q, k, v: ops.attention(q, k, v, mask, impl="cudnn"), *a))(q, k, v, ct)
    ref, ref_grads = jax.jit(lambda *a: _vjp(
        lambda q, k, v: attend(f32(q), f32(k), f32(v), mask.to_dense(t, t)), *a))(q, k, v, ct)
    numerics.assert_close("cudnn.out", _f32(out), _f32(ref), dtype="bfloat16")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        numerics.assert_close(f"cudnn.{name}", _f32(g), _f32(r), dtype="bfloat16")


def test_auto_on_gpu_falls_back_for_float32_and_dense_masks():
    q, k, v, _ = _inputs(1, 128, 4, 2, 128)
    mask = ops.AttentionMask.self_attention(None, causal=True)
    assert ops.resolve_attention_impl("auto", q.astype(jnp.float32), k.astype(jnp.float32), mask) == "xla"
    with pytest.raises(ValueError, match="float32"):
        ops.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, impl="cudnn")
    dense = ops.AttentionMask(dense=mask.to_dense(128, 128))
    out = ops.attention(q, k, v, dense, impl="cudnn")  # a dense mask goes to cuDNN as an additive bias
    numerics.assert_close("cudnn.dense", _f32(out), _f32(attend(q, k, v, dense.dense)), dtype="bfloat16")
