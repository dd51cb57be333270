"""Bytes per decode step, compiled against the floor: the full model's single-token step (`--step decode_step` of
`python -m ming_jax.aot`) compiled by the TPU compiler for small v5p / v6e slices from this host (libtpu, no TPU).

    python -m benchmarks.decode_bytes [--out docs/data/decode_bytes.json] [--cases v5p:2x2x1/expert=4/bf16/64 ...]

A case is topology/mesh/weights/batch. Per chip: the floor (`ming_jax.aot.decode_bytes.decode_floor`: dense weights,
the routed experts a step touches, expected under uniform routing and worst case, the whole KV cache), XLA's cost
analysis of the compiled step, the same with the layer scan's body counted once per layer ("corrected"), and with the
Pallas grouped matmuls reading only the touched experts ("kernels at index maps"); ratios against the expected
floor. `--hlo_dir` keeps each compiled module's text for the per-op breakdown (`decode_bytes.breakdown`).
"""

from __future__ import annotations

import argparse
import gzip
import os
import time

from ming_jax import sharding
from ming_jax.aot import compile as aot, decode_bytes as db
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime

from benchmarks.tpu_aot import write_results

CASES = ("v5p:2x2x1/tensor=4/bf16/1", "v5p:2x2x1/expert=4/bf16/4", "v5p:2x2x1/expert=4/bf16/64",
         "v6e:2x4/expert=8/int8/8", "v6e:2x4/expert=8/int8/64")


def run_case(cfg, case: str, *, seq: int, rules: str, runtime: Runtime, hlo_dir: str = "", top: int = 12) -> dict:
    topology, mesh_spec, weights, batch = case.split("/")
    batch = int(batch)
    quantize = None if weights == "bf16" else weights
    devices = aot.topology_devices(topology)
    mesh = sharding.make_mesh(mesh_spec, devices)
    floor = db.decode_floor(cfg, mesh, sharding.ShardingRules.preset(rules), batch=batch, seq=seq, runtime=runtime,
                            quantize=quantize)
    t0 = time.perf_counter()
    plan, compiled = aot.compile_step(cfg, topology, mesh_spec, rules, "decode_step", batch=batch, seq=seq,
                                      runtime=runtime, devices=devices, quantize=quantize)
    compile_s = time.perf_counter() - t0
    cb, ops = db.compiled_bytes(compiled)
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with gzip.open(os.path.join(hlo_dir, case.replace("/", "_").replace(":", "") + ".hlo.gz"), "wt") as fh:
            fh.write(compiled.as_text())
    adjusted = cb.kernel_adjusted(floor.expected_fraction)
    return dict(
        case=case, topology=topology, mesh=mesh_spec, rules=rules, weights=weights, batch=batch, kv_len=seq,
        chips=len(devices), fits=plan.fits, argument=plan.argument, temp=plan.temp,
        floor_dense=floor.dense, floor_dense_parts=floor.parts, floor_experts_all=floor.experts_all,
        local_experts=floor.local_experts, expected_fraction=floor.expected_fraction,
        worst_fraction=floor.worst_fraction, floor_kv=floor.kv, floor_expected=floor.expected,
        floor_worst=floor.worst, cost_analysis=cb.cost_analysis, walk_once=cb.walk_once, walk_total=cb.walk_total,
        corrected=cb.corrected, gmm_declared=cb.gmm_declared, gmm_stacks=cb.gmm_stacks,
        kernel_adjusted=adjusted, kernel_adjusted_worst=cb.kernel_adjusted(floor.worst_fraction),
        ratio_corrected=cb.corrected / floor.expected, ratio=adjusted / floor.expected,
        ratio_worst=cb.kernel_adjusted(floor.worst_fraction) / floor.worst,
        top_ops=[dict(kind=k, bytes=b, instructions=n) for k, b, n in db.breakdown(ops, top)],
        compile_s=compile_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="topology/mesh/weights/batch")
    ap.add_argument("--seq", type=int, default=8192, help="KV cache slots (the floor reads all of them)")
    ap.add_argument("--rules", default="ep_tp")
    ap.add_argument("--layers", type=int, default=0, help="override num_layers (0: the release's 32)")
    ap.add_argument("--out", default="")
    ap.add_argument("--hlo_dir", default="")
    args = ap.parse_args()
    cfg = LLMConfig.ming_flash_omni_2(**({"num_layers": args.layers} if args.layers else {}))
    runtime = Runtime.bf16(remat=True, attention="xla")
    g = lambda b: f"{b / 1e9:8.3f}"  # noqa: E731
    print(f"GB per chip; KV cache {args.seq} slots; rules {args.rules}; libtpu {aot._libtpu_version()}")
    print(f"{'case':<30} {'floor':>8} {'worst':>8} {'XLA ca':>8} {'corr.':>8} {'kernels':>8} {'ratio':>6} "
          f"{'r.worst':>7} {'walk/ca':>7} {'s':>5}")
    rows = []
    for case in args.cases:
        r = run_case(cfg, case, seq=args.seq, rules=args.rules, runtime=runtime, hlo_dir=args.hlo_dir)
        rows.append(r)
        print(f"{case:<30} {g(r['floor_expected'])} {g(r['floor_worst'])} {g(r['cost_analysis'])} "
              f"{g(r['corrected'])} {g(r['kernel_adjusted'])} {r['ratio']:6.2f} {r['ratio_worst']:7.2f} "
              f"{r['walk_once'] / max(r['cost_analysis'], 1):7.2f} {r['compile_s']:5.0f}")
        for op in r["top_ops"][:8]:
            print(f"    {op['bytes'] / 1e9:8.3f} GB {op['instructions']:4d}  {op['kind'][:100]}")
    write_results(args.out, "decode_bytes.json", rows,
                  f"decode_step, {cfg.num_layers} layers, KV {args.seq} slots, rules {args.rules}, bf16 compute, XLA "
                  f"attention; TPU compiler via libtpu {aot._libtpu_version()}, no TPU run")


if __name__ == "__main__":
    main()
