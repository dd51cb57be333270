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
* Fused row gather (`lhs_rows`): the lhs stays unsorted in HBM ([T, K], e.g. the MoE tokens) and row r of the sorted
  layout is lhs[lhs_rows[r]], so the permuted [M, K] copy is never written. Each step copies its tile's rows with one
  DMA per row (per k block) into a two-slot VMEM landing buffer of the full contraction width and re-lays them into
  a dense tile once, so its k tiles only index that tile. (A DMA may not start a row inside a (sublane, lane) memory
  tile, so the lhs is read as [T, 1, K] and rows land on an untiled axis; see `_RowGather`.) The rows of the next
  gathering step of the same n tile (tgmm: (n, k) tile) are in flight while the current step computes; the first one
  of each n tile fetches its own rows and waits, since the n axis (and tgmm's k axis) is "parallel" and a megacore
  split must never find a DMA for another core's tile in flight. Steps with nothing to compute (padding, empty groups)
  fetch nothing; tile rows past M read a clamped (valid) row whose result is masked like any row a step does not own.
* In-place layer reads (`grouped_matmul(layer=)`): inside a scan over layers the kernel takes the whole [L, G, K, N]
  weight stacks as [L * G, K, N] (a free reshape) plus a scalar-prefetch group offset layer * G added to the group in
  the weight and scale index maps, so the layer's slice (which XLA would otherwise copy: a Pallas operand is a
  buffer of its own) never exists. The schedule, group sizes and cost stay the layer's G groups.
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
QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
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


def _check_operands(lhs: Sequence[jax.Array], rhs: Sequence[jax.Array], group_sizes: jax.Array,
                    rhs_scales: Sequence | None = None) -> jnp.dtype:
    """The one float dtype of the lhs (and of the float rhs); a quantized rhs (int8 / float8_e4m3fn, with its scale)
    may differ."""
    rhs_scales = (None,) * len(rhs) if rhs_scales is None else tuple(rhs_scales)
    if len(rhs_scales) != len(rhs):
        raise ValueError(f"{len(rhs)} rhs but {len(rhs_scales)} rhs scales")
    floats = (*lhs, *(r for r, sc in zip(rhs, rhs_scales) if sc is None))
    dtypes = {jnp.dtype(a.dtype) for a in floats}
    if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
        raise ValueError(
            f"grouped matmul operands must share one dtype of {[str(d) for d in SUPPORTED_DTYPES]}, "
            f"got {sorted(str(d) for d in dtypes)}"
        )
    for r, sc in zip(rhs, rhs_scales):
        if sc is not None and (jnp.dtype(r.dtype) not in QUANTIZED_DTYPES or sc.dtype != jnp.float32):
            raise ValueError(f"a quantized rhs must be int8 / float8_e4m3fn with a float32 scale, got {r.dtype} "
                             f"with a {sc.dtype} scale")
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
    gather_from: int = 0  # T, the rows of the unsorted lhs, when the kernel gathers them (lhs_rows); 0 otherwise
    # Per rhs: None (float) or its scale mode, ("epilogue",) (per output channel, applied to the accumulator at the
    # store) or ("tile", block) (each weight tile dequantised in VMEM before the dot; `block` weight rows along the
    # weight's own K axis share one scale row: the contracted axis, or the output axis with transpose_rhs).
    rhs_quant: tuple = ()
    # The rhs (and scales) are whole [L, G, ...] stacks passed as [L * G, ...]; a scalar-prefetch group offset
    # (layer * G, the last prefetch operand) is added to the group in their index maps (`grouped_matmul`'s `layer`).
    group_offset: bool = False

    @property
    def n_scales(self) -> int:
        return sum(q is not None for q in self.rhs_quant)

    @property
    def tiles_k(self) -> int:
        return pl.cdiv(self.k, self.block.tk)

    @property
    def tiles_n(self) -> int:
        return pl.cdiv(self.n, self.block.tn)


def _row_chunk(tm: int) -> int:
    """Rows per relayout chunk: a whole bf16 sublane tile (16) when it divides tm, else the largest divisor <= 16."""
    return next(c for c in (16, 8, 4, 2, 1) if tm % c == 0)


