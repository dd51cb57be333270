"""Grouped-matmul kernels (ming_jax.pallas.gmm): schedule invariants, interpret-mode forward and VJP against the
per-group reference on hypothesis-drawn group sizes, the XLA fallback, bad input, and (when libtpu is installed)
ahead-of-time TPU compiles at full Ling-flash shapes.

Shapes are fixed per configuration and group sizes are traced arguments, so each configuration compiles once and
every hypothesis example only re-runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gmm_vjp import glu_vjp, gmm_vjp
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu
from tpu_compile import need_libtpu

from ming_jax.parity import numerics
from ming_jax.pallas import gmm as G
from ming_jax.pallas.gmm import metadata
from ming_jax.pallas.gmm.xla import gather_rows

EXAMPLES = settings(max_examples=5, deadline=None, derandomize=True)


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel configuration: rows M, model dim D, expert dim F, experts E, dtype, tiles (None: defaults)."""

    name: str
    dtype: str
    m: int
    d: int
    f: int
    e: int
    tiles: G.BlockSizes | None
    out_f32: bool = False  # gmm with preferred_element_type=float32

    @property
    def tiling(self):
        return None if self.tiles is None else G.GmmTiling(self.tiles, self.tiles, self.tiles)


CASES = [
    # float32, several k and n tiles, M not divisible by tm (200 = 3 * 64 + 8).
    Case("f32_multitile", "float32", m=200, d=256, f=128, e=6, tiles=G.BlockSizes(64, 128, 128)),
    # bf16, nothing divides: K and N overhang their tiles too (192 / 160 with 128 tiles; 256 rows in 48-row tiles).
    Case("bf16_ragged_dims", "bfloat16", m=256, d=192, f=160, e=4, tiles=G.BlockSizes(48, 128, 128)),
    # bf16 with the default tiles and a float32 gmm output.
    Case("bf16_defaults", "bfloat16", m=128, d=128, f=256, e=8, tiles=None, out_f32=True),
]


def _f32(x) -> np.ndarray:
    # numerics.compare treats non-numpy-floating dtypes (bfloat16) as exact integers: hand it float32 views.
    return np.asarray(jnp.asarray(x, jnp.float32))


def _check(name, ours, ref, dtype) -> float:
    numerics.assert_close(name, _f32(ours), _f32(ref), dtype=dtype)
    return numerics.compare(name, _f32(ours), _f32(ref), dtype=dtype).rel


@st.composite
def group_sizes(draw, e: int, m: int) -> np.ndarray:
    """E sizes with sum <= M: zeros from the draw itself and from cutting the running sum at a drawn total."""
    raw = draw(st.lists(st.integers(0, m), min_size=e, max_size=e))
    total = draw(st.integers(0, m))
    ends = np.minimum(np.cumsum(raw), total)
    return np.diff(np.concatenate([[0], ends])).astype(np.int32)


