"""Pallas TPU grouped-matmul kernels over expert-sorted rows, with fused epilogues.

Two kernels, both driven by the tile schedule of `metadata.make_schedule` through scalar prefetch and a dynamic grid:

* `grouped_matmul`: out[rows of g] = epilogue(sum_t lhs_t[rows of g] @ rhs_t[g]) for every group g. It keeps one or
  more float32 accumulators per output tile, so a single kernel does the plain gmm (one product), the fused MoE
  gate/up projection with its SiLU-times-up epilogue (two accumulators sharing the lhs tile), the GLU backward
  (recomputes both pre-activations and emits d_gate, d_up from the incoming d_h tile) and the GLU input gradient
  (d_gate @ w_gate^T + d_up @ w_up^T summed into one accumulator). Grid (n tiles, schedule steps, k tiles).
* `transposed_grouped_matmul` (tgmm): out_t[g] = lhs[rows of g]^T @ rhs_t[rows of g], the weight gradient; several
  right-hand sides share each lhs tile. Grid (n tiles, k tiles, schedule steps).

Design notes (ideas from jax's megablox and tokamax's ragged_dot, re-derived here):
* A row tile shared by two groups is computed once per group and each visit stores only its own rows (a select on
  the row mask, so garbage in rows a visit does not own can never leak, NaN included).
* Padding rows past sum(group_sizes) are the schedule's tail group: its steps skip the matmul and store zeros, so
  the gmm outputs are fully written by the kernel. Its index maps pin its input blocks so it issues no new DMAs.
* With the whole contraction in one block (tiles_k == 1) consecutive steps of one group keep the same weight block,
  so the pipeline fetches each expert's weights once per n tile instead of once per row tile; the defaults aim for it.
* M, K and N need not divide the tiles: edge blocks overhang the array; overhanging rows belong to no group (never
  stored, masked out of tgmm sums) and overhanging k columns are zeroed before the dot.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ming_jax.pallas.gmm import metadata

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_MIB = 1 << 20
# VMEM per TensorCore: 64 MiB on v5p, 128 MiB on v5e / v6e. Refuse plans that would not fit the smallest.
_VMEM_CAP_BYTES = 60 * _MIB


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one grouped matmul: `tm` rows, `tk` of the contracted dim, `tn` output columns.

    A tile larger than its dimension is clamped to the dimension (a full-dimension block is always legal); a smaller
    one must respect the TPU layout: tm a multiple of 16 (bf16 packs 16 rows per vreg), tk and tn multiples of 128.
    """

    tm: int = 256
    tk: int = 2048
    tn: int = 512

    def __post_init__(self):
        for name in ("tm", "tk", "tn"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {v!r}")

    def fit(self, m: int, k: int, n: int) -> "BlockSizes":
        """Clamp to the problem (m rows, k contracted, n output columns) and check TPU alignment."""
        out = BlockSizes(min(self.tm, m), min(self.tk, k), min(self.tn, n))
        for name, tile, dim, align in (("tm", out.tm, m, 16), ("tk", out.tk, k, 128), ("tn", out.tn, n, 128)):
            if tile != dim and tile % align:
                raise ValueError(
                    f"BlockSizes.{name}={tile} must equal its dimension ({dim}) or be a multiple of {align}"
                )
        return out


@dataclasses.dataclass(frozen=True)
class GmmTiling:
    """Tiles for the three kernels of one differentiable op; None picks `get_default` for that call's shape.

    fwd: the forward gmm (and the GLU backward's recompute, which has the same shape); dlhs: the input gradient
    (transposed weights, contracts over the output dim); drhs: the weight gradient (tgmm).
    """

    fwd: BlockSizes | None = None
    dlhs: BlockSizes | None = None
    drhs: BlockSizes | None = None

    @classmethod
    def coerce(cls, tiling) -> "GmmTiling":
        """None -> all defaults; a bare BlockSizes -> forward tiles, defaults for the backward kernels."""
        if tiling is None:
            return cls()
        if isinstance(tiling, BlockSizes):
            return cls(fwd=tiling)
        if isinstance(tiling, cls):
            return tiling
        raise TypeError(f"tiling must be None, BlockSizes or GmmTiling, got {type(tiling).__name__}")


def _largest_aligned(limit: int, dim: int, align: int) -> int:
    """Largest tile <= limit for `dim`: the whole dim when it fits, else a multiple of `align` (>= align)."""
    if dim <= limit:
        return dim
    return max(align, limit // align * align)


def get_default(m: int, k: int, n: int, *, kind: str = "gmm", num_rhs: int = 1, itemsize: int = 2) -> BlockSizes:
    """Heuristic tiles for a grouped matmul of `m` rows contracting `k` into `n` columns.

    kind="gmm": keep the whole contraction in one block when it fits (weights then stream once per n tile, see the
      module notes), and size tn so the double-buffered weight blocks of all `num_rhs` right-hand sides take <= 16
      MiB, keeping at least two n tiles when n allows so a megacore chip (v5p) splits the "parallel" n axis.
      tm = 256: at Ling-flash sizes an expert averages 256 rows; a tile on a group boundary is computed once per
      group it touches, so wasted MXU rows grow with tm, while smaller tiles mean more grid steps and smaller matmuls.
    kind="tgmm": the float32 accumulators of all `num_rhs` outputs take <= 8 MiB; tk up to 1024, tn fills the rest.
    These are starting points for tuning on hardware, not measured optima.
    """
    if kind not in ("gmm", "tgmm"):
        raise ValueError(f"kind must be 'gmm' or 'tgmm', got {kind!r}")
    tm = _largest_aligned(256, m, 16)
    if kind == "gmm":
        tk = _largest_aligned(4096, k, 128)
        tn_cap = (16 * _MIB) // (2 * num_rhs * tk * itemsize)
        if n >= 256:
            tn_cap = min(tn_cap, max(128, n // 2))
        tn = _largest_aligned(max(128, tn_cap), n, 128)
    else:
        tk = _largest_aligned(1024, k, 128)
        tn_cap = (8 * _MIB) // (4 * num_rhs * tk)
        if n >= 256:
            tn_cap = min(tn_cap, max(128, n // 2))
        tn = _largest_aligned(max(128, tn_cap), n, 128)
    return BlockSizes(tm, tk, tn)


def resolve_interpret(interpret):
    """pallas_call's `interpret`: False (compile with Mosaic), True (jax's generic Pallas interpreter, fast) or a
    `pltpu.InterpretParams` (the TPU interpreter: TPU memory semantics, e.g. uninitialised VMEM and overhanging edge
    blocks read as NaN; slower). Both interpreters run the real kernel body, dynamic grid and scalar prefetch included.
    """
    if not isinstance(interpret, (bool, pltpu.InterpretParams)):
        raise TypeError(f"interpret must be a bool or pltpu.InterpretParams, got {type(interpret).__name__}")
    return interpret


def _dot_precision(dtype) -> lax.Precision:
    # float32 inputs must not be rounded to bf16 passes on the MXU: the float32 bar is 1e-4 relative.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _vmem_limit(block_bytes: int, scratch_bytes: int) -> int:
    """Double-buffered pipeline blocks plus scratch, with headroom; refuse plans the smallest VMEM cannot hold."""
    need = 2 * block_bytes + scratch_bytes
    if need > _VMEM_CAP_BYTES:
        raise ValueError(
            f"grouped matmul tiles need {need / _MIB:.1f} MiB of VMEM (> {_VMEM_CAP_BYTES // _MIB} MiB): "
            "pass smaller BlockSizes"
        )
    return int(min(_VMEM_CAP_BYTES, max(32 * _MIB, need + need // 2)))


# ----------------------------------------------------------------------------------------------------------------
# Epilogues: (accumulators [tm, tn] f32, extra row tiles [tm, tn] f32) -> output tiles (f32). Module-level functions
# so they hash stably as static arguments.


def epilogue_identity(accs, extras):
    del extras
    return list(accs)


def epilogue_glu(accs, extras):
    """h = silu(gate) * up."""
    del extras
    gate, up = accs
    return [jax.nn.silu(gate) * up]


def epilogue_glu_bwd(accs, extras):
    """From the recomputed pre-activations and d_h: d_gate = d_h * up * silu'(gate), d_up = d_h * silu(gate)."""
    gate, up = accs
    (dh,) = extras
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    dsilu = sig * (1.0 + gate * (1.0 - sig))
    return [dh * up * dsilu, dh * silu]


# ----------------------------------------------------------------------------------------------------------------


def _check_operands(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], group_sizes: jax.Array) -> jnp.dtype:
    dtypes = {jnp.dtype(a.dtype) for a in (*lhs, *rhs)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
        raise ValueError(
            f"grouped matmul operands must share one dtype of {[str(d) for d in SUPPORTED_DTYPES]}, "
            f"got {sorted(str(d) for d in dtypes)}"
        )
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32, got {group_sizes.dtype}")
    return next(iter(dtypes))


@dataclasses.dataclass(frozen=True)
class _GmmPlan:
    """Static layout of one `grouped_matmul` call: sizes, tiles and operand counts."""

    m: int
    k: int
    n: int
    num_groups: int
    block: BlockSizes
    n_lhs: int
    n_rhs: int
    n_extra: int
    transpose_rhs: bool

    @property
    def tiles_k(self) -> int:
        return pl.cdiv(self.k, self.block.tk)

    @property
    def tiles_n(self) -> int:
        return pl.cdiv(self.n, self.block.tn)


def _gmm_kernel(plan: _GmmPlan, terms, epilogue, precision):
    """Kernel body for grid (n tile, schedule step, k tile); refs: 3 scalar-prefetch, inputs, outputs, accumulators."""
    tm, tk, tn = plan.block.tm, plan.block.tk, plan.block.tn
    k_rem = plan.k % tk
    dims = (((1,), (1,)), ((), ())) if plan.transpose_rhs else (((1,), (0,)), ((), ()))
    n_in = plan.n_lhs + plan.n_rhs + plan.n_extra

    def kernel(offsets_ref, group_ids_ref, tile_ids_ref, *refs):
        lhs_refs = refs[: plan.n_lhs]
        rhs_refs = refs[plan.n_lhs : plan.n_lhs + plan.n_rhs]
        extra_refs = refs[plan.n_lhs + plan.n_rhs : n_in]
        out_refs = refs[n_in : -len(terms)]
        acc_refs = refs[-len(terms) :]
        step, k_i = pl.program_id(1), pl.program_id(2)
        group = group_ids_ref[step]
        is_padding = group >= plan.num_groups

        @pl.when(k_i == 0)
        def _zero():
            for acc in acc_refs:
                acc[...] = jnp.zeros_like(acc)

        def load_k_masked(ref, k_axis):
            x = ref[...]
            if k_rem:  # the last k block overhangs K: zero its garbage columns before they reach the dot
                col = lax.broadcasted_iota(jnp.int32, x.shape, k_axis) + k_i * tk
                x = jnp.where(col < plan.k, x, jnp.zeros_like(x))
            return x

        @pl.when(jnp.logical_not(is_padding))
        def _accumulate():
            xs = [load_k_masked(r, 1) for r in lhs_refs]  # [tm, tk]
            ws = [load_k_masked(r, 1 if plan.transpose_rhs else 0) for r in rhs_refs]  # [tk, tn] / [tn, tk]
            for acc, products in zip(acc_refs, terms):
                total = acc[...]  # [tm, tn] f32
                for li, ri in products:
                    total += lax.dot_general(
                        xs[li], ws[ri], dims, precision=precision, preferred_element_type=jnp.float32
                    )
                acc[...] = total

        @pl.when(k_i == plan.tiles_k - 1)
        def _store():
            rows = lax.broadcasted_iota(jnp.int32, (tm, tn), 0) + tile_ids_ref[step] * tm
            own = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
            outs = epilogue([a[...] for a in acc_refs], [e[...].astype(jnp.float32) for e in extra_refs])
            for out_ref, val in zip(out_refs, outs):
                val = jnp.where(is_padding, 0.0, val)
                out_ref[...] = jnp.where(own, val, out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)

    return kernel


def _gmm_block_specs(plan: _GmmPlan, n_out: int):
    """Index maps. Padding steps compute nothing, so their input blocks are pinned (k block and, for lhs and extras,
    the first padding row tile): consecutive padding steps then issue no DMAs. Outputs follow the real tile."""
    tm, tk, tn = plan.block.tm, plan.block.tk, plan.block.tn
    last_k, last_tile, g_max = plan.tiles_k - 1, metadata.num_row_tiles(plan.m, tm) - 1, plan.num_groups

    def input_tile_and_k(step, k_i, offsets, group_ids, tile_ids):
        real = group_ids[step] < g_max
        # lax.div, not //: floor division lowers through `sign`, whose Mosaic rule queries the local device kind
        # and so breaks ahead-of-time compiles from a CPU host; offsets are >= 0, so truncation is the same.
        pad_tile = jnp.minimum(lax.div(offsets[g_max], jnp.int32(tm)), last_tile)
        return jnp.where(real, tile_ids[step], pad_tile), jnp.where(real, k_i, last_k)

    def lhs_map(n_i, step, k_i, offsets, group_ids, tile_ids):
        return input_tile_and_k(step, k_i, offsets, group_ids, tile_ids)

    def rhs_map(n_i, step, k_i, offsets, group_ids, tile_ids):
        _, kb = input_tile_and_k(step, k_i, offsets, group_ids, tile_ids)
        g = jnp.minimum(group_ids[step], g_max - 1)
        return (g, n_i, kb) if plan.transpose_rhs else (g, kb, n_i)

    def extra_map(n_i, step, k_i, offsets, group_ids, tile_ids):
        return input_tile_and_k(step, k_i, offsets, group_ids, tile_ids)[0], n_i

    def out_map(n_i, step, k_i, offsets, group_ids, tile_ids):
        return tile_ids[step], n_i

    rhs_block = (None, tn, tk) if plan.transpose_rhs else (None, tk, tn)
    in_specs = (
        [pl.BlockSpec((tm, tk), lhs_map)] * plan.n_lhs
        + [pl.BlockSpec(rhs_block, rhs_map)] * plan.n_rhs
        + [pl.BlockSpec((tm, tn), extra_map)] * plan.n_extra
    )
    return in_specs, [pl.BlockSpec((tm, tn), out_map)] * n_out


def _gmm_cost(plan: _GmmPlan, itemsize: int, extra_itemsize: int, out_itemsizes, n_products: int, transc: int):
    """(CostEstimate, bytes of one set of pipeline blocks). HBM model: lhs streamed once per n tile; weights once per
    (group, n tile) when the contraction is one block, else once per schedule step (worst case)."""
    m, k, n = plan.m, plan.k, plan.n
    tm, tk, tn = plan.block.tm, plan.block.tk, plan.block.tn
    weight_reads = plan.num_groups if plan.tiles_k == 1 else metadata.max_steps(m, tm, plan.num_groups + 1)
    cost = pl.CostEstimate(
        flops=2 * m * k * n * n_products,
        transcendentals=transc * m * n,
        bytes_accessed=(
            plan.n_lhs * m * k * itemsize * plan.tiles_n
            + plan.n_rhs * weight_reads * k * n * itemsize
            + plan.n_extra * m * n * extra_itemsize
            + m * n * sum(out_itemsizes)
        ),
    )
    block_bytes = (
        plan.n_lhs * tm * tk * itemsize
        + plan.n_rhs * tk * tn * itemsize
        + plan.n_extra * tm * tn * extra_itemsize
        + tm * tn * sum(out_itemsizes)
    )
    return cost, block_bytes


def grouped_matmul(
    lhs: Sequence[jax.Array],
    rhs: Sequence[jax.Array],
    group_sizes: jax.Array,
    *,
    terms: tuple[tuple[tuple[int, int], ...], ...],
    epilogue: Callable = epilogue_identity,
    extras: Sequence[jax.Array] = (),
    out_dtypes: Sequence,
    transpose_rhs: bool = False,
    block: BlockSizes | None = None,
    interpret=False,
    transcendentals_per_out: int = 0,
) -> tuple[jax.Array, ...]:
    """Grouped matmuls with float32 accumulators and a fused epilogue; returns one [M, N] array per epilogue output.

    lhs: arrays [M, K]; rhs: arrays [G, K, N] ([G, N, K] with transpose_rhs); group_sizes [G] int32, sum <= M.
    terms[a] lists the (lhs index, rhs index) products summed into accumulator a; the epilogue maps the accumulators
    (and the `extras`, [M, N] row-aligned arrays read at the output tile) to the outputs, cast to `out_dtypes`.
    Rows at or past sum(group_sizes) come out as zeros.
    """
    lhs, rhs, extras = tuple(lhs), tuple(rhs), tuple(extras)
    dtype = _check_operands(lhs, rhs, group_sizes)
    m, k = lhs[0].shape
    if any(a.shape != (m, k) for a in lhs):
        raise ValueError(f"all lhs must share one [M, K] shape, got {[a.shape for a in lhs]}")
    num_groups = rhs[0].shape[0]
    n = rhs[0].shape[1] if transpose_rhs else rhs[0].shape[2]
    want = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
    if any(a.shape != want for a in rhs):
        raise ValueError(f"rhs must all be {want} for lhs [{m}, {k}], got {[a.shape for a in rhs]}")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"group_sizes must be [{num_groups}] (one per rhs group), got {group_sizes.shape}")
    if any(e.shape != (m, n) or e.dtype != extras[0].dtype for e in extras):
        raise ValueError(f"epilogue extras must be [{m}, {n}] of one dtype, got {[(e.shape, e.dtype) for e in extras]}")
    block = (block or get_default(m, k, n, kind="gmm", num_rhs=len(rhs), itemsize=dtype.itemsize)).fit(m, k, n)
    plan = _GmmPlan(m, k, n, num_groups, block, len(lhs), len(rhs), len(extras), transpose_rhs)
    tm, tn = block.tm, block.tn

    sched = metadata.make_schedule(group_sizes, m=m, tm=tm, tail_group=True, visit_empty=False)
    in_specs, out_specs = _gmm_block_specs(plan, len(out_dtypes))
    out_itemsizes = [jnp.dtype(dt).itemsize for dt in out_dtypes]
    extra_itemsize = extras[0].dtype.itemsize if extras else 0
    n_products = sum(len(t) for t in terms)
    cost, block_bytes = _gmm_cost(plan, dtype.itemsize, extra_itemsize, out_itemsizes, n_products,
                                  transcendentals_per_out)
    call = pl.pallas_call(
        _gmm_kernel(plan, terms, epilogue, _dot_precision(dtype)),
        out_shape=[jax.ShapeDtypeStruct((m, n), dt) for dt in out_dtypes],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            in_specs=in_specs,
            out_specs=out_specs,
            grid=(plan.tiles_n, sched.num_steps, plan.tiles_k),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32) for _ in terms],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(block_bytes, len(terms) * tm * tn * 4),
        ),
        interpret=resolve_interpret(interpret),
        cost_estimate=cost,
        name="ming_gmm",
    )
    return tuple(call(sched.offsets, sched.group_ids, sched.tile_ids, *lhs, *rhs, *extras))


def _tgmm_kernel(n_out: int, tm: int, dtype):
    """Kernel body for grid (n tile, k tile, schedule step): accumulate lhs^T @ rhs over a group's row tiles, store
    when the group ends; rows outside the group (other groups, or overhanging past M) are zeroed on both sides."""
    precision = _dot_precision(dtype)

    def kernel(offsets_ref, group_ids_ref, tile_ids_ref, lhs_ref, *refs):
        rhs_refs = refs[:n_out]
        out_refs = refs[n_out : 2 * n_out]
        acc_refs = refs[2 * n_out :]
        step = pl.program_id(2)
        last = pl.num_programs(2) - 1
        group = group_ids_ref[step]
        first_visit = (step == 0) | (group_ids_ref[jnp.maximum(step - 1, 0)] != group)
        last_visit = (step == last) | (group_ids_ref[jnp.minimum(step + 1, last)] != group)
        start, end = offsets_ref[group], offsets_ref[group + 1]

        @pl.when(first_visit)
        def _zero():
            for acc in acc_refs:
                acc[...] = jnp.zeros_like(acc)

        @pl.when(end > start)
        def _accumulate():
            row0 = tile_ids_ref[step] * tm

            def own_rows(ref):
                # Rows of other groups and overhanging rows past M (garbage, maybe NaN) must add nothing.
                x = ref[...].astype(jnp.float32)
                rows = lax.broadcasted_iota(jnp.int32, x.shape, 0) + row0
                return jnp.where((rows >= start) & (rows < end), x, 0.0).astype(dtype)

            x = own_rows(lhs_ref)  # [tm, tk]
            for acc, r in zip(acc_refs, rhs_refs):
                acc[...] += lax.dot_general(
                    x, own_rows(r), (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
                )  # [tk, tn]

        @pl.when(last_visit)
        def _store():
            for out_ref, acc in zip(out_refs, acc_refs):
                out_ref[...] = acc[...].astype(out_ref.dtype)

    return kernel


def transposed_grouped_matmul(
    lhs: jax.Array,
    rhs: Sequence[jax.Array],
    group_sizes: jax.Array,
    *,
    out_dtype,
    block: BlockSizes | None = None,
    interpret=False,
) -> tuple[jax.Array, ...]:
    """tgmm: out_t[g] = lhs[rows of g]^T @ rhs_t[rows of g] -> one [G, K, N] array per rhs (float32 accumulation).

    lhs [M, K], each rhs [M, N]; rows at or past sum(group_sizes) contribute nothing; empty groups give zeros.
    """
    rhs = tuple(rhs)
    dtype = _check_operands((lhs,), rhs, group_sizes)
    m, k = lhs.shape
    n = rhs[0].shape[1]
    if any(r.shape != (m, n) for r in rhs):
        raise ValueError(f"tgmm rhs must all be [{m}, {n}] like lhs rows, got {[r.shape for r in rhs]}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D [G], got {group_sizes.shape}")
    num_groups = group_sizes.shape[0]
    block = (block or get_default(m, k, n, kind="tgmm", num_rhs=len(rhs), itemsize=dtype.itemsize)).fit(m, k, n)
    tm, tk, tn = block.tm, block.tk, block.tn
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    n_out = len(rhs)

    sched = metadata.make_schedule(group_sizes, m=m, tm=tm, tail_group=False, visit_empty=True)
    kernel = _tgmm_kernel(n_out, tm, dtype)

    def lhs_map(n_i, k_i, step, offsets, group_ids, tile_ids):
        return tile_ids[step], k_i

    def rhs_map(n_i, k_i, step, offsets, group_ids, tile_ids):
        return tile_ids[step], n_i

    def out_map(n_i, k_i, step, offsets, group_ids, tile_ids):
        return group_ids[step], k_i, n_i

    itemsize = dtype.itemsize
    out_itemsize = jnp.dtype(out_dtype).itemsize
    block_bytes = tm * tk * itemsize + n_out * (tm * tn * itemsize + tk * tn * out_itemsize)
    cost = pl.CostEstimate(
        flops=2 * m * k * n * n_out,
        transcendentals=0,
        bytes_accessed=(
            m * k * itemsize * tiles_n + n_out * m * n * itemsize * tiles_k + n_out * num_groups * k * n * out_itemsize
        ),
    )
    call = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((num_groups, k, n), out_dtype) for _ in rhs],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            in_specs=[pl.BlockSpec((tm, tk), lhs_map)] + [pl.BlockSpec((tm, tn), rhs_map) for _ in rhs],
            out_specs=[pl.BlockSpec((None, tk, tn), out_map) for _ in rhs],
            grid=(tiles_n, tiles_k, sched.num_steps),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32) for _ in rhs],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(block_bytes, n_out * tk * tn * 4),
        ),
        interpret=resolve_interpret(interpret),
        cost_estimate=cost,
        name="ming_tgmm",
    )
    return tuple(call(sched.offsets, sched.group_ids, sched.tile_ids, lhs, *rhs))
