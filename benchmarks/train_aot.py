"""The full-size train step (`ming_jax.train.step`, exactly what `python -m ming_jax.train` runs) compiled by the
TPU compiler for pod slices from this host (libtpu, no TPU): per-chip memory, and the compiled FLOPs per token
against the analytic count (6 x active matmul parameters + causal attention, `active_flops_per_token`).

    python -m benchmarks.train_aot [--out results.json] [--cases v5p:4x4x4/fsdp=16,expert=4 ...]

Prints a table and writes JSON. The compiled FLOPs are XLA's cost analysis of one chip's program times the chips,
per token of the global batch. XLA's cost analysis counts the body of a loop once: for the full step (layers
scanned, loss in 512-token chunks) it is far below the real work, so a second table (`--flops_check`) compiles
the step at full width with 1 and 2 layers unrolled, the loss in one chunk, XLA attention and no remat, where every
FLOP is visible (the Pallas grouped matmuls declare theirs), dropless and with capacity factor 1.0 (the dropless
receive buffer is sized for the worst case, expert-shards x tokens x top-k rows, and the kernels' cost estimates
follow the buffer, not the rows that arrive).
"""

from __future__ import annotations

import argparse
import time

from ming_jax.aot import compile as aot
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.train import step as train_step
from ming_jax.train.config import TrainConfig

from benchmarks.tpu_aot import write_results

CASES = ("v5p:4x4x4/fsdp=16,expert=4", "v6e:16x16/fsdp=64,expert=4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="topology/mesh pairs")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rules", default="ep_fsdp")
    ap.add_argument("--out", default="")
    ap.add_argument("--flops_check", action="store_true", help="also the unrolled 1-/2-layer FLOPs check")
    ap.add_argument("--param_dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="stored parameters (master weights); AdamW moments are float32 either way")
    args = ap.parse_args()
    cfg = LLMConfig.ming_flash_omni_2()
    runtime = Runtime.bf16(remat=True, param_dtype=args.param_dtype)
    analytic = train_step.active_flops_per_token(cfg, args.seq)
    rows = []
    print(f"parameters {args.param_dtype}, compute bfloat16, remat, seq {args.seq}")
    print(f"{'topology':<12} {'mesh':<20} {'chips':>5} {'GiB/chip':>9} {'HBM':>5} {'fits':>5} {'TFLOP/token':>12} "
          f"{'analytic':>9} {'ratio':>6} {'compile s':>9}")
    for case in args.cases:
        topology, mesh = case.split("/")
        t0 = time.perf_counter()
        devices = aot.topology_devices(topology)
        chips = len(devices)
        plan, compiled = aot.compile_step(cfg, topology, mesh, args.rules, "train", batch=chips, seq=args.seq,
                                          runtime=runtime, devices=devices, train=TrainConfig())
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan"))) * chips / (chips * args.seq)
        row = dict(topology=topology, mesh=mesh, chips=chips, rules=args.rules, batch=chips, seq=args.seq,
                   param_dtype=args.param_dtype,
                   per_chip_bytes=plan.total, hbm_bytes=plan.capacity, fits=plan.fits,
                   argument=plan.argument, temp=plan.temp, alias=plan.alias,
                   compiled_flops_per_token=flops, analytic_flops_per_token=analytic, ratio=flops / analytic,
                   compile_s=time.perf_counter() - t0)
        rows.append(row)
        print(f"{topology:<12} {mesh:<20} {chips:>5} {plan.total / 2**30:>9.1f} {plan.capacity / 1e9:>5.0f} "
              f"{str(plan.fits):>5} {flops / 1e12:>12.4f} {analytic / 1e12:>9.4f} {flops / analytic:>6.2f} "
              f"{row['compile_s']:>9.0f}")
    checks = flops_check(args.seq) if args.flops_check else []
    path = write_results(args.out, "train_aot.json", rows + checks,
                         f"full-size train step, {args.param_dtype} params, bf16 compute, remat, AdamW f32; "
                         "flops_check rows (bf16 params): full width, "
                         "1-2 layers unrolled, one loss chunk, xla attention, no remat")
    print(f"wrote {path}")


def flops_check(seq: int, topology: str = "v5p:4x4x4", mesh: str = "fsdp=16,expert=4") -> list[dict]:
    """Compiled vs analytic FLOPs per token where the cost analysis sees every FLOP (see the module docstring)."""
    devices = aot.topology_devices(topology)
    chips = len(devices)
    rows = []
    print(f"\n{'layers':>6} {'capacity':>9} {'TFLOP/token':>12} {'analytic':>9} {'ratio':>6}")
    for layers, capacity in ((1, None), (2, None), (2, 1.0)):
        cfg = LLMConfig.ming_flash_omni_2(num_layers=layers)
        runtime = Runtime(dtype="bfloat16", param_dtype="bfloat16", remat=False, scan_layers=False,
                          attention="xla", capacity_factor=capacity)
        _, compiled = aot.compile_step(cfg, topology, mesh, "ep_fsdp", "train", batch=chips, seq=seq,
                                       runtime=runtime, devices=devices, train=TrainConfig(loss_chunk=seq))
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost["flops"]) / seq  # one chip's program, one row of seq tokens per chip
        analytic = train_step.active_flops_per_token(cfg, seq)
        rows.append(dict(check="flops", topology=topology, mesh=mesh, layers=layers, capacity_factor=capacity,
                         compiled_flops_per_token=flops, analytic_flops_per_token=analytic, ratio=flops / analytic))
        print(f"{layers:>6} {str(capacity or 'dropless'):>9} {flops / 1e12:>12.5f} {analytic / 1e12:>9.5f} "
              f"{flops / analytic:>6.2f}")
    return rows


if __name__ == "__main__":
    main()
