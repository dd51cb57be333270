"""Where the jitted decode loop spends its time on XLA:CPU: a profiler trace of `generate`'s decode, summed by kind.

    python -m benchmarks.decode_profile [--batch 1,8] [--new 64] [--tiny]

The model is `benchmarks.vs_torch`'s config (issue 13: 199M parameters, float32, 64 experts top-8) with seeded random
weights drawn on the host (no checkpoint and no official code needed). For each batch size: the prefill and one
untimed decode (compile), `--reps` timed decodes (median ms per step), then one decode under `jax.profiler.trace`.
The trace's XLA:CPU thunk events of the decode program (`jit__decode`) are summed per HLO instruction (self time:
a while thunk's event spans its body's, which are subtracted) and grouped:

    slices         `dynamic-slice_*` / `slice_*` fusions: XLA:CPU hands a dot only whole buffers, so a dot operand
                   that is a slice of a bigger array is copied out first, every step: "weight slices (experts)" an
                   expert of the expert stack inside the grouped matmul, "other slices" the rest (a layer's weights
                   out of the scanned layers' stacks, its KV cache)
    expert loop    the rest of the routed experts' path (`ming_jax.pallas.gmm.portable`'s loop: its dots, YNNPACK
                   fusions, masks and writes; the dispatch and combine): the instructions whose `op_name` metadata
                   in the compiled program lies under the MoE block's "routed_experts" scope
    dots           the other dot thunks and YNNPACK fusions (attention projections, dense MLPs, the lm head)
    other          everything else (attention softmax, norms, routing, sampling, cache updates)

The per-instruction table separates them further. The profiler adds per-thunk overhead, so its total exceeds the
untimed-profile step time; the shares are what to read. Prints the tables and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import numpy as np

PROGRAM = "jit__decode"
EXPERT_SCOPE = "routed_experts"  # `ming_jax.moe.block.MoEBlock`'s named scope of the routed experts


def profile_events(trace_dir: str) -> list[dict]:
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no perfetto trace (*.trace.json.gz) under {trace_dir}")
    with gzip.open(files[0]) as f:
        return json.load(f)["traceEvents"]


def exclusive_times(events: list[dict]) -> tuple[collections.Counter, collections.Counter]:
    """Per HLO instruction of the decode program: summed self time (us) and calls. Thunk events nest (a while
    thunk's event spans its body's thunks), so each event's children are subtracted from it."""
    by_thread = collections.defaultdict(list)
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and args.get("hlo_module") == PROGRAM and "hlo_op" in args:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    self_us, calls = collections.Counter(), collections.Counter()
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
        stack = []  # open events: [end, op, child time]
        def close(entry):
            self_us[entry[1]] += entry[3] - entry[2]
        for e in evs:
            ts, dur = e["ts"], e.get("dur", 0.0)
            while stack and stack[-1][0] <= ts:
                close(stack.pop())
            if stack:
                stack[-1][2] += dur
            stack.append([ts + dur, e["args"]["hlo_op"], 0.0, dur])
            calls[e["args"]["hlo_op"]] += 1
        while stack:
            close(stack.pop())
    return self_us, calls


def op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: its `op_name` metadata (the jax named scopes it came from)} of a compiled HLO module."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", hlo_text, re.MULTILINE):
        names[m.group(1)] = m.group(2)
    return names


def summarize(events: list[dict], steps: int, names: dict[str, str]) -> dict:
    """Self time of the decode program per HLO instruction, and per kind, in ms per decode step. `names`: the
    program's `op_names`; instructions under the MoE block's "routed_experts" scope are the expert path."""
    per_op, count = exclusive_times(events)
    if not per_op:
        raise RuntimeError(f"the trace holds no thunk events of {PROGRAM}: nothing to summarize")
    expert_ops = {op for op in per_op if EXPERT_SCOPE in names.get(op, "")}
    kinds = collections.Counter()
    for op, us in per_op.items():
        copy = op.startswith(("dynamic-slice", "slice"))
        kinds[("weight slices (experts)" if copy else "expert loop") if op in expert_ops else
              "other slices" if copy else "dots" if op.startswith(("dot", "ynn_fusion")) else "other"] += us
    total = sum(per_op.values())
    return {
        "total_ms_per_step": total / 1e3 / steps,
        "kinds": {k: {"ms_per_step": v / 1e3 / steps, "share": v / total} for k, v in kinds.most_common()},
        "ops": [{"op": op, "ms_per_step": us / 1e3 / steps, "calls_per_step": count[op] / steps, "share": us / total}
                for op, us in per_op.most_common(25)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    p.add_argument("--new", type=int, default=64, help="decode steps per run")
    p.add_argument("--reps", type=int, default=3, help="timed decodes per batch size (untraced)")
    p.add_argument("--tiny", action="store_true", help="vs_torch's tiny config: checks the script only")
    p.add_argument("--json", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ming_jax_decode_profile.json"))
    a = p.parse_args(argv)

    import jax

    from benchmarks import vs_torch
    from benchmarks.results import run_meta, write_json
    from ming_jax.config.llm import LLMConfig
    from ming_jax.gen import text as generation
    from ming_jax.models import llm as model_lib

    config = dict(vs_torch.CONFIG, **(vs_torch.TINY if a.tiny else {}))
    cfg = LLMConfig.from_official(config)
    model = model_lib.create(cfg, seed=vs_torch.SEED, host=True)
    sampling = generation.SamplingConfig(max_new_tokens=a.new)
    rows = []
    for b in [int(x) for x in a.batch.split(",")]:
        ids = np.random.default_rng([vs_torch.SEED, b]).integers(0, vs_torch.TEXT_IDS, (b, vs_torch.PROMPT))

        def decode(hlo=False, ids=ids):
            args, kw = vs_torch.decode_call(model, ids, sampling)
            if hlo:  # the same program compiled again: its instruction names are the trace's
                return generation._decode.lower(*args, **kw).compile().as_text()
            t0 = time.perf_counter()
            gen, _ = generation._decode(*args, **kw)
            jax.block_until_ready(gen.tokens)
            return time.perf_counter() - t0

        decode()
        step_ms = statistics.median(decode() for _ in range(a.reps)) / (a.new - 1) * 1e3
        with tempfile.TemporaryDirectory(prefix="ming_jax_decode_profile.") as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                decode()
            summary = summarize(profile_events(trace_dir), a.new - 1, op_names(decode(hlo=True)))
        rows.append({"batch": b, "step_ms": step_ms, **summary})
        print(f"\ndecode B={b}: {step_ms:.2f} ms per step untraced ({b * 1e3 / step_ms:.1f} tok/s); traced thunk time "
              f"{summary['total_ms_per_step']:.2f} ms per step")
        print("| kind | ms / step (traced) | share |")
        print("|---|---:|---:|")
        for k, v in summary["kinds"].items():
            print(f"| {k} | {v['ms_per_step']:.2f} | {100 * v['share']:.0f}% |")
        print("| instruction | calls / step | ms / step | share |")
        print("|---|---:|---:|---:|")
        for o in summary["ops"][:12]:
            print(f"| {o['op']} | {o['calls_per_step']:.1f} | {o['ms_per_step']:.3f} | {100 * o['share']:.1f}% |")
    write_json(a.json, {"meta": run_meta(), "config": config, "new_tokens": a.new, "reps": a.reps, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
