"""Grouped-matmul candidates for XLA backends (CPU here), measured: time, compiled temporaries and FLOPs.

    python -m benchmarks.gmm_cpu [--tokens 2048] [--experts 64] [--top_k 8] [--d 1024] [--f 256] [--dtype float32]
                                 [--reps 3] [--json PATH (default $TMPDIR/ming_jax_<name>.json)] [--skip_xla]

The expert FFN of the MoE block (`api.grouped_glu` with the fused permute `rows=`, as `moe/block.py` calls it) on
T tokens routed top-k uniformly at random, forward and forward+backward (gradients of x and the three weights):
  xla            jax.lax.ragged_dot (`xla.py`): dense off TPU;
  portable/tmN   the (row tile, expert) step loop of `portable.py` with N-row tiles;
  padded_bmm/tmN a candidate not kept: rows padded per expert to N-row tiles, one batched matmul over all tiles,
                 each tile with a gathered copy of its expert's weights ([tiles, D, F] temporary), autodiff;
  dense          a lower bound: all rows through one expert's weights (three plain matmuls, same FLOPs as useful).
Prints a table and writes JSON (date, machine, jax version, every row). The FLOPs column is XLA's cost_analysis,
which counts a while loop's body once (not per trip): meaningful for xla / padded_bmm / dense, ~0 for portable,
whose work is (sum over experts of ceil(rows / tm)) x tm rows.
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
from ming_jax.pallas.gmm import api, portable


def _padded_bmm(tm):
    """Candidate: expert-aligned padded tiles + one batched matmul with per-tile gathered weights."""

    def layout(group_sizes, m):
        g = group_sizes.shape[0]
        nt = -(-m // tm) + g
        ends = jnp.cumsum(group_sizes)
        starts = ends - group_sizes
        tiles = -(-group_sizes // tm)  # per expert
        tile_start = jnp.cumsum(tiles) - tiles
        gid = jnp.repeat(jnp.arange(g), tiles, total_repeat_length=nt)  # [nt]
        valid_tile = jnp.arange(nt) < jnp.sum(tiles)
        first_row = starts[gid] + (jnp.arange(nt) - tile_start[gid]) * tm
        row = first_row[:, None] + jnp.arange(tm)[None, :]  # [nt, tm] sorted row index
        valid = valid_tile[:, None] & (row < ends[gid][:, None])
        return gid, jnp.where(valid, row, m), valid  # m: an out-of-range row (dropped on scatter)

    def ffn(x, group_sizes, wg, wu, wd, rows):
        m = rows.shape[0]
        gid, row, valid = layout(group_sizes, m)
        src = jnp.where(valid, rows[jnp.minimum(row, m - 1)], 0)
        a = jnp.where(valid[..., None], x[src], 0)  # [nt, tm, D]
        gate = jnp.einsum("tmd,tdf->tmf", a, wg[gid], preferred_element_type=jnp.float32)
        up = jnp.einsum("tmd,tdf->tmf", a, wu[gid], preferred_element_type=jnp.float32)
        h = (jax.nn.silu(gate) * up).astype(x.dtype)
        y = jnp.einsum("tmf,tfd->tmd", h, wd[gid], preferred_element_type=jnp.float32).astype(x.dtype)
        out = jnp.zeros((m, x.shape[1]), x.dtype)
        return out.at[row.reshape(-1)].set(y.reshape(-1, x.shape[1]), mode="drop")

    return ffn


def _dense(x, group_sizes, wg, wu, wd, rows):
    a = x[rows]
    h = jax.nn.silu(a @ wg[0]) * (a @ wu[0])
    return h @ wd[0]


def candidates(tms, skip_xla):
    out = {}
    if not skip_xla:
        out["xla"] = lambda x, gs, wg, wu, wd, r: api.grouped_glu(x, gs, wg, wu, wd, rows=r, implementation="xla")
    for tm in tms:
        def port(x, gs, wg, wu, wd, r, tm=tm):
            h = portable.gmm_glu(x, wg, wu, gs, r, tm)
            return portable.gmm(h, wd, gs, x.dtype, tm)
        out[f"portable/tm{tm}"] = port
    for tm in (128, 256):
        out[f"padded_bmm/tm{tm}"] = _padded_bmm(tm)
    out["auto"] = lambda x, gs, wg, wu, wd, r: api.grouped_glu(x, gs, wg, wu, wd, rows=r, implementation="auto")
    out["dense"] = _dense
    return out


def _stats(compiled):
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
            "flops": float(cost.get("flops", float("nan"))) if cost else None}


def _time(fn, args, reps):
    jax.block_until_ready(fn(*args))  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--f", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tms", default="32,64,128,256,512")
    p.add_argument("--skip_xla", action="store_true", help="skip ragged_dot (seconds per call, GiB temporaries)")
    p.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    p.add_argument("--json", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ming_jax_gmm_cpu.json"))
    a = p.parse_args(argv)

    dt = jnp.dtype(a.dtype)
    t, e, k, d, f = a.tokens, a.experts, a.top_k, a.d, a.f
    m = t * k
    rng = np.random.default_rng(0)
    experts = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)])  # [T, K] distinct per token
    order = np.argsort(experts.reshape(-1), kind="stable")
    rows = jnp.asarray(order // k, jnp.int32)
    gs = jnp.asarray(np.bincount(experts.reshape(-1), minlength=e), jnp.int32)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (t, d), jnp.float32).astype(dt)
    wg = (jax.random.normal(keys[1], (e, d, f)) / np.sqrt(d)).astype(dt)
    wu = (jax.random.normal(keys[2], (e, d, f)) / np.sqrt(d)).astype(dt)
    wd = (jax.random.normal(keys[3], (e, f, d)) / np.sqrt(f)).astype(dt)
    dy = jax.random.normal(keys[4], (m, d), jnp.float32).astype(dt)
    args = (x, gs, wg, wu, wd, rows)
    useful = 2.0 * m * d * f * 3
    act_bytes = m * d * dt.itemsize

    results = []
    tms = [int(v) for v in a.tms.split(",") if v]
    cands = candidates(tms, a.skip_xla)
    if a.only:
        cands = {n: c for n, c in cands.items() if n in a.only.split(",")}
    for name, fn in cands.items():
        fwd = jax.jit(fn)

        def loss(x, wg, wu, wd, fn=fn):
            return jnp.vdot(fn(x, gs, wg, wu, wd, rows).astype(jnp.float32), dy.astype(jnp.float32))

        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        row = {"name": name}
        t0 = time.perf_counter()
        cf = fwd.lower(*args).compile()
        cb = bwd.lower(x, wg, wu, wd).compile()
        row["compile_s"] = time.perf_counter() - t0
        sf, sb = _stats(cf), _stats(cb)
        row.update(fwd_temp_bytes=sf["temp_bytes"], fwd_flops=sf["flops"], bwd_temp_bytes=sb["temp_bytes"],
                   bwd_flops=sb["flops"])
        reps = 1 if name == "xla" else a.reps
        row["fwd_s"] = _time(cf, args, reps)
        row["fwd_bwd_s"] = _time(cb, (x, wg, wu, wd), reps)
        row["fwd_tokens_per_s"] = t / row["fwd_s"]
        results.append(row)
        print(f"{name:<16} fwd {row['fwd_s'] * 1e3:9.1f} ms  fwd+bwd {row['fwd_bwd_s'] * 1e3:9.1f} ms  "
              f"temp fwd {sf['temp_bytes'] / 2**20:9.1f} MiB bwd {sb['temp_bytes'] / 2**20:9.1f} MiB  "
              f"flops fwd/useful {sf['flops'] / useful:7.2f}", flush=True)

    print(f"\nT={t} top-{k} of {e} experts (M={m} rows), d {d}, f {f}, {a.dtype}; useful forward "
          f"{useful / 1e9:.2f} GFLOP; permuted activations [M, d] {act_bytes / 2**20:.0f} MiB")
    head = (f"| {'candidate':<16} | fwd ms | fwd+bwd ms | fwd tok/s | fwd temp MiB | bwd temp MiB "
            "| fwd FLOPs / useful |"
            "\n|---|---:|---:|---:|---:|---:|---:|")
    print(head)
    for r in results:
        print(f"| {r['name']:<16} | {r['fwd_s'] * 1e3:.1f} | {r['fwd_bwd_s'] * 1e3:.1f} | {r['fwd_tokens_per_s']:.0f} "
              f"| {r['fwd_temp_bytes'] / 2**20:.1f} | {r['bwd_temp_bytes'] / 2**20:.1f} "
              f"| {r['fwd_flops'] / useful:.2f} |")
    out = {**run_meta(), "backend": jax.default_backend(),
           "config": dict(tokens=t, experts=e, top_k=k, d=d, f=f, dtype=a.dtype, rows=m),
           "useful_fwd_flops": useful, "permuted_activation_bytes": act_bytes, "results": results}
    if a.json:
        write_json(a.json, out)


if __name__ == "__main__":
    main()
