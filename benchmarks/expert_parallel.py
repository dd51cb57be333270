"""Expert-parallel MoE layer vs the single-device layer, on 8 fake CPU devices, all ratios from one run.

Cases (one MoE block: router + routed experts + shared expert, forward and forward+backward):
  plain          no mesh: the single-device path (the baseline of every ratio)
  ep1            1-device mesh, expert_parallel="auto": the EP code path with no exchange (its overhead must be < 5%)
  ep1_padded     1-device mesh, forced padded exchange: what the exchange machinery costs with nothing to exchange
  ep8            mesh expert=8 on 8 host devices, padded exchange (XLA:CPU has no ragged all-to-all)
Timings interleave the cases round by round, in a shuffled order each round, and report medians, so load
drift on a shared host hits all alike.
On CPU, 8 "devices" share the host's cores: ep8 shows the exchange's cost, not a speedup.

  JAX_PLATFORMS=cpu python -m benchmarks.expert_parallel --json=/tmp/expert_parallel.json
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from ming_jax.parity import numerics  # noqa: E402
from ming_jax import sharding
from ming_jax.config import LLMConfig  # noqa: E402
from ming_jax.config.runtime import Runtime  # noqa: E402
from ming_jax.moe.block import MoEBlock  # noqa: E402

_JSON = flags.DEFINE_string("json", "", "Where to write the results (default: <tmpdir>/ming_jax_expert_parallel.json).")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Timed rounds (each runs every case once).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences (split over the 8 devices for ep8).")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per sequence.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Model width.")
_FFN = flags.DEFINE_integer("ffn", 128, "Expert FFN width.")
_EXPERTS = flags.DEFINE_integer("experts", 16, "Routed experts.")
_TOP_K = flags.DEFINE_integer("top_k", 4, "Experts per token.")


def _cases(cfg, block, x):
    graphdef, state = nnx.split(block)
    ct = jnp.ones(x.shape, x.dtype)

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    def fwd_bwd(state, x):
        return jax.grad(lambda s, x: jnp.sum(fwd(s, x) * ct), argnums=(0, 1))(state, x)

    rules = sharding.ShardingRules.preset("ep_fsdp")
    one = sharding.make_mesh("fsdp=1", jax.devices()[:1])
    eight = sharding.make_mesh("expert=8")
    padded = nnx.split(MoEBlock(cfg, Runtime(expert_parallel="padded"), rngs=nnx.Rngs(0)))[0]

    def forced(state, x):
        return nnx.merge(padded, state)(x)[0]

    def forced_bwd(state, x):
        return jax.grad(lambda s, x: jnp.sum(forced(s, x) * ct), argnums=(0, 1))(state, x)

    cases = {}
    for name, mesh, (f, g) in (("plain", None, (fwd, fwd_bwd)), ("ep1", one, (fwd, fwd_bwd)),
                               ("ep1_padded", one, (forced, forced_bwd)), ("ep8", eight, (fwd, fwd_bwd))):
        if mesh is None:
            args = (state, x)
            cases[name] = (jax.jit(f), jax.jit(g), args, None)
        else:
            args = (jax.device_put(state, sharding.state_shardings(block, mesh, rules)),
                    sharding.shard_inputs(x, mesh, rules))
            cases[name] = (jax.jit(f), jax.jit(g), args, (mesh, rules))
    return cases


def _call(fn, args, ctx):
    if ctx is None:
        return jax.block_until_ready(fn(*args))
    with sharding.use_mesh(*ctx):
        return jax.block_until_ready(fn(*args))


def run() -> dict:
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 host devices, got {jax.device_count()} (XLA_FLAGS is read when jax starts)")
    cfg = LLMConfig.tiny(hidden_size=_HIDDEN.value, moe_intermediate_size=_FFN.value, num_experts=_EXPERTS.value,
                         num_experts_per_tok=_TOP_K.value, n_group=4, topk_group=2)
    block = MoEBlock(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(_BATCH.value, _SEQ.value, cfg.hidden_size)), jnp.float32)
    cases = _cases(cfg, block, x)
    # Same numbers first (a benchmark of a wrong answer is worthless), which also compiles everything.
    ref = _call(cases["plain"][0], cases["plain"][2], None)
    for name, (f, g, args, ctx) in cases.items():
        numerics.assert_close(f"{name}_y", _call(f, args, ctx), ref)
        _call(g, args, ctx)
    times = {(name, kind): [] for name in cases for kind in ("fwd", "fwd_bwd")}
    order = np.random.default_rng(0)
    for _ in range(_ROUNDS.value):
        for i in order.permutation(len(times)):  # a fresh order each round: no case always follows another
            name, kind = list(times)[i]
            f, g, args, ctx = cases[name]
            t0 = time.perf_counter()
            _call(f if kind == "fwd" else g, args, ctx)
            times[(name, kind)].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [dict(case=name, pass_=kind, median_ms=1e3 * med[(name, kind)],
                 ratio_vs_plain=med[(name, kind)] / med[("plain", kind)]) for name, kind in times]
    return dict(date=time.strftime("%Y-%m-%d"), device=f"CPU ({os.cpu_count()} cores), 8 host devices",
                jax=jax.__version__, tokens=_BATCH.value * _SEQ.value, hidden=cfg.hidden_size,
                ffn=cfg.moe_intermediate_size, experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                rounds=_ROUNDS.value, rows=rows)


def main(argv):
    del argv
    res = run()
    print(f"MoE block, {res['tokens']} tokens, D={res['hidden']} F={res['ffn']} E={res['experts']} "
          f"K={res['top_k']}; {res['device']}; median of {res['rounds']} interleaved rounds")
    print(f"{'case':<12} {'pass':<8} {'median ms':>10} {'vs plain':>9}")
    for r in res["rows"]:
        print(f"{r['case']:<12} {r['pass_']:<8} {r['median_ms']:10.2f} {r['ratio_vs_plain']:9.3f}")
    path = _JSON.value or os.path.join(tempfile.gettempdir(), "ming_jax_expert_parallel.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
