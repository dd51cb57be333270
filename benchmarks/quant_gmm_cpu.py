"""The expert FFN with int8 / fp8 weights on an XLA backend (CPU here): the portable loop with its in-loop scales
against qwix.ragged_dot (the "xla" implementation with quantized weights) and the bf16 / float32 portable loop.

    python -m benchmarks.quant_gmm_cpu [--tokens 512] [--experts 64] [--top_k 8] [--d 1024] [--f 256]
                                       [--dtype bfloat16] [--reps 3] [--json PATH]

Forward time (median of --reps after a warm-up) and the compiled program's temporaries, for `api.grouped_glu` with
the fused permute (`rows=`, as `moe/block.py` calls it) on T tokens routed top-k uniformly at random.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results import run_meta, write_json
from ming_jax.pallas.gmm import api
from ming_jax.pallas.gmm import quant as Q


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--f", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ming_jax_quant_gmm_cpu.json"))
    a = p.parse_args()
    t, e, k, d, f = a.tokens, a.experts, a.top_k, a.d, a.f
    rng = np.random.default_rng(0)
    experts = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).reshape(-1)
    order = np.argsort(experts, kind="stable")
    rows = jnp.asarray(order // k, jnp.int32)
    gs = jnp.asarray(np.bincount(experts, minlength=e), jnp.int32)
    x = jax.random.normal(jax.random.key(0), (t, d)).astype(a.dtype)
    ws = [jax.random.normal(jax.random.key(i), s) / np.sqrt(s[1]) for i, s in
          enumerate(((e, d, f), (e, d, f), (e, f, d)), 1)]
    variants = {
        f"{a.dtype} portable": ([w.astype(a.dtype) for w in ws], "portable"),
        f"{a.dtype} xla (ragged_dot)": ([w.astype(a.dtype) for w in ws], "xla"),
        "int8 portable": ([Q.quantize(w, "int8", (1,)) for w in ws], "portable"),
        "int8 xla (qwix.ragged_dot)": ([Q.quantize(w, "int8", (1,)) for w in ws], "xla"),
        "fp8 portable": ([Q.quantize(w, "fp8", (1,)) for w in ws], "portable"),
        "fp8:128 portable": ([Q.quantize(w, "fp8", (1,), 128) for w in ws], "portable"),
        "fp8 xla (qwix.ragged_dot)": ([Q.quantize(w, "fp8", (1,)) for w in ws], "xla"),
    }
    out = []
    for name, (w, impl) in variants.items():
        fn = jax.jit(lambda x, gs, rows, wg, wu, wd, impl=impl: api.grouped_glu(x, gs, wg, wu, wd, rows=rows,
                                                                                 implementation=impl))
        compiled = fn.lower(x, gs, rows, *w).compile()
        mem = compiled.memory_analysis()
        compiled(x, gs, rows, *w).block_until_ready()
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            compiled(x, gs, rows, *w).block_until_ready()
            times.append(time.perf_counter() - t0)
        wbytes = sum(Q.nbytes(q) if Q.is_quantized(q) else q.size * q.dtype.itemsize for q in w)
        row = dict(name=name, ms=1e3 * statistics.median(times), temp_mb=mem.temp_size_in_bytes / 1e6,
                   weights_mb=wbytes / 1e6)
        out.append(row)
        print(f"{name:<30} {row['ms']:9.1f} ms   temp {row['temp_mb']:8.1f} MB   weights {row['weights_mb']:7.1f} MB",
              flush=True)
    write_json(a.json, dict(run_meta(), args=vars(a), rows=out))


if __name__ == "__main__":
    main()