def edge_sizes(e: int, m: int) -> list[np.ndarray]:
    """Hand-picked group sizes: all padding, one expert takes every row, one takes all but a few, first+last only."""
    cases = [np.zeros(e, np.int32)]
    one = np.zeros(e, np.int32)
    one[e // 2] = m
    cases.append(one)
    nearly = np.zeros(e, np.int32)
    nearly[-1], nearly[0] = m - 3, 1
    cases.append(nearly)
    ends = np.zeros(e, np.int32)
    ends[0], ends[-1] = m // 3, m // 3
    cases.append(ends)
    return cases


def _inputs(case: Case, seed: int):
    dt = jnp.dtype(case.dtype)
    k = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(k[0], (case.m, case.d), jnp.float32).astype(dt)
    w_gate = (jax.random.normal(k[1], (case.e, case.d, case.f)) / np.sqrt(case.d)).astype(dt)
    w_up = (jax.random.normal(k[2], (case.e, case.d, case.f)) / np.sqrt(case.d)).astype(dt)
    w_down = (jax.random.normal(k[3], (case.e, case.f, case.d)) / np.sqrt(case.f)).astype(dt)
    d_h = jax.random.normal(k[4], (case.m, case.f), jnp.float32).astype(dt)
    return x, w_gate, w_up, w_down, d_h


_glu_vjp, _gmm_vjp = glu_vjp, gmm_vjp


@functools.cache
def _compiled(case: Case, interpret):
    out_type = jnp.float32 if case.out_f32 else None
    kw = dict(tiling=case.tiling, interpret=interpret)
    glu = _glu_vjp(lambda x, a, b, gs: G.gmm_glu(x, a, b, gs, **kw))
    down = _gmm_vjp(lambda h, w, gs: G.gmm(h, w, gs, preferred_element_type=out_type, **kw))
    glu_ref = _glu_vjp(G.reference.gmm_glu)
    down_ref = _gmm_vjp(lambda h, w, gs: G.reference.gmm(h, w, gs, preferred_element_type=out_type))
    return glu, down, glu_ref, down_ref


def _check_case(case: Case, sizes: np.ndarray, seed: int, interpret=True) -> dict[str, float]:
    """Forward and VJP of gmm_glu and gmm (as the down projection) against the reference; returns rel errors."""
    glu, down, glu_ref, down_ref = _compiled(case, interpret)
    x, w_gate, w_up, w_down, d_h = _inputs(case, seed)
    gs = jnp.asarray(sizes, jnp.int32)
    rows = int(min(sizes.sum(), case.m))
    errs = {}

    h, (dx, dwg, dwu) = glu(x, w_gate, w_up, gs, d_h)
    h_ref, (dx_ref, dwg_ref, dwu_ref) = glu_ref(x, w_gate, w_up, gs, d_h)
    for name, ours, ref in (("h", h, h_ref), ("glu.dx", dx, dx_ref), ("glu.dw_gate", dwg, dwg_ref),
                            ("glu.dw_up", dwu, dwu_ref)):
        errs[name] = _check(f"{case.name}.{name}", ours, ref, case.dtype)

    d_y = jax.random.normal(jax.random.key(seed + 1), (case.m, case.d), jnp.float32)
    y, (dh, dwd) = down(h_ref, w_down, gs, d_y)
    y_ref, (dh_ref, dwd_ref) = down_ref(h_ref, w_down, gs, d_y)
    assert y.dtype == (jnp.float32 if case.out_f32 else jnp.dtype(case.dtype))
    for name, ours, ref in (("y", y, y_ref), ("gmm.dlhs", dh, dh_ref), ("gmm.drhs", dwd, dwd_ref)):
        errs[name] = _check(f"{case.name}.{name}", ours, ref, case.dtype)

    # Padding rows are exactly zero in outputs and input gradients (the kernel writes them itself).
    for name, arr in (("h", h), ("y", y), ("glu.dx", dx), ("gmm.dlhs", dh)):
        assert not np.any(_f32(arr)[rows:]), f"{case.name}: {name} has non-zero padding rows past {rows}"
    # Empty experts get exactly zero weight gradients.
    for name, arr in (("glu.dw_gate", dwg), ("gmm.drhs", dwd)):
        assert not np.any(_f32(arr)[sizes == 0]), f"{case.name}: {name} non-zero for an empty expert"
    return errs


# ------------------------------------------------------------------------------------------ schedule invariants


_schedule = jax.jit(metadata.make_schedule, static_argnames=("m", "tm", "tail_group", "visit_empty"))


@given(data=st.data(), m=st.sampled_from([1, 45, 200]), tm=st.sampled_from([16, 64]), e=st.sampled_from([1, 5]))
@settings(max_examples=30, deadline=None, derandomize=True)
def test_schedule_covers_every_row_once(data, m, tm, e):
    sizes = data.draw(group_sizes(e, m))
    for tail, empty in ((True, False), (False, True)):
        s = _schedule(jnp.asarray(sizes), m=m, tm=tm, tail_group=tail, visit_empty=empty)
        n = int(s.num_steps)
        offsets, gids, tids = (np.asarray(a) for a in (s.offsets, s.group_ids[:n], s.tile_ids[:n]))
        assert n <= metadata.max_steps(m, tm, len(offsets) - 1)
        assert np.all(np.diff(tids) >= 0), "row tiles must be revisited on consecutive steps only"
        assert np.all(np.diff(gids) >= 0), "groups must be visited on consecutive steps only"
        owner = np.full(m, -1)
        for g, t in zip(gids, tids):
            rows = np.arange(t * tm, min((t + 1) * tm, m))
            mine = rows[(rows >= offsets[g]) & (rows < offsets[g + 1])]
            assert np.all(owner[mine] == -1), "a row stored by two steps"
            owner[mine] = g
        covered = m if tail else int(sizes.sum())
        assert np.all(owner[:covered] >= 0) and np.all(owner[covered:] == -1)
        if empty:
            assert set(gids.tolist()) == set(range(e)), "tgmm must visit every group, empty ones included"


# ------------------------------------------------------------------------------------------ kernels vs reference


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@given(data=st.data())
@EXAMPLES
def test_kernels_match_reference_on_drawn_group_sizes(case, data):
    sizes = data.draw(group_sizes(case.e, case.m))
    _check_case(case, sizes, seed=data.draw(st.integers(0, 2**20)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernels_match_reference_on_edge_group_sizes(case):
    for i, sizes in enumerate(edge_sizes(case.e, case.m)):
        _check_case(case, sizes, seed=i)


def test_tpu_interpreter_runs_every_scheduled_grid_step():
    """The TPU interpreter (uninitialised memory and overhanging edge blocks read NaN) runs the dynamic grid step by
    step: the recorder sees exactly n_tiles x num_steps x k_tiles points, and the outputs still match."""
    case = CASES[0]
    sizes = np.array([30, 0, 90, 0, 41, 20], np.int32)  # sum 181 < 200: a partial tile plus padding rows
    points = []

    def record(token, grid_point, core):
        points.append(tuple(int(v) for v in grid_point))
        return token

    params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized", grid_point_recorder=record)
    x, w_gate, w_up = _inputs(case, 0)[:3]
    gs = jnp.asarray(sizes)
    h = jax.jit(lambda *a: G.gmm_glu(*a, tiling=case.tiles, interpret=params))(x, w_gate, w_up, gs)
    tm, tk, tn = case.tiles.tm, case.tiles.tk, case.tiles.tn
    sched = metadata.make_schedule(jnp.asarray(sizes), m=case.m, tm=tm, tail_group=True, visit_empty=False)
    steps = int(sched.num_steps)
    assert sorted(points) == sorted(
        (n, s, k) for n in range(-(-case.f // tn)) for s in range(steps) for k in range(-(-case.d // tk))
    )
    ref = G.reference.gmm_glu(x, w_gate, w_up, gs)
    _check("tpu_interpreter.h", h, ref, case.dtype)
    assert not np.any(np.isnan(_f32(h))), "uninitialised (NaN) memory leaked into the output"


def test_tpu_interpreter_forward_and_vjp():
    """Every kernel under TPU memory semantics on the case where no dimension divides its tile."""
    case = CASES[1]
    params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized")
    _check_case(case, np.array([7, 0, 0, case.m - 40] + [0] * (case.e - 4), np.int32), seed=3, interpret=params)


# ------------------------------------------------------------------------------------------ fused row gather


@dataclasses.dataclass(frozen=True)
class GatherCase:
    """gmm_glu(x, rows=r) over unsorted tokens x [T, D]; M = T * top_k + pad sorted rows (pad rows past the routed
    ones are extra rows that group_sizes may or may not cover)."""

    name: str
    dtype: str
    t: int
    top_k: int
    pad: int
    d: int
    f: int
    e: int
    tiles: G.BlockSizes

    @property
    def m(self) -> int:
        return self.t * self.top_k + self.pad


GATHER_CASES = [
    # float32: M = 157 (not a multiple of tm = 32), 2 k tiles (tiles_k > 1 slices the gathered rows), 2 n tiles in
    # the forward / recompute (f = 256) and in the input gradient (d = 256), so the double buffer restarts per n tile.
    GatherCase("f32_gather", "float32", t=50, top_k=3, pad=7, d=256, f=256, e=5, tiles=G.BlockSizes(32, 128, 128)),
    # bf16: one k tile, 2 n tiles, M = 170 in 64-row tiles, top-4.
    GatherCase("bf16_gather", "bfloat16", t=40, top_k=4, pad=10, d=256, f=256, e=6, tiles=G.BlockSizes(64, 256, 128)),
]


def _gather_rows_and_sizes(case: GatherCase, kind: str, seed: int):
    """MoE-like rows (each token once per routed expert, sorted by expert) and group sizes of one `kind`:
    'routed' (all T*K routed rows, the pad rows are padding), 'skewed' (one expert takes all but 3 rows, the others
    one each, some empty), 'partial' (only part of the rows routed: padding past sum(group_sizes) < M)."""
    rng = np.random.default_rng(seed)
    t, k, e, m = case.t, case.top_k, case.e, case.m
    experts = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)])  # [T, K] distinct per token
    if kind == "skewed":
        sizes = np.zeros(e, np.int32)
        sizes[0], sizes[2], sizes[e - 1] = 1, 1, 1
        sizes[1] = m - 3
        rows = rng.integers(0, t, size=m)
    else:
        order = np.argsort(experts.reshape(-1), kind="stable")
        sizes = np.bincount(experts.reshape(-1), minlength=e).astype(np.int32)
        sizes[e // 2] = 0 if kind == "partial" else sizes[e // 2]  # an empty expert; its rows become padding
        if kind == "partial":
            sizes[0] = max(0, sizes[0] - 5)
        rows = np.concatenate([order // k, rng.integers(0, t, size=case.pad)])
        rows[rows.size - 1], rows[rows.size - 2] = -7, t + 100  # padding rows may hold any index: clamped, unused
    return jnp.asarray(rows, jnp.int32), jnp.asarray(sizes, jnp.int32)


@functools.cache
def _gather_compiled(case: GatherCase, interpret):
    def fused(x, w_gate, w_up, gs, rows, d_h):
        h, pullback = jax.vjp(lambda a, b, c: G.gmm_glu(a, b, c, gs, rows=rows, tiling=case.tiles,
                                                        interpret=interpret), x, w_gate, w_up)
        return h, pullback(d_h.astype(h.dtype))

    def ref(x, w_gate, w_up, gs, rows, d_h):
        h, pullback = jax.vjp(lambda a, b, c: G.reference.gmm_glu(gather_rows(a, rows), b, c, gs), x, w_gate, w_up)
        return h, pullback(d_h.astype(h.dtype))

    return jax.jit(fused), jax.jit(ref)


def _check_gather_case(case: GatherCase, kind: str, seed: int, interpret=True):
    fused, ref = _gather_compiled(case, interpret)
    dt = jnp.dtype(case.dtype)
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (case.t, case.d), jnp.float32).astype(dt)
    w_gate = (jax.random.normal(k[1], (case.e, case.d, case.f)) / np.sqrt(case.d)).astype(dt)
    w_up = (jax.random.normal(k[2], (case.e, case.d, case.f)) / np.sqrt(case.d)).astype(dt)
    d_h = jax.random.normal(k[3], (case.m, case.f), jnp.float32).astype(dt)
    rows, gs = _gather_rows_and_sizes(case, kind, seed)
    h, (dx, dwg, dwu) = fused(x, w_gate, w_up, gs, rows, d_h)
    h_ref, (dx_ref, dwg_ref, dwu_ref) = ref(x, w_gate, w_up, gs, rows, d_h)
    assert h.shape == (case.m, case.f) and dx.shape == x.shape and dx.dtype == x.dtype
    for name, ours, want in (("h", h, h_ref), ("dx", dx, dx_ref), ("dw_gate", dwg, dwg_ref), ("dw_up", dwu, dwu_ref)):
        _check(f"{case.name}.{kind}.{name}", ours, want, case.dtype)
    used = int(min(int(gs.sum()), case.m))
    assert not np.any(_f32(h)[used:]), f"{case.name}.{kind}: padding rows of h are not zero"
    assert not np.any(_f32(dwg)[np.asarray(gs) == 0]), f"{case.name}.{kind}: empty expert has a weight gradient"


@pytest.mark.parametrize("kind", ["routed", "skewed", "partial"])
@pytest.mark.parametrize("case", GATHER_CASES, ids=lambda c: c.name)
def test_fused_gather_matches_gather_then_reference(case, kind):
    """gmm_glu(x, rows=r) and its gradients for x, w_gate, w_up equal the reference on x[r] (tolerances: numerics
    TOLERANCES, relative max-abs 1e-4 float32 / 2e-2 bfloat16)."""
    _check_gather_case(case, kind, seed=len(kind))


@pytest.mark.slow
def test_fused_gather_tpu_interpreter():
    """TPU memory semantics (uninitialised VMEM reads NaN, DMAs and semaphores simulated, races detected): the
    per-row DMAs, the double buffer and the semaphore waits leave the same results."""
    params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized", detect_races=True)
    _check_gather_case(GATHER_CASES[0], "partial", seed=5, interpret=params)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_fused_gather_kernels_directly(impl):
    """The kernel entry points: grouped_matmul / tgmm with lhs_rows equal the same kernels on the gathered rows."""
    from ming_jax.pallas.gmm import kernel as K

    case = GATHER_CASES[0]
    rows, gs = _gather_rows_and_sizes(case, "routed", 1)
    x = jax.random.normal(jax.random.key(1), (case.t, case.d), jnp.float32)
    w = jax.random.normal(jax.random.key(2), (case.e, case.d, case.f), jnp.float32) / 16
    dy = jax.random.normal(jax.random.key(3), (case.m, case.f), jnp.float32)
    xs = gather_rows(x, rows)
    if impl == "xla":  # the XLA path of gmm_glu gathers first
        h = G.gmm_glu(x, w, w, gs, rows=rows, implementation="xla")
        _check("xla_gather.h", h, G.reference.gmm_glu(xs, w, w, gs), "float32")
        return
    kw = dict(block=case.tiles, interpret=True)
    (y,) = K.grouped_matmul((x,), (w,), gs, terms=(((0, 0),),), out_dtypes=(jnp.float32,), lhs_rows=rows, **kw)
    (y_ref,) = K.grouped_matmul((xs,), (w,), gs, terms=(((0, 0),),), out_dtypes=(jnp.float32,), **kw)
    _check("kernel_gather.y", y, y_ref, "float32")
    (dw,) = K.transposed_grouped_matmul(x, (dy,), gs, out_dtype=jnp.float32, lhs_rows=rows, **kw)
    (dw_ref,) = K.transposed_grouped_matmul(xs, (dy,), gs, out_dtype=jnp.float32, **kw)
    _check("kernel_gather.dw", dw, dw_ref, "float32")


def test_fused_gather_bad_input_raises_naming_the_problem():
    x = jnp.zeros((10, 256), jnp.float32)
    w = jnp.zeros((4, 256, 128), jnp.float32)
    gs = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="rows must be a 1-D int32"):
        G.gmm_glu(x, w, w, gs, rows=jnp.zeros((20,), jnp.int64 if jax.config.x64_enabled else jnp.float32))
    with pytest.raises(ValueError, match="rows must be a 1-D int32"):
        G.gmm_glu(x, w, w, gs, rows=jnp.zeros((4, 5), jnp.int32))
    with pytest.raises(ValueError, match="rows must be a 1-D int32"):
        G.gmm_glu(x, w, w, gs, rows=jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match="unsorted"):
        G.gmm_glu(jnp.zeros((0, 256), jnp.float32), w, w, gs, rows=jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="multiple of"):  # K = 320 in k tiles of 256: gathered rows cannot be sliced
        G.gmm_glu(jnp.zeros((10, 320), jnp.float32), jnp.zeros((4, 320, 128)), jnp.zeros((4, 320, 128)), gs,
                  rows=jnp.zeros((20,), jnp.int32), tiling=G.BlockSizes(16, 256, 128), interpret=True)


# ------------------------------------------------------------------------------------------ implementations


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.name)
def test_xla_ragged_dot_matches_reference(case):
    sizes = np.array([5, 0, case.m // 2] + [0] * (case.e - 3), np.int32)
    x, w_gate, w_up, w_down, d_h = _inputs(case, 11)
    gs = jnp.asarray(sizes)
    h, grads = _glu_vjp(lambda a, b, c, g: G.gmm_glu(a, b, c, g, implementation="xla"))(x, w_gate, w_up, gs, d_h)
    h_ref, grads_ref = _glu_vjp(G.reference.gmm_glu)(x, w_gate, w_up, gs, d_h)
    _check("xla.h", h, h_ref, case.dtype)
    for name, a, b in zip(("dx", "dw_gate", "dw_up"), grads, grads_ref):
        _check(f"xla.{name}", a, b, case.dtype)
    y = G.gmm(h_ref, w_down, gs, implementation="xla")
    _check("xla.y", y, G.reference.gmm(h_ref, w_down, gs), case.dtype)


def test_auto_uses_portable_when_lowering_for_cpu():
    """Off TPU "auto" is the portable step loop (tests/test_gmm_portable.py), never the densifying ragged_dot."""
    case = CASES[0]
    x, w_gate, w_up, _, _ = _inputs(case, 0)
    gs = jnp.asarray([10, 0, 50, 0, 0, 5], jnp.int32)
    text = jax.jit(lambda *a: G.gmm_glu(*a)).lower(x, w_gate, w_up, gs).as_text()
    assert "tpu_custom_call" not in text and "ragged_dot" not in text
    _check("auto_cpu.h", G.gmm_glu(x, w_gate, w_up, gs), G.reference.gmm_glu(x, w_gate, w_up, gs), case.dtype)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_naming_the_problem():
    x = jnp.zeros((64, 128), jnp.float32)
    w = jnp.zeros((4, 128, 128), jnp.float32)
    gs = jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="int32"):
        G.gmm(x, w, gs.astype(jnp.float32), interpret=True)
    with pytest.raises(ValueError, match="one per expert"):
        G.gmm(x, w, jnp.zeros((3,), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=r"rhs must be \[G, K=128"):
        G.gmm(x, jnp.zeros((4, 64, 128), jnp.float32), gs, interpret=True)
    with pytest.raises(ValueError, match="share one dtype"):
        G.gmm(x, w.astype(jnp.bfloat16), gs, interpret=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        G.gmm(x, w, gs, tiling=G.BlockSizes(24, 128, 128), interpret=True)
    with pytest.raises(ValueError, match="implementation"):
        G.gmm(x, w, gs, implementation="cuda")
    with pytest.raises(ValueError, match="same"):
        G.gmm_glu(x, w, jnp.zeros((4, 128, 256), jnp.float32), gs, interpret=True)
    big = functools.partial(G.gmm, tiling=G.BlockSizes(1024, 8192, 2048), interpret=True)
    with pytest.raises(ValueError, match="VMEM"):  # shapes only: nothing of this size is allocated
        jax.eval_shape(big, jax.ShapeDtypeStruct((4096, 8192), jnp.float32),
                       jax.ShapeDtypeStruct((4, 8192, 4096), jnp.float32), gs)


# ------------------------------------------------------------------------------------------ TPU ahead-of-time


LING_FLASH = dict(m=8192 * 8, d=4096, f=1024, e=256)  # tokens x top-8 rows, d_model, expert ffn, experts


def _tpu_abstract(topology: str, shapes):
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    one_chip = NamedSharding(Mesh(np.array(topo.devices[:1]), ("chip",)), PartitionSpec())
    return [jax.ShapeDtypeStruct(s, dt, sharding=one_chip) for s, dt in shapes]


_need_libtpu = need_libtpu


def _train_step(tiling=None, out_type=None):
    """Gradients of sum(gmm(gmm_glu(x)) * d_y) for x and the three expert weights: every kernel, forward and VJP."""

    def step(x, w_gate, w_up, w_down, gs, d_y):
        def loss(x, w_gate, w_up, w_down):
            y = G.gmm(G.gmm_glu(x, w_gate, w_up, gs, tiling=tiling), w_down, gs, tiling=tiling,
                      preferred_element_type=out_type)
            return jnp.sum(y.astype(jnp.float32) * d_y.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_gate, w_up, w_down)

    return step


def _ffn_shapes(m, d, f, e, dtype):
    return [((m, d), dtype), ((e, d, f), dtype), ((e, d, f), dtype), ((e, f, d), dtype), ((e,), jnp.int32),
            ((m, d), dtype)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_tpu_aot_compile_interpret_cases(case):
    """The configurations the interpreter checks (ragged dims, float32, odd tiles) also pass Mosaic lowering."""
    _need_libtpu()
    shapes = _ffn_shapes(case.m, case.d, case.f, case.e, jnp.dtype(case.dtype))
    step = _train_step(case.tiling, jnp.float32 if case.out_f32 else None)
    lowered = jax.jit(step).lower(*_tpu_abstract("v5p:2x2x1", shapes))
    assert len(re.findall(r"custom_call @tpu_custom_call", lowered.as_text())) == 6
    lowered.compile()


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_tpu_aot_compile_ling_flash_expert_ffn(topology):
    """gmm_glu + gmm forward and backward at full Ling-flash expert shapes, Mosaic-compiled for one TPU chip."""
    _need_libtpu()
    m, d, f, e = (LING_FLASH[k] for k in ("m", "d", "f", "e"))
    shapes = _ffn_shapes(m, d, f, e, jnp.bfloat16)
    lowered = jax.jit(_train_step()).lower(*_tpu_abstract(topology, shapes))
    kernels = re.findall(r"custom_call @tpu_custom_call", lowered.as_text())
    # The forward down-projection is dead (only its gradient is needed): glu fwd, recompute, dx, tgmm; dlhs, tgmm.
    assert len(kernels) == 6, f"expected the 6 Pallas kernels, lowered {len(kernels)}"
    compiled = lowered.compile()

    mem = compiled.memory_analysis()
    args = sum(int(np.prod(s)) * jnp.dtype(dt).itemsize for s, dt in shapes)
    grads = sum(int(np.prod(s)) * jnp.dtype(dt).itemsize for s, dt in shapes[:4])
    h_bytes = m * f * 2
    assert mem.argument_size_in_bytes == args
    assert abs(mem.output_size_in_bytes - grads) < (1 << 20)
    # HBM temporaries: at most the bf16 [M, F] arrays h, d_h, d_gate, d_up; float32 pre-activations never exist.
    assert mem.temp_size_in_bytes <= 4 * h_bytes, f"temp {mem.temp_size_in_bytes / 2**20:.0f} MiB"

    cost = compiled.cost_analysis()
    useful = 20 * m * d * f  # 2 flops x (2 glu fwd + 2 recompute + 2 dx + 2 tgmm + 1 dlhs + 1 tgmm) x M D F
    assert useful <= cost["flops"] <= 1.01 * useful, cost["flops"]
    assert args - (m * d * 2) <= cost["bytes accessed"] <= 8 * (args + grads), cost["bytes accessed"]


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_tpu_aot_compile_ling_flash_fused_gather(topology):
    """The fused permute at full Ling-flash shapes (8192 tokens, top-8): the gate/up kernels read token rows of the
    unsorted x [T, D]; forward and the whole FFN's gradients Mosaic-compile for one chip, and the forward holds no
    [T*K, D] permuted copy of x in HBM."""
    _need_libtpu()
    d, f, e = (LING_FLASH[k] for k in ("d", "f", "e"))
    t, top_k = 8192, 8
    m = t * top_k
    bf16 = jnp.bfloat16
    shapes = [((t, d), bf16), ((e, d, f), bf16), ((e, d, f), bf16), ((e, f, d), bf16), ((e,), jnp.int32),
              ((m,), jnp.int32), ((m, d), bf16)]
    args = _tpu_abstract(topology, shapes)
    permuted_bytes = m * d * 2

    def fwd(x, w_gate, w_up, gs, rows):
        return G.gmm_glu(x, w_gate, w_up, gs, rows=rows)

    lowered = jax.jit(fwd).lower(*args[:3], args[4], args[5])
    assert len(re.findall(r"custom_call @tpu_custom_call", lowered.as_text())) == 1
    mem = lowered.compile().memory_analysis()
    assert mem.temp_size_in_bytes < permuted_bytes // 2, f"fwd temp {mem.temp_size_in_bytes / 2**20:.0f} MiB"

    def train(x, w_gate, w_up, w_down, gs, rows, d_y):
        def loss(x, w_gate, w_up, w_down):
            y = G.gmm(G.gmm_glu(x, w_gate, w_up, gs, rows=rows), w_down, gs)
            return jnp.sum(y.astype(jnp.float32) * d_y.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_gate, w_up, w_down)

    lowered = jax.jit(train).lower(*args)
    kernels = re.findall(r"custom_call @tpu_custom_call", lowered.as_text())
    assert len(kernels) == 6, f"expected the 6 Pallas kernels, lowered {len(kernels)}"
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    useful = 20 * m * d * f
    assert useful <= cost["flops"] <= 1.01 * useful + 4 * m * d, cost["flops"]  # + the segment sum of d_x
