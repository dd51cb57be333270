"""Continuous vs static batching in the batch job, on this CPU: generated tokens/s on mixed prompt and output lengths.

    python -m benchmarks.continuous_batching [--requests 64] [--slots 8] [--chunks 1,4,16,64]
        [--workloads stop,budget] [--reps 2] [--json PATH (default $TMPDIR/ming_jax_continuous_batching.json)]

Both schedulers are the real batch job (`ming_jax.gen.batch.run_batch`, `--scheduler static|continuous`) on the
same JSONL file: prompts built with the chat template, results detokenized and written, every request sampled
from its own seed (so the two schedulers give the same answers, which is checked). Model: the tiny omni preset
with random weights (`Engine.tiny`: LLM hidden 128, 3 layers, 16 experts top-4, vocabulary 1000, float32), with
`--stops` extra end tokens so that sampled answers end at a stop token after a skewed (about geometric) number of
tokens. Prompts: a user message of 0 to 200 characters after the template's 51 tokens, i.e. 53 to 256 tokens
(4 prompt buckets of 64).

Workloads (the same requests for both schedulers, in random order):
  stop:   temperature 1, max_tokens 256: answers end at a stop token, lengths unknown to the scheduler;
  budget: greedy, max_tokens log-uniform in 4..256: answers mostly end at their budget, which the static
          scheduler knows and sorts by (its best case).

Every (workload, scheduler) is run once to compile the programs of every bucket / budget / chunk, then `--reps`
timed rounds with the order of the runs alternating from round to round; the fastest round of each counts.
`--chunks` also times the continuous scheduler at other decode chunk sizes (the most decode steps per host round
trip) on the first workload, in the same rounds. Check `uptime` first: the numbers are
only comparable on an idle machine; the load average at start and end is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from benchmarks.results import run_meta, write_json
from ming_jax.config.omni import OmniConfig
from ming_jax.gen import batch as B


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def workload(kind: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the of and a to in is you that it he was for on are as with his they at be this have from".split()
    rows = []
    for i in range(n):
        chars = int(rng.integers(0, 201))
        text = ""
        while len(text) < chars:
            text += words[int(rng.integers(len(words)))] + " "
        body = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": text[:chars]}],
                "seed": i}
        if kind == "stop":
            body.update(temperature=1.0, max_tokens=256)
        elif kind == "budget":
            body.update(temperature=0.0, max_tokens=int(round(4 * 64 ** rng.random())))
        else:
            raise ValueError(kind)
        rows.append({"custom_id": f"{kind}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return rows


def run_once(engine, path: str, options: B.BatchOptions, tmp: str, tag: str) -> tuple[B.Summary, dict]:
    out = os.path.join(tmp, f"{tag}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    summary = B.run_batch(engine, path, out, options, progress=False, log=lambda msg: None)
    with open(out) as f:
        answers = {r["custom_id"]: (r["response"]["body"]["choices"][0]["message"]["content"],
                                    r["response"]["body"]["usage"]["completion_tokens"])
                   for r in map(json.loads, f) if r["error"] is None}
    return summary, answers


def measure(engine, path, runs: dict, tmp: str, reps: int) -> dict:
    """Each of `runs` (tag -> BatchOptions) once to compile, then `reps` timed rounds, the runs' order alternating
    from round to round (so a change of machine load hits all of them); the fastest round of each counts."""
    for tag, options in runs.items():
        run_once(engine, path, options, tmp, tag + "-warm")
    times, out = {tag: [] for tag in runs}, {}
    for rep in range(reps):
        for tag in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            summary, answers = run_once(engine, path, runs[tag], tmp, tag)
            times[tag].append(time.perf_counter() - t0)
            out[tag] = (summary, answers)
    rows = {}
    for tag, options in runs.items():
        summary, answers = out[tag]
        wall = min(times[tag])
        rows[tag] = {
            "scheduler": options.scheduler, "chunk": options.chunk if options.scheduler == "continuous" else None,
            "seconds": wall, "seconds_all": times[tag], "requests": summary.succeeded, "failed": summary.failed,
            "completion_tokens": summary.completion_tokens, "prompt_tokens": summary.prompt_tokens,
            "tokens_per_s": summary.completion_tokens / wall, "requests_per_s": summary.succeeded / wall,
            "round_trips_or_batches": summary.batches, "decode_steps": summary.decode_steps or None,
            "slot_occupancy": (summary.active_slot_steps / summary.slot_steps) if summary.slot_steps else None,
            "finish": dict(summary.finish), "answers": answers}
        print(f"  {tag}: {rows[tag]['tokens_per_s']:.1f} tok/s ({summary.completion_tokens} tokens in "
              f"{', '.join(f'{t:.1f}' for t in times[tag])} s; load {load_average()[0]})", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--slots", type=int, default=8, help="static: rows per batch; continuous: decode slots")
    p.add_argument("--chunk", type=int, default=32, help="continuous: decode steps per round trip (main rows)")
    p.add_argument("--chunks", default="1,4,16,64", help="other chunk sizes timed on the first workload")
    p.add_argument("--workloads", default="stop,budget")
    p.add_argument("--stops", type=int, default=24, help="end tokens (the preset's one + this many - 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=2, help="timed rounds per run (the fastest counts)")
    p.add_argument("--json", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                  "ming_jax_continuous_batching.json"))
    a = p.parse_args(argv)
    load_start = load_average()
    print(f"load average at start: {load_start}", flush=True)
    stops = [989] + list(range(500, 500 + a.stops - 1))
    cfg = OmniConfig.tiny(llm=dict(eos_token_id=tuple(stops), max_position_embeddings=1024))
    engine = B.Engine.tiny(cfg=cfg, seed=a.seed)
    rows, chunk_rows, lengths = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for w, kind in enumerate(a.workloads.split(",")):
            path = os.path.join(tmp, f"{kind}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in workload(kind, a.requests, a.seed))
            print(f"workload {kind}: {a.requests} requests", flush=True)
            runs = {"static": B.BatchOptions(batch_size=a.slots, scheduler="static"),
                    "continuous": B.BatchOptions(batch_size=a.slots, scheduler="continuous", chunk=a.chunk)}
            if w == 0:
                for c in ([int(c) for c in a.chunks.split(",") if c] if a.chunks else []):
                    if c != a.chunk:
                        runs[f"continuous-chunk{c}"] = B.BatchOptions(batch_size=a.slots, scheduler="continuous",
                                                                      chunk=c)
            got = measure(engine, path, runs, tmp, a.reps)
            answers = {tag: r.pop("answers") for tag, r in got.items()}
            static, cont = got["static"], got["continuous"]
            same = sum(answers["static"].get(k) == v for k, v in answers["continuous"].items())
            ratio = cont["tokens_per_s"] / static["tokens_per_s"]
            print(f"  ratio continuous / static: {ratio:.2f}x; identical answers {same}/{len(answers['continuous'])}",
                  flush=True)
            cont["ratio_vs_static"], cont["identical_answers"] = ratio, same
            rows += [{"workload": kind, **static}, {"workload": kind, **cont}]
            n = [tokens for _, tokens in answers["continuous"].values()]
            lengths[kind] = {q: int(np.percentile(n, v)) for q, v in
                             (("min", 0), ("p25", 25), ("median", 50), ("p75", 75), ("p90", 90), ("max", 100))}
            lengths[kind]["mean"] = float(np.mean(n))
            if w == 0 and len(got) > 2:
                chunk_rows = sorted(({"workload": kind, **r} for tag, r in got.items() if tag != "static"),
                                    key=lambda r: r["chunk"])
    load_end = load_average()
    print(f"\ncontinuous vs static batching, tiny omni preset (random weights), {a.slots} rows / slots, "
          f"{a.requests} requests per workload, load average {load_start} -> {load_end}")
    print("| workload | scheduler | output tokens (min / median / p90 / max) | tok/s | req/s | occupancy | ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        L = lengths[r["workload"]]
        occ = f"{100 * r['slot_occupancy']:.0f}%" if r["slot_occupancy"] is not None else "-"
        ratio = f"{r['ratio_vs_static']:.2f}x" if "ratio_vs_static" in r else "1"
        print(f"| {r['workload']} | {r['scheduler']} | {L['min']} / {L['median']} / {L['p90']} / {L['max']} | "
              f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {occ} | {ratio} |")
    if chunk_rows:
        print("\n| chunk (decode steps per round trip) | tok/s | round trips | decode steps |")
        print("|---:|---:|---:|---:|")
        for r in chunk_rows:
            print(f"| {r['chunk']} | {r['tokens_per_s']:.1f} | {r['round_trips_or_batches']} | {r['decode_steps']} |")
    write_json(a.json, {"meta": run_meta(), "load_average_start": load_start, "load_average_end": load_end,
                        "config": {"preset": "OmniConfig.tiny (random)", "stop_tokens": len(stops),
                                   "slots": a.slots, "requests": a.requests, "chunk": a.chunk},
                        "output_lengths": lengths, "rows": rows, "chunks": chunk_rows})


if __name__ == "__main__":
    main()
