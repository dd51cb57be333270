"""Quantized weights in the grouped matmuls (`ming_jax.pallas.gmm` with `qwix.QArray` weights, `quant.py`).

The quantization arithmetic (numpy and jax give the same bytes; qwix dequantizes our QArrays as we do); every
backend (portable, qwix.ragged_dot, the Pallas kernels in the generic and the TPU interpreter) against the
per-group reference on the dequantised weights, int8 and fp8, per-channel and sub-channel scales, the fused permute
and the input gradient; bad quantized weights; and the TPU compiler (Mosaic) on the quantized kernels: they
compile for v5e and v6e, and at decode size the int8 expert FFN's compiled bytes accessed are <= 0.55x of bf16.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from jax.experimental.pallas import tpu as pltpu
from tpu_compile import need_libtpu

from ming_jax.pallas import gmm as G
from ming_jax.pallas.gmm import quant as Q
from ming_jax.parity import numerics

M, D, F, E = 200, 256, 256, 6
SIZES = np.array([30, 0, 90, 0, 41, 20], np.int32)  # sum 181 < 200: padding rows, empty experts
TILES = {None: G.BlockSizes(64, 128, 128), 128: G.BlockSizes(64, 256, 128)}  # tk: all of D / a multiple of 8 x block


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


@functools.cache
def _weights(qtype: str, block):
    k = jax.random.split(jax.random.key(7), 3)
    ws = [jax.random.normal(k[0], (E, D, F)) / 16, jax.random.normal(k[1], (E, D, F)) / 16,
          jax.random.normal(k[2], (E, F, D)) / 16]
    return [Q.quantize(w, qtype, (1,), block) for w in ws]


def _x(dtype, m=M):
    return jax.random.normal(jax.random.key(3), (m, D), jnp.float32).astype(dtype)


# --------------------------------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("qtype", Q.QTYPES)
@pytest.mark.parametrize("block", [None, 64])
def test_quantize_numpy_and_jax_agree_and_qwix_dequantizes_the_same(qtype, block):
    w = np.random.default_rng(0).standard_normal((3, 256, 40)).astype(np.float32)
    w[1, :, 5] = 0.0  # an all-zero channel: scale 1, values 0
    a, b = Q.quantize(w, qtype, (1,), block), jax.jit(lambda v: Q.quantize(v, qtype, (1,), block))(w)
    assert a.qvalue.dtype == Q.QDTYPES[qtype] and a.scale.dtype == np.float32
    assert a.scale.shape == (3, 1 if block is None else 256 // block, 40)
    assert np.array_equal(np.asarray(b.qvalue).view(np.uint8), a.qvalue.view(np.uint8))
    assert np.array_equal(np.asarray(b.scale), a.scale)
    assert not np.any(Q.dequantize(a)[1, :, 5])
    np.testing.assert_allclose(np.asarray(qwix.dequantize(b)), Q.dequantize(a), rtol=1e-6, atol=1e-7)
    rel = np.linalg.norm(Q.dequantize(a) - w) / np.linalg.norm(w)
    assert rel < (0.01 if qtype == "int8" else 0.04), rel  # int8 ~0.7%, e4m3 ~2.6% on Gaussian weights


def test_scale_shapes_and_bad_weights_name_the_problem():
    assert Q.scale_shape((4, 256, 8), (1,), 128) == (4, 2, 8)
    assert Q.scale_shape((4, 96, 8), (1,), 128) == (4, 1, 8)  # block >= dim: per channel
    assert Q.scale_shape((4, 100, 8), (1,), 64) == (4, 1, 8)  # not a divisor: per channel
    q = Q.quantize(np.ones((2, 128, 16), np.float32), "int8", (2,))  # scale along N: not a gmm layout
    with pytest.raises(ValueError, match=r"must be \[G, 1, N\]"):
        G.gmm(jnp.ones((8, 128)), q, jnp.array([4, 4], jnp.int32))
    w = Q.quantize(np.ones((2, 128, 16), np.float32), "int8", (1,))
    with pytest.raises(ValueError, match="either all quantized or none"):
        G.gmm_glu(jnp.ones((8, 128)), w, jnp.ones((2, 128, 16)), jnp.array([4, 4], jnp.int32))
    with pytest.raises(ValueError, match="quantization 'int4'"):
        Q.quantize(np.ones((4, 4), np.float32), "int4", (0,))


# --------------------------------------------------------------------------------------------------- backends


def _check(name, ours, ref, dtype):
    numerics.assert_close(name, _f32(ours), _f32(ref), dtype=dtype)


BACKENDS = [("portable", None), ("xla", None), ("pallas", True)]


@pytest.mark.parametrize("dtype, qtype, block", [("float32", "int8", None), ("bfloat16", "fp8", 128)])
def test_every_backend_matches_the_reference_on_dequantised_weights(dtype, qtype, block):
    """The expert FFN (gate/up + SiLU with the fused permute, down), h and d_x (summed onto the tokens), each
    backend against the reference on the dequantised weights (relative max-abs: 1e-4 float32, 2e-2 bfloat16);
    padding rows of h are exactly zero. Per-channel int8 runs the epilogue scales, fp8 with 128-row blocks the
    in-tile dequantisation."""
    qg, qu, qd = _weights(qtype, block)
    wg, wu, wd = (Q.dequantize(q).astype(dtype) for q in (qg, qu, qd))
    t = 50  # unsorted tokens; the M sorted rows gather them (the MoE block's fused permute)
    x, gs = _x(dtype, t), jnp.asarray(SIZES)
    rows = jnp.asarray(np.random.default_rng(2).integers(0, t, M), jnp.int32)

    def run(glu, down):
        def loss(a):
            h = glu(a)
            y = down(h)
            return jnp.sum(y.astype(jnp.float32) ** 2), (h, y)

        return jax.jit(jax.grad(loss, has_aux=True))(x)

    ref_dx, (ref_h, ref_y) = run(lambda a: G.reference.gmm_glu(G.gather_rows(a, rows), wg, wu, gs),
                                 lambda h: G.reference.gmm(h, wd, gs))
    for impl, interp in BACKENDS:
        kw = dict(implementation=impl, interpret=interp)
        tiles = TILES[block] if impl == "pallas" else None
        dx, (h, y) = run(lambda a: G.gmm_glu(a, qg, qu, gs, rows=rows, tiling=tiles, **kw),
                         lambda h: G.gmm(h, qd, gs, **kw))
        _check(f"{impl}.h", h, ref_h, dtype)
        _check(f"{impl}.y", y, ref_y, dtype)
        _check(f"{impl}.dx", dx, ref_dx, dtype)
        assert not np.any(_f32(h)[SIZES.sum():]), f"{impl}: padding rows of h are not zero"


def test_pallas_quantized_kernels_under_tpu_memory_semantics():
    """The TPU interpreter (uninitialised VMEM and overhanging blocks read NaN): per-channel scales in the epilogue
    (forward) and in-tile dequantisation (the transposed d_x kernel); padding, an empty expert, straddled tiles."""
    qg, qu, qd = (Q.QArray(q.qvalue[:3], q.scale[:3], None, q.qtype) for q in _weights("int8", None))  # 3 experts
    wg, wu, wd = (Q.dequantize(q) for q in (qg, qu, qd))
    params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
    x = _x(jnp.float32, 72)
    gs = jnp.asarray([20, 0, 41], jnp.int32)  # 61 of 72 rows
    tiles = G.BlockSizes(32, 128, 128)
    h, pull = jax.vjp(lambda a: G.gmm_glu(a, qg, qu, gs, tiling=tiles, interpret=params), x)
    h_ref, pull_ref = jax.vjp(lambda a: G.reference.gmm_glu(a, wg, wu, gs), x)
    d_h = jax.random.normal(jax.random.key(5), h.shape)
    _check("tpu_interp.h", h, h_ref, "float32")
    _check("tpu_interp.dx", pull(d_h)[0], pull_ref(d_h)[0], "float32")
    assert not np.any(np.isnan(_f32(h))) and not np.any(_f32(h)[61:])
    y = G.gmm(h_ref, qd, gs, interpret=params, tiling=G.BlockSizes(32, 256, 128))
    _check("tpu_interp.y", y, G.reference.gmm(h_ref, wd, gs), "float32")


# --------------------------------------------------------------------------------------------------- TPU compiler


def _tpu_args(topology, shapes):
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    one = NamedSharding(Mesh(np.array(topo.devices[:1]), ("chip",)), PartitionSpec())
    return [jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), x) for x in shapes]


def _ffn_weights(e, d, f, weights: str):
    """Abstract [E, D, F] / [E, F, D] expert stacks: bf16, or QArrays (int8 / fp8, per channel or block 128)."""
    if weights == "bf16":
        return [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((e, d, f), (e, d, f), (e, f, d))]
    qtype, _, block = weights.partition(":")
    out = []
    for s in ((e, d, f), (e, d, f), (e, f, d)):
        sc = (s[0], 1 if not block else s[1] // int(block), s[2])
        out.append(Q.QArray(jax.ShapeDtypeStruct(s, Q.QDTYPES[qtype]), jax.ShapeDtypeStruct(sc, jnp.float32), None,
                            Q.QDTYPES[qtype]))
    return out


def _compile_ffn(topology, m, e, weights, grad=False):
    d, f = 4096, 1024  # Ling-flash's d_model and expert width

    def ffn(x, gs, wg, wu, wd):
        return G.grouped_glu(x, gs, wg, wu, wd)

    fn = jax.grad(lambda x, *a: jnp.sum(ffn(x, *a).astype(jnp.float32))) if grad else ffn
    args = _tpu_args(topology, [jax.ShapeDtypeStruct((m, d), jnp.bfloat16), jax.ShapeDtypeStruct((e,), jnp.int32),
                                *_ffn_weights(e, d, f, weights)])
    lowered = jax.jit(fn).lower(*args)
    return lowered, lowered.compile()


@pytest.mark.parametrize("topology, variants", [("v5e:2x2", ("bf16", "int8")), ("v6e:2x2", ("int8", "fp8:128"))])
def test_tpu_compile_quantized_kernels_and_decode_bytes(topology, variants):
    """Mosaic compiles the int8 / fp8 kernels; at decode size (256 rows: 32 tokens x top-8 over the 32 local experts
    of an 8-way expert-parallel Ling-flash layer) the int8 FFN's compiled bytes accessed are <= 0.55x of bf16
    (weights dominate: 1 byte instead of 2, plus float32 scales per output channel); with v5e also the d_x kernels
    (transposed, in-tile dequantisation)."""
    need_libtpu()
    m, e = 256, 32
    by = {}
    for weights in variants:
        lowered, compiled = _compile_ffn(topology, m, e, weights)
        names = re.findall(r"ming_gmm\w*", lowered.as_text())
        assert names and all(n.endswith("_q") == (weights != "bf16") for n in names), (weights, names)
        by[weights] = compiled.cost_analysis()["bytes accessed"]
    weight_bytes = 3 * e * 4096 * 1024  # elements of the three stacks
    assert by["int8"] <= 1.1 * weight_bytes, by  # 1 byte each + scales + activations
    if "bf16" in by:
        assert by["bf16"] >= 2 * weight_bytes
        assert by["int8"] <= 0.55 * by["bf16"], by
        _compile_ffn(topology, m, e, "int8", grad=True)
    if "fp8:128" in by:
        assert by["fp8:128"] <= 1.15 * weight_bytes, by  # + 4 bytes per 128-row block of each output channel
