"""Attention kernels and backend dispatch (ming_jax.pallas.attention, ming_jax.pallas.attention.api).

* Splash attention run by the Pallas interpreter on CPU against `attend` (the project's reference) on fresh random
  inputs: forward and gradients, causal / packed segments / padding / GQA and MQA without repeated KV heads / the
  ViT's block-diagonal mask / lengths that are not tile multiples, float32 and bfloat16, tolerances from
  `ming_jax.parity.numerics`. Segment layouts are traced arguments, so hypothesis examples re-run one compiled program.
* The dispatcher: what "auto" and forced choices resolve to, errors for what a backend cannot express, the model
  running on splash, packed sequences in the model, the grouped-matmul entries.
* Ahead-of-time Mosaic compiles of the attention forward + backward for one v5p and one v6e chip at Ling-flash
  shapes (32 query heads, 4 KV heads, head 128, bf16) at S = 4096 and 32768 (skipped only without libtpu).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tpu_compile import need_libtpu
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend import core as jex_core

from ming_jax.models import llm as model_lib
from ming_jax.parity import numerics
from ming_jax.pallas.attention import api as ops
from ming_jax.config.base import ConfigError
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import ATTENTION_IMPLEMENTATIONS, Runtime
from ming_jax.pallas.attention.reference import attend, causal_mask, segment_mask
from ming_jax.pallas import gmm
from ming_jax.pallas import attention as pa


def _f32(x) -> np.ndarray:
    # numerics.compare treats bfloat16 (not a numpy floating type) as exact integers: hand it float32.
    return np.asarray(jnp.asarray(x, jnp.float32))


def _check(name, ours, ref, dtype):
    numerics.assert_close(name, _f32(ours), _f32(ref), dtype=dtype)


def _reference_mask(segments, causal: bool):
    """The mask `attend` gets, built from attention_core's own helpers (independent of the splash wiring)."""
    slots = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    mask = segment_mask(segments, segments)
    return mask & causal_mask(slots, slots) if causal else mask


def _loss_and_grads(fn):
    """(q, k, v, cotangent) -> (out, (dq, dk, dv)) of sum(fn(q, k, v) * cotangent)."""

    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))

    return run


# --------------------------------------------------------------------------------------- splash vs attend


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int  # query length = key length (self-attention, as every caller in the project)
    h: int
    kv: int
    hd: int
    causal: bool
    dtype: str
    layout: str  # "none" | "padding" | "packed" | "images"


CASES = [
    # Two q / kv tiles: causal block skipping; left padding in row 0, right padding in row 1; 2 query heads per KV.
    Case("causal_gqa_padding", b=2, t=256, h=4, kv=2, hd=128, causal=True, dtype="float32", layout="padding"),
    # T = 200 is no tile multiple (padded to 256 inside); 3 packed documents + padding; MQA (one KV head).
    Case("causal_mqa_packed_unaligned", b=1, t=200, h=4, kv=1, hd=128, causal=True, dtype="float32",
         layout="packed"),
    # The ViT: no causality, one segment per image / frame (block diagonal), MHA, 300 patches.
    Case("vit_block_diagonal", b=1, t=300, h=2, kv=2, hd=128, causal=False, dtype="float32", layout="images"),
    # The audio encoder: full attention, no mask at all, 150 frames (padding is the wiring's own).
    Case("audio_full_unaligned", b=2, t=150, h=2, kv=2, hd=128, causal=False, dtype="float32", layout="none"),
    # bf16 at the production layout: 8 query heads per KV head, causal + padding.
    Case("bf16_causal_gqa", b=1, t=256, h=8, kv=1, hd=128, causal=True, dtype="bfloat16", layout="padding"),
]


def _segments(case: Case) -> np.ndarray | None:
    t = case.t
    if case.layout == "none":
        return None
    if case.layout == "padding":  # row 0 left-padded by 37, row 1 right-padded by 90
        rows = [np.r_[np.zeros(37), np.ones(t - 37)], np.r_[np.ones(t - 90), np.zeros(90)]]
        return np.stack(rows[: case.b]).astype(np.int32)
    if case.layout == "packed":  # documents of 70, 1 and 100 tokens, then padding
        return np.r_[np.full(70, 1), [2], np.full(100, 3), np.zeros(t - 171)].astype(np.int32)[None]
    if case.layout == "images":  # three images of 64, 100 and 136 patches (as VisionLayout.segment_ids)
        return np.repeat(np.arange(3), [64, 100, 136]).astype(np.int32)[None]
    raise ValueError(case.layout)


