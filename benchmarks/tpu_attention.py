"""Ahead-of-time TPU cost of attention at Ling-flash shapes, compiled for named TPU topologies from a CPU host.

Three implementations of causal grouped-query attention (32 query heads, 4 KV heads, head 128, bf16, batch 1, one
chip), forward and forward + backward, at S = 4096 and 32768:
  ours          `ming_jax.pallas.attention.api.attention` ("auto" -> splash): KV heads not repeated, 512 tiles, causal + segment ids
                (the padding information the model has), the three splash kernels (fwd, dq, dkv);
  splash_plain  jax's splash as a first-time caller would wire it: KV heads repeated to 32 with jnp.repeat, jax's
                default 128 tiles, causal mask only (no segment ids, so padding is not masked);
  xla           the reference `attend` (einsum + float32 softmax over the dense [T, S] mask), what "xla" runs.

Nothing is timed: there is no TPU on this host, so run time cannot be measured. Every number is the TPU compiler's
static analysis for one chip, with one caveat that matters here: XLA cannot see inside a Mosaic kernel, so for the
splash rows its cost analysis covers only the glue (transposes, repeats, the backward's d_out . out), and the kernel
work is MODELLED from the kernel's own block grid (the non-empty (q tile, kv tile) pairs of its mask metadata):
  flops  2 * bq * bkv * hd per matmul per visited tile and head: fwd 2 matmuls, dq 3, dkv 4;
  bytes  q / o / dq / d_out rows once per head and kernel, a k and v tile per visited tile (dkv: a q and d_out tile
         per visited tile), float32 softmax statistics as the kernels lay them out.
"roofline ms" = max(flops / peak, bytes / HBM bandwidth) from those totals and the chip's spec sheet
(`pltpu.get_tpu_info_for_chip`): a lower bound, not a timing.

  JAX_PLATFORMS=cpu python -m benchmarks.tpu_attention --topologies=v5p:2x2x1,v6e:2x2 --seqs=4096,32768
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from benchmarks.tpu_aot import chip_info, one_chip_args, write_results
from ming_jax.pallas.attention import api as ops
from ming_jax.pallas.attention.reference import attend
from ming_jax.pallas.attention import kernel as splash_kernel

_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5p:2x2x1", "v6e:2x2"], "TPU topologies to compile for.")
_SEQS = flags.DEFINE_list("seqs", ["4096", "32768"], "Sequence lengths (T = S).")
_IMPLS = flags.DEFINE_list("impls", ["ours", "splash_plain", "xla"], "Implementations.")
_OPS = flags.DEFINE_list("ops", ["fwd", "fwd_bwd"], "fwd: attention; fwd_bwd: gradients of q, k, v.")
_HEADS = flags.DEFINE_integer("heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "KV heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim.")
_JSON = flags.DEFINE_string("json", "", "JSON results path (default: <tmpdir>/ming_jax_tpu_attention.json).")

_LANES, _SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class Shape:
    h: int
    kv: int
    hd: int
    t: int
    itemsize: int = 2  # bf16


@dataclasses.dataclass(frozen=True)
class Program:
    op: str
    impl: str
    t: int
    fn: Callable
    shapes: tuple
    useful_flops: float
    kernel_model: Callable[[], tuple[float, float]] | None  # (flops, bytes) of the Mosaic kernels; None: no kernel


# ----------------------------------------------------------------------------------------------------- models


def _visited_tiles(kern) -> tuple[int, int, int]:
    """Non-empty (q tile, kv tile) pairs per head of the fwd, dq and dkv grids (all heads share one mask here)."""

    def count(info):
        return int(np.count_nonzero(np.asarray(info.block_mask))) // np.asarray(info.block_mask).shape[0]

    return count(kern.fwd_mask_info), count(kern.dq_mask_info), count(kern.dkv_mask_info)


def splash_model(s: Shape, kv_heads: int, blocks: splash_kernel.BlockSizes, kern, train: bool):
    """(flops, HBM bytes) of the splash kernels for one batch row; see the module docstring."""
    fwd_tiles, dq_tiles, dkv_tiles = _visited_tiles(kern)
    e, hd, t, h = s.itemsize, s.hd, s.t, s.h
    row = t * hd * e  # one head's q (or o, dq, d_out) rows
    flops = h * fwd_tiles * 2 * (2 * blocks.block_q * blocks.block_kv * hd)
    nbytes = h * (2 * row + fwd_tiles * 2 * blocks.block_kv * hd * e)  # q in, o out; k, v tiles
    if not train:
        return flops, nbytes
    nbytes += h * t * _LANES * 4  # forward with residuals: logsumexp, [bq, 128 lanes] float32 blocks
    flops += h * dq_tiles * 3 * (2 * blocks.block_q_dq * blocks.block_kv_dq * hd)
    nbytes += h * (3 * row + 2 * t * 4 + dq_tiles * 2 * blocks.block_kv_dq * hd * e)  # q, d_out, dq; lse, di; k, v
    flops += h * dkv_tiles * 4 * (2 * blocks.block_q_dkv * blocks.block_kv_dkv * hd)
    nbytes += (h * 2 * t * hd * e  # k, v tiles once per (kv tile, head)
               + kv_heads * 2 * t * hd * e  # dk, dv written once per KV head
               + h * dkv_tiles * (2 * blocks.block_q_dkv * hd * e + 2 * _SUBLANES * blocks.block_q_dkv * 4))
    return flops, nbytes


def causal_useful_flops(s: Shape, train: bool) -> float:
    """Algorithmic flops: 2 * hd per (query, visible key) per matmul, t (t + 1) / 2 visible pairs per head; matmuls:
    forward q k^T, p v; backward dv = p^T d_o, dp = d_o v^T, dq = ds k, dk = ds^T q (recomputing q k^T is overhead)."""
    pairs = s.h * s.t * (s.t + 1) / 2
    return pairs * 2 * s.hd * (6 if train else 2)


# ----------------------------------------------------------------------------------------------------- programs


def _as_train(fwd):
    def step(q, k, v, seg, d_out):
        def loss(q, k, v):
            return jnp.sum(fwd(q, k, v, seg).astype(jnp.float32) * d_out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return step


def programs() -> list[Program]:
    progs = []
    for t in (int(x) for x in _SEQS.value):
        s = Shape(_HEADS.value, _KV_HEADS.value, _HEAD_DIM.value, t)
        bf16 = jnp.bfloat16
        qs, kvs = ((1, t, s.h, s.hd), bf16), ((1, t, s.kv, s.hd), bf16)
        shapes_fwd = (qs, kvs, kvs, ((1, t), jnp.int32))
        shapes_train = shapes_fwd + (qs,)

        def ours(q, k, v, seg):
            return ops.attention(q, k, v, ops.AttentionMask.self_attention(seg, causal=True))

        ours_blocks = splash_kernel.get_default(t, t)
        ours_kern = splash_kernel.make_kernel(s.h, t, t, True, ours_blocks)

        plain_blocks = splash_kernel.BlockSizes(128, 128)  # = splash.BlockSizes.get_default()
        plain_kern = splash.make_splash_mha_single_device(
            splash.MultiHeadMask([splash.CausalMask((t, t))] * s.h), block_sizes=splash.BlockSizes.get_default())

        def plain(q, k, v, seg, plain_kern=plain_kern, s=s):
            del seg  # a causal mask only: padding is not masked
            rep = s.h // s.kv
            qh = jnp.swapaxes(q * jnp.asarray(s.hd**-0.5, q.dtype), 1, 2)
            kh = jnp.swapaxes(jnp.repeat(k, rep, axis=2), 1, 2)
            vh = jnp.swapaxes(jnp.repeat(v, rep, axis=2), 1, 2)
            return jnp.swapaxes(jax.vmap(plain_kern)(qh, kh, vh), 1, 2)

        def xla(q, k, v, seg, t=t):
            return attend(q, k, v, ops.AttentionMask.self_attention(seg, causal=True).to_dense(t, t))

        impls = {
            "ours": (ours, lambda train, s=s, b=ours_blocks, k=ours_kern: splash_model(s, s.kv, b, k, train)),
            "splash_plain": (plain, lambda train, s=s, b=plain_blocks, k=plain_kern: splash_model(s, s.h, b, k, train)),
            "xla": (xla, None),
        }
        for impl in _IMPLS.value:
            fn, model = impls[impl]
            for op in _OPS.value:
                train = op == "fwd_bwd"
                progs.append(Program(
                    op, impl, t, _as_train(fn) if train else fn, shapes_train if train else shapes_fwd,
                    causal_useful_flops(s, train), None if model is None else (lambda m=model, tr=train: m(tr))))
    return progs


# ----------------------------------------------------------------------------------------------------- compile


def compile_program(topology: str, prog: Program) -> dict:
    """AOT-compile `prog` for one chip of `topology`; return cost analysis, kernel model and memory plan."""
    args = one_chip_args(topology, prog.shapes)
    info = chip_info(topology)
    row = dict(topology=topology, op=prog.op, impl=prog.impl, seq=prog.t, useful_flops=prog.useful_flops,
               measured_ms=None)
    t0 = time.time()
    try:
        compiled = jax.jit(prog.fn).lower(*args).compile()
    except Exception as err:  # noqa: BLE001  a program that does not fit one chip is a result, not a crash
        msg = str(err)
        if "RESOURCE_EXHAUSTED" in msg:  # keep the compiler's own numbers: "... temporaries (X G) exceeds ... (Y G)"
            msg = "does not fit one chip: " + msg.split("Ran out of memory on HBM, ")[-1]
        row.update(compile_s=round(time.time() - t0, 1), error=f"{type(err).__name__}: {msg[:300]}")
        return row
    row["compile_s"] = round(time.time() - t0, 1)
    cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
    xla_flops, xla_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    k_flops, k_bytes = prog.kernel_model() if prog.kernel_model else (0.0, 0.0)
    flops, nbytes = xla_flops + k_flops, xla_bytes + k_bytes
    peak = info.bf16_ops_per_second * info.num_cores
    bw = info.mem_bw_bytes_per_second * info.num_cores
    hbm = info.hbm_capacity_bytes * info.num_cores
    live = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    row.update(
        xla_flops=xla_flops, xla_bytes=xla_bytes, kernel_flops_model=k_flops, kernel_bytes_model=k_bytes,
        flops=flops, bytes_accessed=nbytes, arithmetic_intensity=flops / nbytes if nbytes else float("nan"),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), per_chip_bytes=int(live), fits_hbm=bool(live <= hbm),
        roofline_ms=1e3 * max(flops / peak, nbytes / bw),
    )
    return row


def format_table(rows: list[dict]) -> str:
    head = (f"{'topology':<10} {'seq':>6} {'op':<8} {'impl':<13} {'TFLOP':>8} {'useful':>7} {'GB acc.':>8} "
            f"{'flop/B':>7} {'temp GiB':>9} {'chip GiB':>9} {'fits':>5} {'roofline ms':>11} {'run ms':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['topology']:<10} {r['seq']:>6} {r['op']:<8} {r['impl']:<13} not compiled: "
                         f"{r['error'].split(': ', 1)[-1][:140]}")
            continue
        lines.append(
            f"{r['topology']:<10} {r['seq']:>6} {r['op']:<8} {r['impl']:<13} {r['flops'] / 1e12:8.2f} "
            f"{r['useful_flops'] / max(r['flops'], 1):7.1%} {r['bytes_accessed'] / 1e9:8.2f} "
            f"{r['arithmetic_intensity']:7.0f} {r['temp_bytes'] / 2**30:9.2f} {r['per_chip_bytes'] / 2**30:9.2f} "
            f"{'yes' if r['fits_hbm'] else 'NO':>5} {r['roofline_ms']:11.2f} {'n/a':>7}")
    lines.append(
        "run ms: n/a -- no TPU on this host, nothing was executed. Splash rows: TFLOP / GB = XLA's cost analysis of "
        "the glue + the modelled Mosaic kernels (XLA cannot see inside them). useful = causal algorithmic flops / "
        "TFLOP. chip GiB = arguments + outputs + temporaries on one chip; fits = within the chip's HBM.")
    return "\n".join(lines)


def main(argv):
    del argv
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling needs no chip; another process may hold one
    rows = []
    for prog in programs():
        for topology in _TOPOLOGIES.value:
            row = compile_program(topology, prog)
            rows.append(row)
            print(f"compiled {topology} S={prog.t} {prog.op} {prog.impl} in {row['compile_s']} s", flush=True)
    print(format_table(rows))
    write_results(_JSON.value, "ming_jax_tpu_attention.json", rows,
                  note="static AOT cost analysis for one chip plus a block-grid model of the splash kernels; "
                       "run time not measured (no TPU)")


if __name__ == "__main__":
    app.run(main)
