"""The MoE block alone on this CPU, per grouped-matmul implementation: tokens/s and compiled temporaries.

    python -m benchmarks.moe_cpu [--impls xla,auto] [--tokens 2048] [--reps 3]
        [--json PATH (default $TMPDIR/ming_jax_<name>.json)]

Config of issue 13 (the vs-torch comparison): hidden 1024, 64 experts top-8 (n_group 8, topk_group 4),
moe_intermediate 256, 1 shared expert, MultiRouter, float32, one batch of T tokens. The forward of
`ming_jax.moe.block.MoEBlock` under jit, rounds interleaved across implementations (ABAB...) so neither side always
runs second; "auto" is the portable grouped matmul off TPU, "xla" is jax.lax.ragged_dot.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.results import run_meta, write_json
from ming_jax.config.llm import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.moe.block import MoEBlock


def build(impl, cfg):
    block = MoEBlock(cfg, Runtime(gmm=impl), rngs=nnx.Rngs(0))
    graph, state = nnx.split(block)

    @jax.jit
    def fwd(state, x, modality):
        y, _, _ = nnx.merge(graph, state)(x, modality)
        return y

    return fwd, state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", default="xla,auto")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ming_jax_moe_cpu.json"))
    a = p.parse_args(argv)
    cfg = LLMConfig.tiny(hidden_size=1024, num_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4,
                         moe_intermediate_size=256, num_shared_experts=1, intermediate_size=2816)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, a.tokens, cfg.hidden_size)).astype(np.float32))
    modality = jnp.zeros((1, a.tokens), jnp.int32)
    impls = a.impls.split(",")
    runs, rows, outs = {}, {}, {}
    for impl in impls:
        fwd, state = build(impl, cfg)
        t0 = time.perf_counter()
        compiled = fwd.lower(state, x, modality).compile()
        compile_s = time.perf_counter() - t0
        outs[impl] = np.asarray(compiled(state, x, modality))  # warm
        mem = compiled.memory_analysis()
        runs[impl] = (compiled, state)
        rows[impl] = {"impl": impl, "compile_s": compile_s, "temp_bytes": int(mem.temp_size_in_bytes), "times": []}
    for _ in range(a.reps):  # interleaved rounds, order alternating
        for impl in (impls if _ % 2 == 0 else impls[::-1]):
            compiled, state = runs[impl]
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(state, x, modality))
            rows[impl]["times"].append(time.perf_counter() - t0)
    ref = outs[impls[0]]
    for impl in impls:
        r = rows[impl]
        r["median_s"] = statistics.median(r["times"])
        r["tokens_per_s"] = a.tokens / r["median_s"]
        r["rel_diff_vs_" + impls[0]] = float(np.abs(outs[impl] - ref).max() / np.abs(ref).max())
    print(f"MoE block, T={a.tokens}, hidden {cfg.hidden_size}, {cfg.num_experts} experts "
          f"top-{cfg.num_experts_per_tok}, moe_intermediate {cfg.moe_intermediate_size}, float32, "
          f"{os.cpu_count()} CPUs")
    print("| impl | tok/s | median ms | temp MiB | compile s | rel diff vs first |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl in impls:
        r = rows[impl]
        print(f"| {impl} | {r['tokens_per_s']:.0f} | {r['median_s'] * 1e3:.1f} | {r['temp_bytes'] / 2**20:.1f} "
              f"| {r['compile_s']:.1f} | {r['rel_diff_vs_' + impls[0]]:.1e} |")
    out = {**run_meta(), "tokens": a.tokens, "results": list(rows.values())}
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()
