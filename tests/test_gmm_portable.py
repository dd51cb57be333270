"""The portable grouped matmul (`ming_jax.pallas.gmm.portable`, implementation "portable", what "auto" runs on CPU
and GPU): forward and gradients against the per-group loop reference on random and skewed routing (empty experts,
one expert with every row or nearly every row, sizes cut at M), float32 and bfloat16, with and without the fused
permute; and a guard that "auto" on CPU never resolves to an implementation that densifies (rows x experts).

Tolerances: `ming_jax.parity.numerics.TOLERANCES` (relative max-abs 1e-4 float32, 2e-2 bfloat16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_vjp import glu_vjp, gmm_vjp

from ming_jax.parity import numerics
from ming_jax.pallas import gmm as G
from ming_jax.pallas.gmm import portable
from ming_jax.pallas.gmm.xla import gather_rows

M, D, F, E = 200, 64, 48, 6


def _f32(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32))


def _check(name, ours, ref, dtype):
    numerics.assert_close(name, _f32(ours), _f32(ref), dtype=dtype)


def _sizes(kind: str, e: int = E, m: int = M) -> np.ndarray:
    rng = np.random.default_rng(len(kind))
    if kind == "random":  # some zeros, total < M (padding rows at the end)
        s = rng.integers(0, 2 * m // e, size=e)
        s[1] = 0
        ends = np.minimum(np.cumsum(s), m - 7)
        return np.diff(np.concatenate([[0], ends])).astype(np.int32)
    s = np.zeros(e, np.int32)
    if kind == "empty":
        return s
    if kind == "one_takes_all":
        s[e // 2] = m
    elif kind == "nearly_all":
        s[0], s[-1] = 1, m - 3
    elif kind == "past_m":  # sizes summing past M are cut at M
        s[1], s[3] = m // 2, m
    elif kind == "singletons":
        s[:] = 1
        s[2] = m - e
    return s


KINDS = ["random", "empty", "one_takes_all", "nearly_all", "past_m", "singletons"]


def _inputs(dtype, seed=0, m=M):
    dt = jnp.dtype(dtype)
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (m, D), jnp.float32).astype(dt)
    w_gate = (jax.random.normal(k[1], (E, D, F)) / np.sqrt(D)).astype(dt)
    w_up = (jax.random.normal(k[2], (E, D, F)) / np.sqrt(D)).astype(dt)
    w_down = (jax.random.normal(k[3], (E, F, D)) / np.sqrt(F)).astype(dt)
    d_h = jax.random.normal(k[4], (m, F), jnp.float32).astype(dt)
    d_y = jax.random.normal(k[5], (m, D), jnp.float32).astype(dt)
    return x, w_gate, w_up, w_down, d_h, d_y


@functools.cache
def _fns(tm):
    """(glu, glu_ref, down, down_ref): jitted forward + VJP; tm None: through api with implementation="portable"."""
    if tm is None:
        glu = functools.partial(G.gmm_glu, implementation="portable")
        down = functools.partial(G.gmm, implementation="portable")
    else:
        def glu(a, b, c, gs):
            return portable.gmm_glu(a, b, c, gs, None, tm)

        def down(a, b, gs):
            return portable.gmm(a, b, gs, a.dtype, tm)

    return glu_vjp(glu), glu_vjp(G.reference.gmm_glu), gmm_vjp(down), gmm_vjp(G.reference.gmm)


@pytest.mark.parametrize("tm", [None, 16, 64], ids=lambda t: f"tm{t}")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_portable_matches_reference(kind, dtype, tm):
    """tm 16 / 64: several chunks per expert and a last chunk shifted back to end at row M (200 = 12 * 16 + 8)."""
    glu, glu_ref, down, down_ref = _fns(tm)
    x, wg, wu, wd, d_h, d_y = _inputs(dtype)
    sizes = _sizes(kind)
    gs = jnp.asarray(sizes)
    used = int(min(sizes.sum(), M))

    h, (dx, dwg, dwu) = glu(x, wg, wu, gs, d_h)
    h_ref, grads_ref = glu_ref(x, wg, wu, gs, d_h)
    assert h.dtype == x.dtype and dx.dtype == x.dtype and dwg.dtype == wg.dtype
    for name, ours, ref in zip(("h", "dx", "dw_gate", "dw_up"), (h, dx, dwg, dwu), (h_ref,) + tuple(grads_ref)):
        _check(f"{kind}.{dtype}.glu.{name}", ours, ref, dtype)

    y, (dh, dwd) = down(h_ref, wd, gs, d_y)
    y_ref, (dh_ref, dwd_ref) = down_ref(h_ref, wd, gs, d_y)
    for name, ours, ref in (("y", y, y_ref), ("dlhs", dh, dh_ref), ("drhs", dwd, dwd_ref)):
        _check(f"{kind}.{dtype}.gmm.{name}", ours, ref, dtype)

    for name, arr in (("h", h), ("y", y), ("dx", dx), ("dlhs", dh)):  # padding rows are exact zeros
        assert not np.any(_f32(arr)[used:]), f"{kind}: {name} has non-zero padding rows past {used}"
    cut = np.diff(np.minimum(np.cumsum(np.concatenate([[0], sizes])), M))
    for name, arr in (("dw_gate", dwg), ("dw_up", dwu), ("drhs", dwd)):  # empty experts: exact zero gradients
        assert not np.any(_f32(arr)[cut == 0]), f"{kind}: {name} non-zero for an empty expert"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["routed", "skewed", "empty"])
def test_portable_fused_permute_matches_gather_then_reference(kind, dtype):
    """rows= (the permute in the tile loads, d_x scatter-added onto the tokens) == reference on x[rows]."""
    t = 37
    rng = np.random.default_rng(3)
    x, wg, wu, wd, d_h, d_y = _inputs(dtype, seed=5, m=t)
    d_h = jax.random.normal(jax.random.key(9), (M, F), jnp.float32).astype(dtype)
    if kind == "routed":  # every token several times, sorted by a random expert assignment
        rows = rng.integers(0, t, size=M)
        sizes = np.bincount(rng.integers(0, E, size=M), minlength=E)
    elif kind == "skewed":
        rows = np.concatenate([rng.integers(0, t, size=M - 8), [t + 5] * 4, [-3] * 4])  # out of range: clamped
        sizes = np.zeros(E, np.int64)
        sizes[4], sizes[0] = M - 2, 1
    else:
        rows = rng.integers(0, t, size=M)
        sizes = np.zeros(E, np.int64)
    rows, gs = jnp.asarray(rows, jnp.int32), jnp.asarray(sizes, jnp.int32)

    def fused(a, b, c):
        return G.gmm_glu(a, b, c, gs, rows=rows, implementation="portable")

    def ref(a, b, c):
        return G.reference.gmm_glu(gather_rows(a, rows), b, c, gs)

    h, pb = jax.vjp(fused, x, wg, wu)
    h_ref, pb_ref = jax.vjp(ref, x, wg, wu)
    grads, grads_ref = pb(d_h.astype(h.dtype)), pb_ref(d_h.astype(h_ref.dtype))
    assert h.shape == (M, F) and grads[0].shape == x.shape and grads[0].dtype == x.dtype
    for name, ours, want in zip(("h", "dx", "dw_gate", "dw_up"), (h,) + tuple(grads), (h_ref,) + tuple(grads_ref)):
        _check(f"fused.{kind}.{dtype}.{name}", ours, want, dtype)

    # The expert FFN through api.grouped_glu (the MoE block's call), forward and gradients.
    def ffn(fn_impl):
        def loss(a, b, c, d):
            out = G.grouped_glu(a, gs, b, c, d, rows=rows, implementation=fn_impl) if fn_impl else \
                G.reference.grouped_glu(gather_rows(a, rows), gs, b, c, d)
            return jnp.vdot(out.astype(jnp.float32), jnp.ones_like(out, jnp.float32)), out
        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, wg, wu, wd)

    (g_ours, y_ours), (g_ref, y_ref) = ffn("portable"), ffn(None)
    _check(f"ffn.{kind}.{dtype}.y", y_ours, y_ref, dtype)
    for name, ours, want in zip(("dx", "dw_gate", "dw_up", "dw_down"), g_ours, g_ref):
        _check(f"ffn.{kind}.{dtype}.{name}", ours, want, dtype)


# ------------------------------------------------------------------------------------------ "auto" does not densify


def _compiled_ffn(impl, m, t, d, f, e, grad):
    dt = jnp.float32
    args = (jax.ShapeDtypeStruct((t, d), dt), jax.ShapeDtypeStruct((e,), jnp.int32),
            jax.ShapeDtypeStruct((e, d, f), dt), jax.ShapeDtypeStruct((e, d, f), dt),
            jax.ShapeDtypeStruct((e, f, d), dt), jax.ShapeDtypeStruct((m,), jnp.int32))

    def ffn(x, gs, wg, wu, wd, rows):
        return G.grouped_glu(x, gs, wg, wu, wd, rows=rows, implementation=impl)

    if grad:
        def fn(x, gs, wg, wu, wd, rows):
            return jax.grad(lambda *w: jnp.sum(ffn(w[0], gs, *w[1:], rows)), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    else:
        fn = ffn
    return jax.jit(fn).lower(*args).compile(), args


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_auto_on_cpu_does_not_densify(grad):
    """At 1024 tokens x top-8 of 64 experts (d 256, f 128, float32), "auto" lowered for CPU must keep its compiled
    temporaries within twice the sorted rows x (d + f) (the weight gradients are outputs, not temporaries):
    ragged_dot's dense CPU lowering needs rows x experts x width and is shown to fail the same bound."""
    t, k, e, d, f = 1024, 8, 64, 256, 128
    m = t * k
    itemsize = 4
    bound = 2 * m * (d + f) * itemsize  # 24 MiB; measured 2026-12-01: auto 4.5 / 8.8 MiB, xla 540 / 2324 MiB
    compiled, _ = _compiled_ffn("auto", m, t, d, f, e, grad)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= bound, f"auto on CPU: {temp / 2**20:.1f} MiB temporaries > {bound / 2**20:.1f} MiB: densifying?"
    dense, _ = _compiled_ffn("xla", m, t, d, f, e, grad)  # the guard discriminates: the dense lowering fails it
    assert dense.memory_analysis().temp_size_in_bytes > bound


def test_auto_lowers_to_portable_on_cpu():
    args = (jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((4, 32, 16), jnp.float32),
            jax.ShapeDtypeStruct((4, 32, 16), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32))
    text = jax.jit(lambda *a: G.gmm_glu(*a)).lower(*args).as_text()
    assert "ragged_dot" not in text and "tpu_custom_call" not in text
    assert "while" in text
    assert "portable" in G.IMPLEMENTATIONS and "xla" in G.IMPLEMENTATIONS