class _RowGather:
    """Gathers a tile's lhs rows from HBM with one DMA per row (per k block) into a two-slot VMEM landing buffer.

    A DMA may not start a row inside a TPU (sublane, lane) memory tile, so a lone row can only move between arrays
    whose row axis is a leading (untiled) one: the lhs is passed as [T, 1, K] and lands in a [2, kb, tm, 1, tk]
    buffer (kb k blocks per slot). `unpack` then re-lays a slot out into the dense [kb, tm, tk] tile the MXU reads,
    16 rows at a time, once per step (the k tiles of the step index that tile).

    Row i of the tile at `tile` is sorted row r = tile * tm + i, read from lhs[rows[r]]; r is clamped to M - 1 (rows
    past M are masked downstream) and rows[r] to [0, T - 1], so no copy can leave the arrays. Every copy into one slot
    signals that slot's DMA semaphore; `wait` waits for them one (equal-sized) descriptor at a time.
    """

    def __init__(self, rows_ref, lhs_refs, landing, sems, *, m: int, t: int, tm: int, tk: int, k_blocks):
        self.rows_ref, self.lhs_refs, self.landing, self.sems = rows_ref, lhs_refs, landing, sems
        self.m, self.t, self.tm, self.tk = m, t, tm, tk
        self.k_blocks = k_blocks  # [(first lhs column, landing k index)] to copy per row; the column may be traced

    def _copies(self, slot, i, src_row):
        for lhs_ref, buf in zip(self.lhs_refs, self.landing):
            for col, kk in self.k_blocks:
                yield pltpu.make_async_copy(
                    lhs_ref.at[src_row, :, pl.ds(col, self.tk)], buf.at[slot, kk, i], self.sems.at[slot]
                )  # [1, tk] -> [1, tk]

    def start(self, tile, slot):
        row0 = tile * self.tm

        def body(i, carry):
            src_row = jnp.clip(self.rows_ref[jnp.minimum(row0 + i, self.m - 1)], 0, self.t - 1)
            for copy in self._copies(slot, i, src_row):
                copy.start()
            return carry

        lax.fori_loop(0, self.tm, body, 0)

    def wait(self, slot):
        def body(i, carry):
            for copy in self._copies(slot, i, 0):
                copy.wait()
            return carry

        lax.fori_loop(0, self.tm, body, 0)

    def unpack(self, slot, tiles):
        """Landing slot [kb, tm, 1, tk] -> dense tiles [kb, tm, tk] (one per lhs)."""
        chunk = _row_chunk(self.tm)

        def body(c, carry):
            r0 = pl.multiple_of(c * chunk, chunk)
            for buf, tile in zip(self.landing, tiles):
                for _, kk in self.k_blocks:
                    tile[kk, pl.ds(r0, chunk), :] = buf[slot, kk, pl.ds(r0, chunk)].reshape(chunk, self.tk)
            return carry

        lax.fori_loop(0, self.tm // chunk, body, 0)

    def double_buffered(self, *, first: jax.Array, slot: jax.Array, next_step: jax.Array, has_next: jax.Array,
                        tile_ids_ref, step, tiles):
        """At the first k tile of a step that fetches: land its rows in `slot` and unpack them into `tiles`. `first`:
        no earlier step of this grid row fetched, so nothing was prefetched for this one; otherwise the previous
        fetching step put these rows in flight. `has_next`: a later step of this grid row fetches (`next_step`, the
        first such); its rows go in flight into the other slot before this step waits on its own."""

        @pl.when(first)
        def _own():
            self.start(tile_ids_ref[step], slot)

        @pl.when(has_next)
        def _prefetch():
            self.start(tile_ids_ref[next_step], 1 - slot)

        self.wait(slot)
        self.unpack(slot, tiles)


def _fetch_chain(sched: metadata.GroupSchedule) -> tuple[jax.Array, jax.Array]:
    """For tgmm, whose schedule interleaves steps of empty groups (which gather nothing): per step, its rank among
    the steps that gather (slot = rank % 2; rank 0 fetches its own rows) and the next step that gathers (max_steps
    when none). Steps past num_steps never gather."""
    length = sched.group_ids.shape[0]
    step = jnp.arange(length, dtype=jnp.int32)
    g = sched.group_ids
    fetches = (sched.offsets[g + 1] > sched.offsets[g]) & (step < sched.num_steps)
    rank = (jnp.cumsum(fetches) - fetches).astype(jnp.int32)
    at = jnp.where(fetches, step, length)
    first_from = lax.cummin(at, reverse=True)  # first fetching step >= s
    nxt = jnp.concatenate([first_from[1:], jnp.full((1,), length, jnp.int32)]).astype(jnp.int32)
    return rank, nxt


def _gather_scratch(n_lhs: int, kb: int, tm: int, tk: int, dtype) -> list:
    """Landing buffers, dense tiles (one each per lhs) and the two DMA semaphores of a `_RowGather`."""
    return (
        [pltpu.VMEM((2, kb, tm, 1, tk), dtype) for _ in range(n_lhs)]
        + [pltpu.VMEM((kb, tm, tk), dtype) for _ in range(n_lhs)]
        + [pltpu.SemaphoreType.DMA((2,))]
    )


def _gather_scratch_bytes(n_lhs: int, kb: int, tm: int, tk: int, itemsize: int) -> int:
    # The landing buffer's size-1 sublane axis pads to a full packed row pair for 16-bit types (measured: a bf16
    # [tm, 1, tk] buffer takes twice its nominal VMEM), so count 4 bytes per element there.
    return n_lhs * kb * tm * tk * (2 * max(itemsize, 4) + itemsize)


def _load_weight(ref, quant, scale_ref, dtype, mask_k, k_axis: int):
    """One weight tile in the matmul dtype. Float: as stored (overhanging k columns zeroed by `mask_k`). Quantized,
    "epilogue": the int8 / fp8 values converted (exact in bf16 and float32; the scale is applied to the accumulator).
    "tile": dequantised here, each `block` rows of the tile (tile axis 0: the weight's own K axis, with or without
    transpose) times their scale row, in float32, then rounded to the matmul dtype; the overhang mask comes after
    the scale (garbage scale rows past the array may be NaN)."""
    if quant is None:
        return mask_k(ref[...], k_axis)
    if quant[0] == "epilogue":
        return mask_k(ref[...], k_axis).astype(dtype)
    block = quant[1]
    w = ref[...].astype(jnp.float32)  # [rows, cols]
    sc = scale_ref[...]  # [rows / block (or 1), cols]
    if sc.shape[0] == 1:
        w = w * sc
    else:
        w = jnp.concatenate([w[j * block:(j + 1) * block] * sc[j:j + 1] for j in range(w.shape[0] // block)], axis=0)
    return mask_k(w, k_axis).astype(dtype)


def _gmm_kernel(plan: _GmmPlan, terms, epilogue, precision, max_steps: int):
    """Kernel body for grid (n tile, schedule step, k tile); refs: 3 scalar-prefetch (+ lhs_rows when gathering),
    inputs, outputs, accumulators (+ gather scratch and DMA semaphores)."""
    tm, tk, tn = plan.block.tm, plan.block.tk, plan.block.tn
    k_rem = plan.k % tk
    dims = (((1,), (1,)), ((), ())) if plan.transpose_rhs else (((1,), (0,)), ((), ()))
    n_sc = plan.n_scales
    n_in = plan.n_lhs + plan.n_rhs + n_sc + plan.n_extra
    n_acc = len(terms)
    gather = plan.gather_from > 0
    quant = plan.rhs_quant or (None,) * plan.n_rhs
    scale_index = {}  # rhs index -> position among the scale refs
    for ri, q in enumerate(quant):
        if q is not None:
            scale_index[ri] = len(scale_index)

    def kernel(offsets_ref, group_ids_ref, tile_ids_ref, *refs):
        if gather:
            rows_ref, refs = refs[0], refs[1:]
        if plan.group_offset:  # read by the index maps only
            refs = refs[1:]
        if gather:
            landing, tiles = refs[-1 - 2 * plan.n_lhs : -1 - plan.n_lhs], refs[-1 - plan.n_lhs : -1]
            sems, refs = refs[-1], refs[: -1 - 2 * plan.n_lhs]
        lhs_refs = refs[: plan.n_lhs]
        rhs_refs = refs[plan.n_lhs : plan.n_lhs + plan.n_rhs]
        scale_refs = refs[plan.n_lhs + plan.n_rhs : plan.n_lhs + plan.n_rhs + n_sc]
        extra_refs = refs[plan.n_lhs + plan.n_rhs + n_sc : n_in]
        out_refs = refs[n_in:-n_acc]
        acc_refs = refs[-n_acc:]
        step, k_i = pl.program_id(1), pl.program_id(2)
        group = group_ids_ref[step]
        is_padding = group >= plan.num_groups

        @pl.when(k_i == 0)
        def _zero():
            for acc in acc_refs:
                acc[...] = jnp.zeros_like(acc)

        def mask_k(x, k_axis):
            if k_rem:  # the last k block overhangs K: zero its garbage columns before they reach the dot
                col = lax.broadcasted_iota(jnp.int32, x.shape, k_axis) + k_i * tk
                x = jnp.where(col < plan.k, x, jnp.zeros_like(x))
            return x

        if gather:
            gatherer = _RowGather(rows_ref, lhs_refs, landing, sems, m=plan.m, t=plan.gather_from, tm=tm, tk=tk,
                                  k_blocks=[(kk * tk, kk) for kk in range(plan.tiles_k)])
            num_steps = pl.num_programs(1)  # at the top level: the generic interpreter substitutes it only here

            # Real steps are a prefix of the schedule (padding is its tail group), so the fetching steps are
            # 0, 1, ..., and step s + 1 fetches iff it exists and is real.
            nxt = jnp.minimum(step + 1, max_steps - 1)

            @pl.when((k_i == 0) & jnp.logical_not(is_padding))
            def _gather():
                gatherer.double_buffered(
                    first=step == 0, slot=lax.rem(step, 2), next_step=nxt,
                    has_next=(step + 1 < num_steps) & (group_ids_ref[nxt] < plan.num_groups),
                    tile_ids_ref=tile_ids_ref, step=step, tiles=tiles,
                )

        @pl.when(jnp.logical_not(is_padding))
        def _accumulate():
            if gather:  # K % tk == 0 here: no overhanging columns
                xs = [tile[k_i] for tile in tiles]  # [tm, tk]
            else:
                xs = [mask_k(r[...], 1) for r in lhs_refs]  # [tm, tk]
            ws = [_load_weight(r, quant[ri], scale_refs[scale_index[ri]] if ri in scale_index else None,
                               xs[0].dtype, mask_k, 1 if plan.transpose_rhs else 0)
                  for ri, r in enumerate(rhs_refs)]  # [tk, tn] / [tn, tk]
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
            accs = [a[...] for a in acc_refs]
            for ai, products in enumerate(terms):  # per-channel weight scales: once, on the float32 accumulator
                ri = products[0][1]
                if quant[ri] is not None and quant[ri][0] == "epilogue":
                    accs[ai] = accs[ai] * scale_refs[scale_index[ri]][...]  # [tm, tn] x [1, tn]
            outs = epilogue(accs, [e[...].astype(jnp.float32) for e in extra_refs])
            for out_ref, val in zip(out_refs, outs):
                val = jnp.where(is_padding, 0.0, val)
                out_ref[...] = jnp.where(own, val, out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)

    return kernel


def _gmm_block_specs(plan: _GmmPlan, n_out: int):
    """Index maps. Padding steps compute nothing, so their input blocks are pinned (k block and, for lhs and extras,
    the first padding row tile): consecutive padding steps then issue no DMAs. Outputs follow the real tile. A gathered
    lhs stays in HBM (pl.ANY): the kernel copies its rows itself."""
    tm, tk, tn = plan.block.tm, plan.block.tk, plan.block.tn
    last_k, last_tile, g_max = plan.tiles_k - 1, metadata.num_row_tiles(plan.m, tm) - 1, plan.num_groups

    # Index maps get (grid indices, scalar-prefetch refs): offsets, group ids, tile ids (, lhs_rows when gathering).
    def input_tile_and_k(step, k_i, offsets, group_ids, tile_ids):
        real = group_ids[step] < g_max
        # lax.div, not //: floor division lowers through `sign`, whose Mosaic rule queries the local device kind
        # and so breaks ahead-of-time compiles from a CPU host; offsets are >= 0, so truncation is the same.
        pad_tile = jnp.minimum(lax.div(offsets[g_max], jnp.int32(tm)), last_tile)
        return jnp.where(real, tile_ids[step], pad_tile), jnp.where(real, k_i, last_k)

    def lhs_map(n_i, step, k_i, offsets, group_ids, tile_ids, *_):
        return input_tile_and_k(step, k_i, offsets, group_ids, tile_ids)

    def rhs_map(n_i, step, k_i, offsets, group_ids, tile_ids, *rest):
        _, kb = input_tile_and_k(step, k_i, offsets, group_ids, tile_ids)
        g = jnp.minimum(group_ids[step], g_max - 1)
        if plan.group_offset:  # the layer's groups within the [L * G] stack (the last scalar-prefetch operand)
            g = g + rest[-1][0]
        return (g, n_i, kb) if plan.transpose_rhs else (g, kb, n_i)

    def extra_map(n_i, step, k_i, offsets, group_ids, tile_ids, *_):
        return input_tile_and_k(step, k_i, offsets, group_ids, tile_ids)[0], n_i

    def out_map(n_i, step, k_i, offsets, group_ids, tile_ids, *_):
        return tile_ids[step], n_i

    def scale_spec(q):
        # The scale [G, rows, cols] of a weight stored [G, K_w, N_w]: rows = K_w / block (1: per channel).
        # Without transpose the tile's rows are k (tk of K_w), else n (tn of K_w).
        along = tn if plan.transpose_rhs else tk
        r = 1 if q[0] == "epilogue" or q[1] >= (plan.n if plan.transpose_rhs else plan.k) else along // q[1]

        def scale_map(n_i, step, k_i, offsets, group_ids, tile_ids, *rest):
            # rhs block (g, k, n), or (g, n, k) transposed: the scale's row blocks follow the weight's K_w blocks
            g, a, b = rhs_map(n_i, step, k_i, offsets, group_ids, tile_ids, *rest)
            return (g, a if r > 1 else 0, b)

        return pl.BlockSpec((None, r, tk if plan.transpose_rhs else tn), scale_map)

    rhs_block = (None, tn, tk) if plan.transpose_rhs else (None, tk, tn)
    lhs_spec = pl.BlockSpec(memory_space=pl.ANY) if plan.gather_from else pl.BlockSpec((tm, tk), lhs_map)
    in_specs = (
        [lhs_spec] * plan.n_lhs
        + [pl.BlockSpec(rhs_block, rhs_map)] * plan.n_rhs
        + [scale_spec(q) for q in (plan.rhs_quant or ()) if q is not None]
        + [pl.BlockSpec((tm, tn), extra_map)] * plan.n_extra
    )
    return in_specs, [pl.BlockSpec((tm, tn), out_map)] * n_out


def _gmm_cost(plan: _GmmPlan, itemsize: int, extra_itemsize: int, out_itemsizes, n_products: int, transc: int,
              rhs_itemsizes: Sequence[int] | None = None, scale_rows: Sequence[int] = ()):
    """(CostEstimate, bytes of one set of pipeline blocks, scratch bytes). HBM model: lhs streamed (or its rows
    gathered) once per n tile; weights once per (group, n tile) when the contraction is one block, else once per
    schedule step (worst case), each at its stored itemsize (1 byte for int8 / fp8) plus its float32 scale rows
    (`scale_rows`: rows of each scale, per quantized rhs). A gathered lhs is no pipeline block: its two [tm, K] row
    slots are scratch. With a group offset (the weights are [L * G, ...] stacks) only the layer's G groups count."""
    m, k, n = plan.m, plan.k, plan.n
    tm, tk, tn = plan.block.tm, plan.block.tk, plan.block.tn
    weight_reads = plan.num_groups if plan.tiles_k == 1 else metadata.max_steps(m, tm, plan.num_groups + 1)
    gather = plan.gather_from > 0
    rhs_itemsizes = [itemsize] * plan.n_rhs if rhs_itemsizes is None else list(rhs_itemsizes)
    scale_cols = k if plan.transpose_rhs else n  # a scale row spans the weight's output channels
    cost = pl.CostEstimate(
        flops=2 * m * k * n * n_products,
        transcendentals=transc * m * n,
        bytes_accessed=(
            plan.n_lhs * m * k * itemsize * plan.tiles_n
            + (4 * m if gather else 0)  # lhs_rows (scalar prefetch, read once)
            + sum(weight_reads * k * n * isz for isz in rhs_itemsizes)
            + sum(weight_reads * r * scale_cols * 4 for r in scale_rows)
            + plan.n_extra * m * n * extra_itemsize
            + m * n * sum(out_itemsizes)
        ),
    )
    block_bytes = (
        (0 if gather else plan.n_lhs * tm * tk * itemsize)
        + sum(tk * tn * isz for isz in rhs_itemsizes)
        + sum(8 * max(tk, tn) * 4 for _ in scale_rows)  # scale blocks: at most a few rows
        + plan.n_extra * tm * tn * extra_itemsize
        + tm * tn * sum(out_itemsizes)
    )
    scratch_bytes = _gather_scratch_bytes(plan.n_lhs, plan.tiles_k, tm, tk, itemsize) if gather else 0
    return cost, block_bytes, scratch_bytes


def _quant_modes(rhs, rhs_scales, terms, transpose_rhs: bool, what: str) -> tuple:
    """Per rhs: None or its scale mode (see `_GmmPlan.rhs_quant`), from the scales' shapes [G, K_w / block, N_w]."""
    modes = []
    for ri, (r, sc) in enumerate(zip(rhs, rhs_scales)):
        if sc is None:
            modes.append(None)
            continue
        g, k_w, n_w = r.shape
        if sc.ndim != 3 or sc.shape[0] != g or sc.shape[2] != n_w or k_w % sc.shape[1]:
            raise ValueError(f"{what}: the scale of rhs {ri} ({tuple(r.shape)}) is {tuple(sc.shape)}; it must be "
                             f"[G, 1, N] (per channel) or [G, K / block, N] (sub-channel along K)")
        alone = all(all(p[1] == ri for p in products) for products in terms if any(p[1] == ri for p in products))
        if sc.shape[1] == 1 and not transpose_rhs and alone:
            modes.append(("epilogue",))
        else:
            modes.append(("tile", k_w // sc.shape[1]))
    return tuple(modes)


def _fit_scale_tiles(block: BlockSizes, modes, k: int, n: int, transpose_rhs: bool, default: bool) -> BlockSizes:
    """Sub-channel scales in tile mode load `along / block` scale rows per tile (along: tk, or tn with transposed
    weights), which must be a multiple of 8 or all of them: the tile along the weight's K must be all of it or a
    multiple of 8 x block. Default tiles are shrunk / grown to that; explicit ones that break it raise."""
    for q in modes:
        if q is None or q[0] != "tile":
            continue
        dim, name = (n, "tn") if transpose_rhs else (k, "tk")
        bk = q[1]
        if bk >= dim:
            continue
        along = getattr(block, name)
        if along >= dim or along % (8 * bk) == 0:
            continue
        if not default:
            raise ValueError(f"BlockSizes.{name}={along} with sub-channel scales of {bk} rows: it must be a "
                             f"multiple of {8 * bk} or cover the whole dimension ({dim})")
        fixed = max(8 * bk, along // (8 * bk) * 8 * bk)
        block = dataclasses.replace(block, **{name: dim if fixed >= dim else fixed})
    return block


def _check_rows(lhs_rows, lhs_shape, what: str) -> int:
    """Validate a gather index for an unsorted lhs of `lhs_shape` ([T, K]); returns M, the sorted rows."""
    if not hasattr(lhs_rows, "dtype") or lhs_rows.dtype != jnp.int32 or lhs_rows.ndim != 1 or lhs_rows.shape[0] < 1:
        got = f"{lhs_rows.dtype} {lhs_rows.shape}" if hasattr(lhs_rows, "dtype") else type(lhs_rows).__name__
        raise ValueError(
            f"{what} lhs_rows must be a 1-D int32 [M] array (M >= 1 sorted rows, row r read from lhs[lhs_rows[r]]), "
            f"got {got}"
        )
    if len(lhs_shape) != 2 or lhs_shape[0] < 1:
        raise ValueError(f"{what} with lhs_rows: lhs must be [T, K] with T >= 1 unsorted rows, got {lhs_shape}")
    return lhs_rows.shape[0]


def _gather_default(block: BlockSizes, k: int) -> BlockSizes:
    """Default tiles for a gathered lhs: tk must divide K, so shrink it to the largest 128-multiple divisor of K, or
    take all of K in one k tile when there is none."""
    if k % block.tk == 0:
        return block
    tk = next((c for c in range(block.tk // 128 * 128, 0, -128) if k % c == 0), k)
    return dataclasses.replace(block, tk=tk)


def _check_gather_tiles(k: int, tk: int, what: str):
    if k % tk:
        raise ValueError(
            f"{what} with lhs_rows gathers whole rows and slices k tiles out of them: K={k} must be a multiple of "
            f"tk={tk} (or use one k tile, tk >= K)"
        )


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
    lhs_rows: jax.Array | None = None,
    rhs_scales: Sequence[jax.Array | None] | None = None,
    layer: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Grouped matmuls with float32 accumulators and a fused epilogue; returns one [M, N] array per epilogue output.

    lhs: arrays [M, K]; rhs: arrays [G, K, N] ([G, N, K] with transpose_rhs); group_sizes [G] int32, sum <= M.
    terms[a] lists the (lhs index, rhs index) products summed into accumulator a; the epilogue maps the accumulators
    (and the `extras`, [M, N] row-aligned arrays read at the output tile) to the outputs, cast to `out_dtypes`.
    Rows at or past sum(group_sizes) come out as zeros.
    lhs_rows: optional int32 [M] fused gather; then every lhs is unsorted [T, K] (any T >= 1) and row r of the sorted
    layout is lhs[lhs_rows[r]] (values clamped to [0, T - 1]). The kernel copies those rows from HBM itself, so the
    sorted [M, K] copy never exists. Needs K % tk == 0 (or one k tile).
    rhs_scales: per rhs None (float, the lhs dtype) or the float32 scale of a quantized (int8 / float8_e4m3fn) rhs
    stored [G, K_w, N_w] (K_w = K, or N with transpose_rhs): [G, 1, N_w] per output channel, applied to the
    accumulator before the epilogue when that accumulator sums only this rhs, or [G, K_w / block, N_w] sub-channel;
    otherwise each weight tile is dequantised in VMEM (float32 x scale, rounded to the lhs dtype) before the dot.
    The weights stream from HBM at their stored size (`pallas.gmm.quant`).
    layer: optional int32 scalar. Then every rhs (and scale) is a whole stack over L layers, [L, G, K, N] ([L, G, N,
    K] transposed; scales [L, G, K_w / block, N_w]), of which layer `layer` (clamped to [0, L - 1]) is used: the
    kernel reads its experts in place (the stack goes in as [L * G, ...], a free reshape, and a scalar-prefetch
    offset layer * G is added to the group in the weight and scale index maps), so the layer's [G, K, N] slice is
    never copied. group_sizes stay the layer's G.
    """
    lhs, rhs, extras = tuple(lhs), tuple(rhs), tuple(extras)
    rhs_scales = (None,) * len(rhs) if rhs_scales is None else tuple(rhs_scales)
    group_offset = None
    if layer is not None:
        rhs, rhs_scales, group_offset = _flatten_stacks(rhs, rhs_scales, layer)
    dtype = _check_operands(lhs, rhs, group_sizes, rhs_scales)
    t, k = lhs[0].shape
    if any(a.shape != (t, k) for a in lhs):
        raise ValueError(f"all lhs must share one [M, K] shape, got {[a.shape for a in lhs]}")
    m = t if lhs_rows is None else _check_rows(lhs_rows, lhs[0].shape, "grouped_matmul")
    num_groups = rhs[0].shape[0] if layer is None else group_sizes.shape[0]
    stack_groups = rhs[0].shape[0]
    n = rhs[0].shape[1] if transpose_rhs else rhs[0].shape[2]
    want = (stack_groups, n, k) if transpose_rhs else (stack_groups, k, n)
    if any(a.shape != want for a in rhs):
        raise ValueError(f"rhs must all be {want} for lhs [{m}, {k}], got {[a.shape for a in rhs]}")
    if group_sizes.shape != (num_groups,):
        raise ValueError(f"group_sizes must be [{num_groups}] (one per rhs group), got {group_sizes.shape}")
    if any(e.shape != (m, n) or e.dtype != extras[0].dtype for e in extras):
        raise ValueError(f"epilogue extras must be [{m}, {n}] of one dtype, got {[(e.shape, e.dtype) for e in extras]}")
    modes = _quant_modes(rhs, rhs_scales, terms, transpose_rhs, "grouped_matmul")
    default = block is None
    if block is None:
        block = get_default(m, k, n, kind="gmm", num_rhs=len(rhs), itemsize=dtype.itemsize)
        block = block if lhs_rows is None else _gather_default(block, k)
    block = _fit_scale_tiles(block.fit(m, k, n), modes, k, n, transpose_rhs, default).fit(m, k, n)
    gather_from = 0 if lhs_rows is None else t
    plan = _GmmPlan(m, k, n, num_groups, block, len(lhs), len(rhs), len(extras), transpose_rhs, gather_from, modes,
                    group_offset is not None)
    tm, tn = block.tm, block.tn
    if gather_from:
        _check_gather_tiles(k, block.tk, "grouped_matmul")

    sched = metadata.make_schedule(group_sizes, m=m, tm=tm, tail_group=True, visit_empty=False)
    max_steps = sched.group_ids.shape[0]
    in_specs, out_specs = _gmm_block_specs(plan, len(out_dtypes))
    out_itemsizes = [jnp.dtype(dt).itemsize for dt in out_dtypes]
    extra_itemsize = extras[0].dtype.itemsize if extras else 0
    n_products = sum(len(products) for products in terms)
    cost, block_bytes, gather_bytes = _gmm_cost(plan, dtype.itemsize, extra_itemsize, out_itemsizes, n_products,
                                                transcendentals_per_out, [r.dtype.itemsize for r in rhs],
                                                [sc.shape[1] for sc in rhs_scales if sc is not None])
    scratch = [pltpu.VMEM((tm, tn), jnp.float32) for _ in terms]
    prefetch = [sched.offsets, sched.group_ids, sched.tile_ids]
    if gather_from:
        scratch += _gather_scratch(len(lhs), plan.tiles_k, tm, block.tk, dtype)
        prefetch.append(lhs_rows)
    if group_offset is not None:
        prefetch.append(group_offset)
    call = pl.pallas_call(
        _gmm_kernel(plan, terms, epilogue, _dot_precision(dtype), max_steps),
        out_shape=[jax.ShapeDtypeStruct((m, n), dt) for dt in out_dtypes],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            in_specs=in_specs,
            out_specs=out_specs,
            grid=(plan.tiles_n, sched.num_steps, plan.tiles_k),
            scratch_shapes=scratch,
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(block_bytes, len(terms) * tm * tn * 4 + gather_bytes),
        ),
        interpret=resolve_interpret(interpret),
        cost_estimate=cost,
        name=(("ming_gmm_gather" if gather_from else "ming_gmm") + ("_q" if plan.n_scales else "")
              + ("_stacked" if group_offset is not None else "")),
    )
    if gather_from:  # rows on a leading (untiled) axis, so one row is one DMA (see _RowGather)
        lhs = tuple(a.reshape(t, 1, k) for a in lhs)
    return tuple(call(*prefetch, *lhs, *rhs, *(sc for sc in rhs_scales if sc is not None), *extras))


def _flatten_stacks(rhs, rhs_scales, layer):
    """[L, G, ...] weight (and scale) stacks -> [L * G, ...] (free reshapes of contiguous arrays) and the int32 [1]
    group offset layer * G of `grouped_matmul`'s `layer`."""
    if any(a.ndim != 4 or a.shape[:2] != rhs[0].shape[:2] for a in rhs):
        raise ValueError(f"grouped_matmul with layer: rhs must be [L, G, K, N] stacks of one [L, G], got "
                         f"{[a.shape for a in rhs]}")
    n_layers, g = rhs[0].shape[:2]
    if any(sc is not None and (sc.ndim != 4 or sc.shape[:2] != (n_layers, g)) for sc in rhs_scales):
        raise ValueError(f"grouped_matmul with layer: scales must be [L={n_layers}, G={g}, rows, N] stacks, got "
                         f"{[None if sc is None else sc.shape for sc in rhs_scales]}")
    layer = jnp.asarray(layer)
    if layer.shape != () or not jnp.issubdtype(layer.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: layer must be an integer scalar, got {layer.dtype} {layer.shape}")
    offset = (jnp.clip(layer.astype(jnp.int32), 0, n_layers - 1) * g).reshape(1)
    flat = lambda a: a.reshape(n_layers * g, *a.shape[2:])  # noqa: E731
    return (tuple(flat(a) for a in rhs), tuple(None if sc is None else flat(sc) for sc in rhs_scales), offset)


def _tgmm_kernel(n_out: int, tm: int, dtype, gather: dict | None, max_steps: int):
    """Kernel body for grid (n tile, k tile, schedule step): accumulate lhs^T @ rhs over a group's row tiles, store
    when the group ends; rows outside the group (other groups, or overhanging past M) are zeroed on both sides.
    gather (lhs_rows given): dict(m, t, tk): the lhs rows come from the unsorted [T, 1, K] lhs in HBM, per (n, k)
    tile double-buffered across the steps of non-empty groups."""
    precision = _dot_precision(dtype)

    def kernel(offsets_ref, group_ids_ref, tile_ids_ref, *refs):
        if gather:
            rows_ref, rank_ref, next_ref, lhs_ref, refs = refs[0], refs[1], refs[2], refs[3], refs[4:]
            (landing,), (tile,), sems, refs = refs[-3:-2], refs[-2:-1], refs[-1], refs[:-3]
        else:
            lhs_ref, refs = refs[0], refs[1:]
        rhs_refs = refs[:n_out]
        out_refs = refs[n_out : 2 * n_out]
        acc_refs = refs[2 * n_out :]
        k_i, step = pl.program_id(1), pl.program_id(2)
        num_steps = pl.num_programs(2)
        last = num_steps - 1
        group = group_ids_ref[step]
        first_visit = (step == 0) | (group_ids_ref[jnp.maximum(step - 1, 0)] != group)
        last_visit = (step == last) | (group_ids_ref[jnp.minimum(step + 1, last)] != group)
        start, end = offsets_ref[group], offsets_ref[group + 1]

        @pl.when(first_visit)
        def _zero():
            for acc in acc_refs:
                acc[...] = jnp.zeros_like(acc)

        if gather:
            tk = gather["tk"]
            gatherer = _RowGather(rows_ref, (lhs_ref,), (landing,), sems, m=gather["m"], t=gather["t"], tm=tm, tk=tk,
                                  k_blocks=[(pl.multiple_of(k_i * tk, tk), 0)])

            # Empty groups' steps (visited to store zeros) fetch nothing and may sit between fetching steps: the
            # chain follows the precomputed fetch ranks and next fetching steps instead of step parity.
            rank, nxt = rank_ref[step], next_ref[step]

            @pl.when(end > start)
            def _gather():
                gatherer.double_buffered(
                    first=rank == 0, slot=lax.rem(rank, 2), next_step=jnp.minimum(nxt, max_steps - 1),
                    has_next=nxt < num_steps, tile_ids_ref=tile_ids_ref, step=step, tiles=(tile,),
                )

        @pl.when(end > start)
        def _accumulate():
            row0 = tile_ids_ref[step] * tm

            def own_rows(x):
                # Rows of other groups and overhanging rows past M (garbage, maybe NaN) must add nothing.
                x = x.astype(jnp.float32)
                rows = lax.broadcasted_iota(jnp.int32, x.shape, 0) + row0
                return jnp.where((rows >= start) & (rows < end), x, 0.0).astype(dtype)

            x = own_rows(tile[0] if gather else lhs_ref[...])  # [tm, tk]
            for acc, r in zip(acc_refs, rhs_refs):
                acc[...] += lax.dot_general(
                    x, own_rows(r[...]), (((0,), (0,)), ((), ())), precision=precision,
                    preferred_element_type=jnp.float32,
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
    lhs_rows: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """tgmm: out_t[g] = lhs[rows of g]^T @ rhs_t[rows of g] -> one [G, K, N] array per rhs (float32 accumulation).

    lhs [M, K], each rhs [M, N]; rows at or past sum(group_sizes) contribute nothing; empty groups give zeros.
    lhs_rows: optional int32 [M] fused gather, as in `grouped_matmul`: lhs is then the unsorted [T, K] and sorted row
    r is lhs[lhs_rows[r]] (values clamped to [0, T - 1]). Needs K % tk == 0 (or one k tile).
    """
    rhs = tuple(rhs)
    dtype = _check_operands((lhs,), rhs, group_sizes)
    t, k = lhs.shape
    m = t if lhs_rows is None else _check_rows(lhs_rows, lhs.shape, "transposed_grouped_matmul")
    n = rhs[0].shape[1]
    if any(r.shape != (m, n) for r in rhs):
        raise ValueError(f"tgmm rhs must all be [{m}, {n}] like lhs rows, got {[r.shape for r in rhs]}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D [G], got {group_sizes.shape}")
    num_groups = group_sizes.shape[0]
    if block is None:
        block = get_default(m, k, n, kind="tgmm", num_rhs=len(rhs), itemsize=dtype.itemsize)
        block = block if lhs_rows is None else _gather_default(block, k)
    block = block.fit(m, k, n)
    tm, tk, tn = block.tm, block.tk, block.tn
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    n_out = len(rhs)
    gather = None
    if lhs_rows is not None:
        _check_gather_tiles(k, tk, "transposed_grouped_matmul")
        gather = dict(m=m, t=t, tk=tk)

    sched = metadata.make_schedule(group_sizes, m=m, tm=tm, tail_group=False, visit_empty=True)
    kernel = _tgmm_kernel(n_out, tm, dtype, gather, sched.group_ids.shape[0])

    def lhs_map(n_i, k_i, step, offsets, group_ids, tile_ids, *_):
        return tile_ids[step], k_i

    def rhs_map(n_i, k_i, step, offsets, group_ids, tile_ids, *_):
        return tile_ids[step], n_i

    def out_map(n_i, k_i, step, offsets, group_ids, tile_ids, *_):
        return group_ids[step], k_i, n_i

    itemsize = dtype.itemsize
    out_itemsize = jnp.dtype(out_dtype).itemsize
    lhs_block_bytes = 0 if gather else tm * tk * itemsize
    block_bytes = lhs_block_bytes + n_out * (tm * tn * itemsize + tk * tn * out_itemsize)
    gather_bytes = _gather_scratch_bytes(1, 1, tm, tk, itemsize) if gather else 0
    cost = pl.CostEstimate(
        flops=2 * m * k * n * n_out,
        transcendentals=0,
        bytes_accessed=(
            m * k * itemsize * tiles_n  # lhs tiles, or its gathered rows, once per n tile
            + (4 * m if gather else 0)
            + n_out * m * n * itemsize * tiles_k
            + n_out * num_groups * k * n * out_itemsize
        ),
    )
    lhs_spec = pl.BlockSpec(memory_space=pl.ANY) if gather else pl.BlockSpec((tm, tk), lhs_map)
    scratch = [pltpu.VMEM((tk, tn), jnp.float32) for _ in rhs]
    prefetch = [sched.offsets, sched.group_ids, sched.tile_ids]
    if gather:
        scratch += _gather_scratch(1, 1, tm, tk, dtype)
        prefetch += [lhs_rows, *_fetch_chain(sched)]
        lhs = lhs.reshape(t, 1, k)  # rows on a leading (untiled) axis, so one row is one DMA (see _RowGather)
    call = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((num_groups, k, n), out_dtype) for _ in rhs],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            in_specs=[lhs_spec] + [pl.BlockSpec((tm, tn), rhs_map) for _ in rhs],
            out_specs=[pl.BlockSpec((None, tk, tn), out_map) for _ in rhs],
            grid=(tiles_n, tiles_k, sched.num_steps),
            scratch_shapes=scratch,
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=_vmem_limit(block_bytes, n_out * tk * tn * 4 + gather_bytes),
        ),
        interpret=resolve_interpret(interpret),
        cost_estimate=cost,
        name="ming_tgmm_gather" if gather else "ming_tgmm",
    )
    return tuple(call(*prefetch, lhs, *rhs))