def _inputs(case: Case, seed: int):
    dt = jnp.dtype(case.dtype)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k1, (case.b, case.t, case.h, case.hd), jnp.float32).astype(dt)
    k = jax.random.normal(k2, (case.b, case.t, case.kv, case.hd), jnp.float32).astype(dt)
    v = jax.random.normal(k3, (case.b, case.t, case.kv, case.hd), jnp.float32).astype(dt)
    ct = jax.random.normal(k4, q.shape, jnp.float32)
    return q, k, v, ct


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_splash_matches_attend(case):
    """Forward and all three gradients of the interpreted splash kernels against `attend` with the dense mask."""
    q, k, v, ct = _inputs(case, seed=len(case.name))
    seg = _segments(case)
    seg = None if seg is None else jnp.asarray(seg)

    def splash(q, k, v):
        return pa.splash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=case.causal,
                                   interpret=True)

    mask = None if seg is None else _reference_mask(seg, case.causal)
    assert seg is not None or not case.causal, "causal cases carry segment ids"
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731  the reference sees the same (rounded) inputs in float32

    def reference(q, k, v):
        return attend(f32(q), f32(k), f32(v), mask)

    out, grads = jax.jit(_loss_and_grads(splash))(q, k, v, ct)
    ref_out, ref_grads = jax.jit(_loss_and_grads(reference))(q, k, v, ct)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))  # dk / dv per KV head: no repeated heads
    _check(f"{case.name}.out", out, ref_out, case.dtype)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _check(f"{case.name}.{name}", g, r, case.dtype)


# Fixed shape, hypothesis-drawn segment layouts: one compile, many layouts.
_HYP = Case("hypothesis", b=2, t=256, h=4, kv=2, hd=128, causal=True, dtype="float32", layout="drawn")


@jax.jit
def _hyp_splash(q, k, v, seg, ct):
    return _loss_and_grads(lambda q, k, v: pa.splash_attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, interpret=True))(q, k, v, ct)


@jax.jit
def _hyp_reference(q, k, v, seg, ct):
    return _loss_and_grads(lambda q, k, v: attend(q, k, v, _reference_mask(seg, True)))(q, k, v, ct)


@st.composite
def _packed_row(draw, t: int):
    """Documents (ids 1, 2, ...) of drawn lengths, with padding (id 0) on the left or right."""
    lengths, used = [], 0
    while used < t and draw(st.booleans()) or not lengths:
        n = draw(st.integers(1, t - used))
        lengths.append(n)
        used += n
        if used == t:
            break
    ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    pad = np.zeros(t - used, np.int64)
    return np.r_[pad, ids] if draw(st.booleans()) else np.r_[ids, pad]


@given(rows=st.lists(_packed_row(_HYP.t), min_size=_HYP.b, max_size=_HYP.b), seed=st.integers(0, 2**16))
@settings(max_examples=8, deadline=None, derandomize=True)
def test_splash_matches_attend_on_drawn_segment_layouts(rows, seed):
    q, k, v, ct = _inputs(_HYP, seed)
    seg = jnp.asarray(np.stack(rows).astype(np.int32))
    out, grads = _hyp_splash(q, k, v, seg, ct)
    ref_out, ref_grads = _hyp_reference(q, k, v, seg, ct)
    _check("drawn.out", out, ref_out, "float32")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _check(f"drawn.{name}", g, r, "float32")


def test_interpret_mode_runs_the_pallas_kernels():
    """On jax 0.10.2 `interpret=True` executes the kernel bodies (pallas_call lowered by the HLO interpreter): the
    forward program holds the splash forward kernel and the gradient program the forward, dq and dkv kernels."""
    case = CASES[0]
    q, k, v, ct = _inputs(case, 0)
    seg = jnp.asarray(_segments(case))

    def splash(q, k, v):
        return pa.splash_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, interpret=True)

    def kernels(closed):
        found = []

        def walk(jp):
            for eqn in jp.eqns:
                if eqn.primitive.name == "pallas_call":
                    found.append(eqn)
                    continue
                for p in eqn.params.values():
                    for sub in p if isinstance(p, (tuple, list)) else (p,):
                        if isinstance(sub, jex_core.ClosedJaxpr):
                            walk(sub.jaxpr)
                        elif isinstance(sub, jex_core.Jaxpr):
                            walk(sub)

        walk(closed.jaxpr)
        return found

    fwd = kernels(jax.make_jaxpr(splash)(q, k, v))
    bwd = kernels(jax.make_jaxpr(_loss_and_grads(splash))(q, k, v, ct))
    assert len(fwd) == 1 and len(bwd) == 3, (len(fwd), len(bwd))
    assert all(e.params["interpret"] for e in fwd + bwd)
    text = jax.jit(splash).lower(q, k, v).as_text()
    assert "tpu_custom_call" not in text  # interpreted into plain HLO loops, not handed to Mosaic


