"""Full-size check without a GPU: compile (never run) the routed-expert FFN at Ling-flash shapes on this CPU and
report XLA's `memory_analysis()` temporaries against the permuted activations [T * top_k, d].

    python -m benchmarks.gmm_fullsize [--impl auto,xla] [--tokens 8192]
        [--json PATH (default $TMPDIR/ming_jax_<name>.json)]

Shapes: T tokens routed top-8 of 256 experts, d 4096, f 1024, bfloat16, the permute fused (`rows=`) as in the MoE
block. Inputs are abstract (jax.ShapeDtypeStruct): nothing is allocated, so the dense ragged_dot lowering can be
measured too. Forward (`grouped_glu`) and backward (gradients of x and the three expert weights).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from benchmarks.results import run_meta, write_json
from ming_jax.pallas.gmm import api


def compile_ffn(impl, t, k, e, d, f, dtype, grad):
    m = t * k
    dt = jnp.dtype(dtype)
    args = (jax.ShapeDtypeStruct((t, d), dt), jax.ShapeDtypeStruct((e,), jnp.int32),
            jax.ShapeDtypeStruct((e, d, f), dt), jax.ShapeDtypeStruct((e, d, f), dt),
            jax.ShapeDtypeStruct((e, f, d), dt), jax.ShapeDtypeStruct((m,), jnp.int32))

    def ffn(x, gs, wg, wu, wd, rows):
        return api.grouped_glu(x, gs, wg, wu, wd, rows=rows, implementation=impl)

    def fwd_bwd(x, gs, wg, wu, wd, rows):
        def loss(x, wg, wu, wd):
            return jnp.sum(ffn(x, gs, wg, wu, wd, rows).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)

    t0 = time.perf_counter()
    compiled = jax.jit(fwd_bwd if grad else ffn).lower(*args).compile()
    mem = compiled.memory_analysis()
    return {"impl": impl, "pass": "fwd+bwd" if grad else "fwd", "compile_s": time.perf_counter() - t0,
            "temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="auto,xla")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--f", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ming_jax_gmm_fullsize.json"))
    a = p.parse_args(argv)
    m = a.tokens * a.top_k
    act = m * a.d * jnp.dtype(a.dtype).itemsize
    rows = []
    for impl in a.impl.split(","):
        for grad in (False, True):
            r = compile_ffn(impl, a.tokens, a.top_k, a.experts, a.d, a.f, a.dtype, grad)
            r["temp_over_permuted_activations"] = r["temp_bytes"] / act
            rows.append(r)
            print(f"{impl:<8} {r['pass']:<8} temp {r['temp_bytes'] / 2**30:8.2f} GiB "
                  f"({r['temp_over_permuted_activations']:.2f}x the permuted activations)  "
                  f"args {r['argument_bytes'] / 2**30:.2f} GiB  out {r['output_bytes'] / 2**30:.2f} GiB  "
                  f"compile {r['compile_s']:.1f} s", flush=True)
    print(f"T={a.tokens} top-{a.top_k} of {a.experts}, d {a.d}, f {a.f}, {a.dtype}: permuted activations "
          f"[{m}, {a.d}] = {act / 2**30:.2f} GiB")
    out = {**run_meta(), "permuted_activation_bytes": act,
           "config": dict(tokens=a.tokens, top_k=a.top_k, experts=a.experts, d=a.d, f=a.f, dtype=a.dtype),
           "results": rows}
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()
