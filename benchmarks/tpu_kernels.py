"""Ahead-of-time TPU cost of the project's Pallas kernels, compiled for named TPU topologies from a CPU host.

There is no TPU here, so nothing is timed: every number is the TPU compiler's static cost analysis and memory plan
for ONE chip of the topology. Caveats that matter when reading the table:
  * For a Pallas kernel XLA cannot see inside the Mosaic custom call; its flops / bytes are the `pl.CostEstimate` the
    kernel declares (ours: useful flops, and HBM traffic modelled from the tiling; megablox: its own model).
  * "roofline ms" is max(flops / peak, bytes / HBM bandwidth) from those numbers and the chip's spec sheet
    (pltpu.get_tpu_info_for_chip): a lower bound on run time, not a measurement.
  * XLA's ragged_dot on TPU lowers to dense per-expert work: its flops show the waste.

Sections: `gmm` (MoE expert FFN at Ling-flash shapes: ours vs jax's megablox vs XLA ragged_dot, and the permute in
front of it: an XLA gather + our kernel vs the gather fused into our kernel's loads). Add a section by adding a
function to SECTIONS that returns Programs.

  JAX_PLATFORMS=cpu python -m benchmarks.tpu_kernels --topologies=v5p:2x2x1,v6e:2x2 --json=/tmp/tpu_kernels.json
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks.tpu_aot import chip_info, one_chip_args, write_results
from ming_jax.pallas import gmm as ours

_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5p:2x2x1", "v6e:2x2"], "TPU topologies to compile for.")
_SECTIONS = flags.DEFINE_list("sections", ["gmm", "combine"], "Benchmark sections to run.")
_ONLY = flags.DEFINE_list("only", [], "Run only programs whose name contains one of these substrings.")
_JSON = flags.DEFINE_string("json", "", "JSON results path (default: <tmpdir>/ming_jax_tpu_kernels.json).")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens per chip.")
_TOP_K = flags.DEFINE_integer("top_k", 8, "Experts per token.")
_D_MODEL = flags.DEFINE_integer("d_model", 4096, "Model width.")
_D_FF = flags.DEFINE_integer("d_ff", 1024, "Expert FFN width.")
_EXPERTS = flags.DEFINE_integer("experts", 256, "Experts.")

# TensorCores behind one JAX device (megacore chips expose two cores as one device).


@dataclasses.dataclass(frozen=True)
class Program:
    """One jittable function at abstract shapes; `useful_flops` is the algorithmic count (no padding, no waste)."""

    op: str
    impl: str
    fn: Callable
    shapes: tuple
    useful_flops: float


# ----------------------------------------------------------------------------------------------------- gmm


def _megablox():
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.ops")


def gmm_programs() -> list[Program]:
    """Expert FFN h = silu(x Wg) * (x Wu); y = h Wd over T*k expert-sorted rows, bf16, three implementations."""
    m, d, f, e = _TOKENS.value * _TOP_K.value, _D_MODEL.value, _D_FF.value, _EXPERTS.value
    bf16 = jnp.bfloat16
    x, wg, wd, gs, hy = ((m, d), bf16), ((e, d, f), bf16), ((e, f, d), bf16), ((e,), jnp.int32), ((m, f), bf16)
    # megablox uses one tiling for forward and both backward kernels; 512 divides every dim here.
    mb_tiles = (256, 512, 512)

    def mb_gmm(lhs, rhs, sizes):
        return _megablox().gmm(lhs, rhs, sizes, bf16, mb_tiles)

    impls = {
        "ours": (
            lambda x, a, b, s: ours.gmm_glu(x, a, b, s, implementation="pallas"),
            lambda h, w, s: ours.gmm(h, w, s, implementation="pallas"),
        ),
        "megablox": (
            lambda x, a, b, s: (jax.nn.silu(mb_gmm(x, a, s).astype(jnp.float32)) * mb_gmm(x, b, s)).astype(bf16),
            mb_gmm,
        ),
        "xla_ragged_dot": (
            lambda x, a, b, s: ours.gmm_glu(x, a, b, s, implementation="xla"),
            lambda h, w, s: ours.gmm(h, w, s, implementation="xla"),
        ),
    }
    progs = []
    for impl, (glu, down) in impls.items():

        def train(x, w_gate, w_up, w_down, sizes, d_y, glu=glu, down=down):
            def loss(x, w_gate, w_up, w_down):
                y = down(glu(x, w_gate, w_up, sizes), w_down, sizes)
                return jnp.sum(y.astype(jnp.float32) * d_y.astype(jnp.float32))

            return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_gate, w_up, w_down)

        progs += [
            Program("glu_fwd", impl, glu, (x, wg, wg, gs), 4 * m * d * f),
            Program("down_fwd", impl, down, (hy, wd, gs), 2 * m * d * f),
            # Algorithmic minimum under grad: gate/up forward 4 MDF (the down forward is dead, only its VJP is
            # needed), down VJP 2 + 2, gate/up VJP 4 + 4 = 16 MDF. Ours reports 20: its backward recomputes gate/up
            # instead of saving them, trading 4 MDF for two [M, F] residuals per layer.
            Program("ffn_fwd_bwd", impl, train, (x, wg, wg, wd, gs, x), 16 * m * d * f),
        ]
    return progs + gather_programs()


def gather_programs() -> list[Program]:
    """The MoE permute in front of gate/up: from the unsorted tokens x [T, D] and rows [T*k] (sorted row r is token
    rows[r]). "xla_gather": x[rows] (an XLA gather writing the [T*k, D] copy) then our kernel; "fused_gather": our
    kernel reads the token rows itself (gmm_glu(x, rows=rows)). Forward of gate/up, and the whole expert FFN's
    gradients (x, three weights) with the down projection after it."""
    t, m, d, f, e = _TOKENS.value, _TOKENS.value * _TOP_K.value, _D_MODEL.value, _D_FF.value, _EXPERTS.value
    bf16 = jnp.bfloat16
    xt, wg, wd, gs, rows, dy = ((t, d), bf16), ((e, d, f), bf16), ((e, f, d), bf16), ((e,), jnp.int32), \
        ((m,), jnp.int32), ((m, d), bf16)
    glus = {
        "xla_gather": lambda x, a, b, s, r: ours.gmm_glu(x[r], a, b, s, implementation="pallas"),
        "fused_gather": lambda x, a, b, s, r: ours.gmm_glu(x, a, b, s, rows=r, implementation="pallas"),
    }
    progs = []
    for impl, glu in glus.items():

        def train(x, w_gate, w_up, w_down, sizes, r, d_y, glu=glu):
            def loss(x, w_gate, w_up, w_down):
                y = ours.gmm(glu(x, w_gate, w_up, sizes, r), w_down, sizes, implementation="pallas")
                return jnp.sum(y.astype(jnp.float32) * d_y.astype(jnp.float32))

            return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_gate, w_up, w_down)

        progs += [
            Program("glu_fwd", impl, glu, (xt, wg, wg, gs, rows), 4 * m * d * f),
            Program("ffn_fwd_bwd", impl, train, (xt, wg, wg, wd, gs, rows, dy), 16 * m * d * f),
        ]
    return progs


def combine_programs() -> list[Program]:
    """The weighted un-permute after the down projection, y[t] = sum_k w[t, k] * ys[slot of (t, k)], as XLA ops:
    "scatter" (`dispatch.combine`) puts the [T*k, D] rows back in token order with a scatter, then reduces;
    "gather" scatters only the T*k int32 slots and gathers the rows. Forward, and the gradients of ys and the
    weights."""
    from ming_jax.moe import dispatch

    t, k, d = _TOKENS.value, _TOP_K.value, _D_MODEL.value
    shapes = (((t * k, d), jnp.bfloat16), ((t * k,), jnp.int32), ((t, k), jnp.float32))

    def scatter(ys, order, w):
        return dispatch.combine(ys, dispatch.DispatchPlan(order, jnp.zeros((1,), jnp.int32), k), w)

    def gather(ys, order, w):
        slot = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=order.dtype), unique_indices=True)
        return jnp.einsum("tkd,tk->td", ys[slot].reshape(t, k, d).astype(jnp.float32), w).astype(ys.dtype)

    progs = []
    for impl, fn in (("scatter", scatter), ("gather", gather)):
        def both(ys, order, w, fn=fn):
            return jax.grad(lambda ys, w: jnp.sum(fn(ys, order, w).astype(jnp.float32)), argnums=(0, 1))(ys, w)

        progs += [Program("combine_fwd", impl, fn, shapes, 2 * t * k * d),
                  Program("combine_fwd_bwd", impl, both, shapes, 6 * t * k * d)]
    return progs


SECTIONS = {"gmm": gmm_programs, "combine": combine_programs}


# ----------------------------------------------------------------------------------------------------- compile


def compile_program(topology: str, prog: Program) -> dict:
    """AOT-compile `prog` for one chip of `topology`; return its cost analysis and memory plan."""
    args = one_chip_args(topology, prog.shapes)
    t0 = time.time()
    compiled = jax.jit(prog.fn).lower(*args).compile()
    seconds = time.time() - t0
    cost = compiled.cost_analysis()
    mem = compiled.memory_analysis()
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    info = chip_info(topology)
    cores = info.num_cores
    peak, bw = info.bf16_ops_per_second * cores, info.mem_bw_bytes_per_second * cores
    live = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return dict(
        topology=topology, op=prog.op, impl=prog.impl, compile_s=round(seconds, 1),
        flops=flops, useful_flops=float(prog.useful_flops), bytes_accessed=nbytes,
        arithmetic_intensity=flops / nbytes if nbytes else float("nan"),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes), per_chip_bytes=int(live),
        roofline_ms=1e3 * max(flops / peak, nbytes / bw), measured_ms=None,
    )


def format_table(rows: list[dict]) -> str:
    head = (f"{'topology':<10} {'op':<12} {'impl':<15} {'TFLOP':>8} {'useful':>7} {'GB acc.':>8} {'flop/B':>7} "
            f"{'temp GiB':>8} {'chip GiB':>8} {'roofline ms':>11} {'run ms':>8} {'compile s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['topology']:<10} {r['op']:<12} {r['impl']:<15} {r['flops'] / 1e12:8.2f} "
            f"{r['useful_flops'] / max(r['flops'], 1):7.1%} {r['bytes_accessed'] / 1e9:8.2f} "
            f"{r['arithmetic_intensity']:7.0f} {r['temp_bytes'] / 2**30:8.2f} {r['per_chip_bytes'] / 2**30:8.2f} "
            f"{r['roofline_ms']:11.2f} {'n/a':>8} {r['compile_s']:9.1f}"
        )
    lines.append(
        "run ms: n/a -- no TPU on this host; nothing was executed. roofline ms = max(flops/peak, bytes/HBM BW) from "
        "the compiler's cost analysis (Pallas kernels: their declared CostEstimate), a lower bound, not a timing. "
        "useful = algorithmic flops (no recompute, no dense waste) / reported flops. "
        "chip GiB = arguments + outputs + temporaries on one chip."
    )
    return "\n".join(lines)


def main(argv):
    del argv
    rows = []
    for name in _SECTIONS.value:
        for prog in SECTIONS[name]():
            if _ONLY.value and not any(s in f"{prog.op}/{prog.impl}" for s in _ONLY.value):
                continue
            for topology in _TOPOLOGIES.value:
                row = compile_program(topology, prog)
                rows.append(row)
                print(f"compiled {topology} {prog.op} {prog.impl} in {row['compile_s']} s", flush=True)
    print(format_table(rows))
    write_results(_JSON.value, "ming_jax_tpu_kernels.json", rows,
                  note="static AOT cost analysis, one chip; run time not measured (no TPU)")


if __name__ == "__main__":
    app.run(main)