def test_splash_rejects_bad_input():
    q = jnp.zeros((1, 128, 4, 128))
    k = jnp.zeros((1, 128, 3, 128))
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        pa.splash_attention(q, k, k, interpret=True)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        pa.splash_attention(q, jnp.zeros((1, 256, 2, 128)), jnp.zeros((1, 256, 2, 128)), causal=True, interpret=True)
    seg = jnp.zeros((1, 128), jnp.int32)
    with pytest.raises(ValueError, match="both"):
        pa.splash_attention(q, q, q, q_segment_ids=seg, interpret=True)
    with pytest.raises(ValueError, match="shape"):
        pa.splash_attention(q, q, q, q_segment_ids=seg[:, :5], kv_segment_ids=seg, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        pa.BlockSizes(block_q=100)
    assert pa.get_default(4096, 4096).block_q == 512 and pa.get_default(200, 300).block_kv == 128


# --------------------------------------------------------------------------------------- dispatch


def _qkv(b=1, t=40, h=4, kv=2, hd=128, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    return (jax.random.normal(k1, (b, t, h, hd), dtype), jax.random.normal(k2, (b, t, kv, hd), dtype),
            jax.random.normal(k3, (b, t, kv, hd), dtype))


def test_dispatch_resolution_on_cpu():
    q, k, v = _qkv()
    seg = jnp.ones((1, 40), jnp.int32)
    structured = ops.AttentionMask.self_attention(seg, causal=True)
    dense = ops.AttentionMask(dense=structured.to_dense(40, 40))
    assert jax.default_backend() == "cpu"
    # auto: the kernel when lowered for TPU, the reference when lowered for CPU; dense masks always the reference.
    assert ops.resolve_attention_impl("auto", q, k, structured) == "tpu_else_xla"
    assert ops.resolve_attention_impl("auto", q, k, None) == "tpu_else_xla"
    assert ops.resolve_attention_impl("auto", q, k, dense) == "xla"
    assert ops.resolve_attention_impl("auto", q[..., :64], k[..., :64], structured) == "xla"  # head dim 64
    for forced in ("xla", "splash", "cudnn"):
        assert ops.resolve_attention_impl(forced, q, k, structured) == forced
    with pytest.raises(ValueError, match="known"):
        ops.resolve_attention_impl("flash", q, k, structured)
    with pytest.raises(ValueError, match="GPU backend"):
        ops.attention(q, k, v, structured, impl="cudnn")
    with pytest.raises(ValueError, match="dense mask"):
        ops.attention(q, k, v, dense, impl="splash")
    with pytest.raises(ValueError, match="both"):
        ops.attention(q, k, v, ops.AttentionMask(q_segment_ids=seg), impl="xla")
    # Lowered for CPU, auto holds no Mosaic kernel and equals the reference.
    text = jax.jit(lambda q, k, v: ops.attention(q, k, v, structured)).lower(q, k, v).as_text()
    assert "tpu_custom_call" not in text
    _check("auto_cpu", ops.attention(q, k, v, structured), attend(q, k, v, structured.to_dense(40, 40)), "float32")


def test_forced_splash_through_dispatch_matches_xla():
    q, k, v = _qkv(b=2, t=40)
    seg = jnp.asarray(np.stack([np.r_[np.zeros(9), np.ones(31)], np.r_[np.ones(20), np.full(20, 2)]]), jnp.int32)
    mask = ops.AttentionMask.self_attention(seg, causal=True)
    _check("dispatch_splash", ops.attention(q, k, v, mask, impl="splash"), ops.attention(q, k, v, mask, impl="xla"),
           "float32")


def test_pad_head_dim_lets_splash_take_head_dim_72():
    """The ViT's head dim 72: refused by splash as is; with `pad_head_dim=True` "auto" picks the kernel (when lowered
    for TPU) and a forced splash (interpreted) zero-pads q, k, v to 128 lanes and equals the reference at hd**-0.5."""
    q, k, v = _qkv(b=2, t=40, h=2, kv=2, hd=72)
    seg = jnp.asarray(np.stack([np.r_[np.ones(24), np.full(16, 2)], np.ones(40)]), jnp.int32)
    mask = ops.AttentionMask.self_attention(seg, causal=False)
    assert ops.resolve_attention_impl("auto", q, k, mask) == "xla"
    assert ops.resolve_attention_impl("auto", q, k, mask, pad_head_dim=True) == "tpu_else_xla"
    with pytest.raises(ValueError, match="head dim 72"):
        ops.attention(q, k, v, mask, impl="splash")
    ours = ops.attention(q, k, v, mask, impl="splash", pad_head_dim=True)
    assert ours.shape == q.shape
    _check("splash_hd72", ours, ops.attention(q, k, v, mask, impl="xla"), "float32")
    _check("splash_hd72_scale", ops.attention(q, k, v, None, impl="splash", pad_head_dim=True, scale=0.3),
           attend(q, k, v, scale=0.3), "float32")


def test_runtime_attention_validated():
    assert Runtime().attention == "auto"
    assert Runtime(attention="splash").attention == "splash"
    assert ops.IMPLEMENTATIONS == ATTENTION_IMPLEMENTATIONS  # one vocabulary: the runtime's is the dispatcher's
    with pytest.raises(ConfigError, match="attention='flash'"):
        Runtime(attention="flash")


def _tiny_model(impl: str):
    cfg = LLMConfig.tiny(num_layers=1)  # one dense layer: the attention wiring is the subject
    return model_lib.create(cfg, Runtime(attention=impl), seed=3)


def test_model_on_splash_matches_model_on_xla():
    """The model calls only the dispatcher: forcing splash (interpreted here) gives the reference's logits, padding
    rows included (both implement causal + segment ids, padding = segment 0)."""
    b, t = 2, 24
    x = jax.random.normal(jax.random.key(1), (b, t, 128), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (3, b, t))
    am = jnp.asarray(np.stack([np.r_[np.zeros(5), np.ones(t - 5)], np.ones(t)]), bool)
    run = nnx.jit(lambda m, x, pos, am: m(x, pos, attention_mask=am).logits)
    logits = {impl: run(_tiny_model(impl), x, pos, am) for impl in ("xla", "splash")}
    _check("model.logits", logits["splash"], logits["xla"], "float32")


def test_model_packed_segments_equal_separate_sequences():
    """Two documents packed in one row (segment ids 1, 2; positions restarting) give each document's own logits."""
    m = _tiny_model("xla")
    la, lb = 7, 9
    run = nnx.jit(lambda m, x, pos, am: m(x, pos, attention_mask=am).logits)
    x = jax.random.normal(jax.random.key(2), (1, la + lb, 128), jnp.float32)
    pos = jnp.r_[jnp.arange(la), jnp.arange(lb)]
    packed = run(m, x, jnp.broadcast_to(pos, (3, 1, la + lb)),
                 jnp.asarray(np.r_[np.ones(la), np.full(lb, 2)], jnp.int32)[None])
    alone_a = run(m, x[:, :la], jnp.broadcast_to(jnp.arange(la), (3, 1, la)), jnp.ones((1, la), bool))
    alone_b = run(m, x[:, la:], jnp.broadcast_to(jnp.arange(lb), (3, 1, lb)), jnp.ones((1, lb), bool))
    _check("packed.doc_a", packed[:, :la], alone_a, "float32")
    _check("packed.doc_b", packed[:, la:], alone_b, "float32")


def test_grouped_matmul_entries_forward():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(5), 4)
    m, d, f, e = 24, 16, 8, 3
    xs = jax.random.normal(k1, (m, d))
    wg, wu = jax.random.normal(k2, (e, d, f)), jax.random.normal(k3, (e, d, f))
    wd = jax.random.normal(k4, (e, f, d))
    sizes = jnp.asarray([10, 0, 14], jnp.int32)
    _check("glu", gmm.grouped_glu(xs, sizes, wg, wu, wd, implementation="xla"),
           gmm.reference.grouped_glu(xs, sizes, wg, wu, wd), "float32")
    rows = np.repeat(np.arange(e), np.asarray(sizes))
    want = np.einsum("md,mdf->mf", np.asarray(xs), np.asarray(wg)[rows])
    _check("gmm", gmm.gmm(xs, wg, sizes, implementation="xla"), want, "float32")
    with pytest.raises(ValueError, match="implementation must be one of"):
        gmm.grouped_glu(xs, sizes, wg, wu, wd, implementation="cuda")


# --------------------------------------------------------------------------------------- TPU ahead-of-time

LING_FLASH = dict(h=32, kv=4, hd=128)


_need_libtpu = need_libtpu


def _tpu_abstract(topology: str, shapes):
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    one_chip = NamedSharding(Mesh(np.array(topo.devices[:1]), ("chip",)), PartitionSpec())
    return [jax.ShapeDtypeStruct(s, dt, sharding=one_chip) for s, dt in shapes]


def attention_train_step(q, k, v, segment_ids, d_out):
    """Gradients of sum(attention(q, k, v) * d_out) through the dispatcher, causal + segment ids, impl "auto"."""
    mask = ops.AttentionMask.self_attention(segment_ids, causal=True)

    def loss(q, k, v):
        return jnp.sum(ops.attention(q, k, v, mask).astype(jnp.float32) * d_out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("topology,seq", [("v5p:2x2x1", 4096), ("v6e:2x2", 32768)])
def test_tpu_aot_compile_ling_flash_attention(topology, seq):
    """Forward + backward at Ling-flash attention shapes, Mosaic-compiled for one chip: "auto" lowers to the three
    splash kernels (fwd, dq, dkv), and no [T, S] array is ever materialised in HBM."""
    _need_libtpu()
    h, kv, hd = LING_FLASH["h"], LING_FLASH["kv"], LING_FLASH["hd"]
    bf16 = jnp.bfloat16
    shapes = [((1, seq, h, hd), bf16), ((1, seq, kv, hd), bf16), ((1, seq, kv, hd), bf16), ((1, seq), jnp.int32),
              ((1, seq, h, hd), bf16)]
    lowered = jax.jit(attention_train_step).lower(*_tpu_abstract(topology, shapes))
    kernels = re.findall(r"custom_call @tpu_custom_call", lowered.as_text())
    assert len(kernels) == 3, f"expected the splash fwd, dq and dkv kernels, lowered {len(kernels)}"
    compiled = lowered.compile()

    mem = compiled.memory_analysis()
    nbytes = lambda s, dt: int(np.prod(s)) * jnp.dtype(dt).itemsize  # noqa: E731
    args = sum(nbytes(s, dt) for s, dt in shapes)
    assert mem.argument_size_in_bytes == args
    grads = sum(nbytes(s, dt) for s, dt in shapes[:3])  # dq, dk, dv: dk / dv per KV head, no repeated heads
    assert abs(mem.output_size_in_bytes - grads) < (1 << 20)
    q_bytes = nbytes(*shapes[0])
    # Temporaries: head-major copies of q, out, d_out, dq and splash's float32 softmax statistics ([H, T, 128]
    # lanes): a few q sizes, linear in T; the dense float32 logits [H, T, S] would be 2 GiB at 4096, 128 GiB at 32768.
    assert mem.temp_size_in_bytes <= 8 * q_bytes, f"temp {mem.temp_size_in_bytes / 2**20:.0f} MiB"
    assert mem.temp_size_in_bytes < h * seq * seq * 4 / 8
    cost = compiled.cost_analysis()
    assert np.isfinite(cost["bytes accessed"]) and cost["bytes accessed"] > 0


def test_tpu_aot_compile_attention_under_a_mesh():
    """Under `sharding.use_mesh` (4 v5p chips, fsdp=2 x tensor=2, "fsdp_tp" rules) splash runs in a shard_map:
    batch over fsdp, heads over tensor; the Mosaic kernels compile with no gathered (replicated) operands."""
    _need_libtpu()
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec

    from ming_jax import sharding

    devices = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices
    mesh = sharding.make_mesh("fsdp=2,tensor=2", devices)
    rules = sharding.ShardingRules.preset("fsdp_tp")
    b, seq, bf16 = 2, 4096, jnp.bfloat16
    h, kv, hd = LING_FLASH["h"], LING_FLASH["kv"], LING_FLASH["hd"]
    heads = NamedSharding(mesh, PartitionSpec("fsdp", None, "tensor", None))
    rows = NamedSharding(mesh, PartitionSpec("fsdp", None))
    args = [jax.ShapeDtypeStruct((b, seq, h, hd), bf16, sharding=heads),
            jax.ShapeDtypeStruct((b, seq, kv, hd), bf16, sharding=heads),
            jax.ShapeDtypeStruct((b, seq, kv, hd), bf16, sharding=heads),
            jax.ShapeDtypeStruct((b, seq), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((b, seq, h, hd), bf16, sharding=heads)]
    with sharding.use_mesh(mesh, rules):
        lowered = jax.jit(attention_train_step).lower(*args)
    text = lowered.as_text()
    assert len(re.findall(r"custom_call @tpu_custom_call", text)) == 3
    assert "shard_map" in text or "sdy.manual_computation" in text
    compiled = lowered.compile()
    assert "all-gather" not in compiled.as_text()  # every operand already lives where its shard computes
    mem = compiled.memory_analysis()
    per_chip = sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in args)
    assert mem.argument_size_in_bytes == per_chip  # q / k / v / d_out: a quarter each (segment ids: a half)
