"""ming_jax against the official PyTorch BailingMoeV2, same config and same weights, in one run.

    python -m benchmarks.vs_torch --official /path/to/Ming2 [--reps 4] [--threads 2] [--cases all]
        [--json PATH (default $TMPDIR/ming_jax_vs_torch.json)] [--tiny]

`--official` is a folder holding the release's python files, unmodified (e.g. a scratch export of github
Zihhan318/Ming2): `modeling_bailing_moe_v2.py`, `configuration_bailing_moe_v2.py`, `modeling_utils.py`. Without it
(or with files missing) the script says so and exits 0 having measured nothing. Nothing of the official code is
stored in this project; it is imported from that folder as it is. Needs torch and transformers.

Config (issue 13): hidden 1024, 4 layers (the first dense, intermediate 2304 = hidden x 9216 / 4096 as in
Ling-flash-2.0), 16 heads / 4 KV heads, head_dim 128 (partial rotary 0.5, video rope), 64 experts top-8 (n_group 8,
topk_group 4), moe_intermediate 256, 1 shared expert, MultiRouter, vocab 8192, float32: 199M parameters.

How it runs:
1. A child process builds the official `BailingMoeV2ForCausalLM` at that config, fills every parameter from one
   seeded generator (`tools/make_train_reference.fill_weights`: matrices N(0, 1) / sqrt(fan_in), embeddings N(0, 1),
   norm scales 1 + N(0, 0.1), expert biases N(0, 0.1)) and writes a release folder (config.json +
   model.safetensors) to a scratch directory.
2. Two worker processes load that folder: "torch" (the official model, `torch.set_num_threads(--threads)`, eager
   attention, `torch.inference_mode`) and "jax" (`ming_jax.checkpoint.restore.load`, through the weight table, as a
   user loads a release). Each side runs alone in its own process, so its peak RSS (`getrusage`) is its own; a
   worker waits idle on its pipe while the other one is timed.
3. Each case is first run once per side untimed (for jax: tracing + XLA compile + one run, reported as compile s),
   then `--reps` timed rounds in ABBA order (torch, jax, jax, torch, ...), so neither side always runs second.
   The median is reported. tok/s counts the tokens a case processes (prefill: B x S; generate / decode: B x new
   tokens; MoE: T).
4. Checks: max-abs difference of the 1 x 512 logits, the MoE block's outputs, and whether the greedy tokens of both
   generate cases are identical.

Cases (both sides compute the same thing):
  prefill_1x512, prefill_4x256   full forward without a cache, logits at every position
                                 (jax: `multimodal.prepare` + `ming_jax.gen.text.forward`; torch: `model(ids)`)
  generate_b1, generate_b8       128-token prompt + 64 greedy tokens (jax: `ming_jax.gen.text.generate`, the
                                 jitted prefill + `while_loop`; torch: the prefill into a `DynamicCache`, then a
                                 per-token Python loop of one-token forwards with argmax, as HF `generate` runs it
                                 without its extras)
  decode_b1, decode_b8           the 63 one-token steps of generate alone (the prefill before it is not timed)
  moe_t2048                      the first MoE layer's block alone on 2048 random tokens (jax: `MoEBlock` under jit;
                                 torch: `BailingMoeV2SparseMoeBlock.forward`)

The official code against transformers 4.57: `DynamicCache.get_usable_length` (removed from transformers in 4.49)
is called by the official attention on every cached step; when absent it is added to the class at run time as what
it returned for a dynamic cache (the cached length of the layer). Nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

OFFICIAL_FILES = ("modeling_bailing_moe_v2.py", "configuration_bailing_moe_v2.py", "modeling_utils.py")
SEED = 0
TEXT_IDS = 8000  # prompt tokens are drawn from [0, TEXT_IDS); the special ids sit above

CONFIG = dict(
    architectures=["BailingMoeV2ForCausalLM"], model_type="bailing_moe_v2", vocab_size=8192, hidden_size=1024,
    intermediate_size=2304, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16,
    num_key_value_heads=4, head_dim=128, partial_rotary_factor=0.5, moe_intermediate_size=256, num_experts=64,
    num_experts_per_tok=8, num_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
    router_type="MultiRouter", use_expert_bias=True, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=2400000,
    rope_scaling={"type": "video_rope", "factor": None}, max_position_embeddings=4096, use_qkv_bias=False,
    use_bias=False, tie_word_embeddings=False, spatial_merge_size=2, use_interleaved_frame_timestamp=True,
    tokens_per_second=2, hidden_act="silu", attention_dropout=0.0, output_dropout=0.0, embedding_dropout=0.0,
    use_cache=True, torch_dtype="float32", eos_token_id=8100, pad_token_id=8101, image_patch_token=8102,
    video_patch_token=8103, image_start_token=8104, video_start_token=8105,
)
# --tiny: the same code paths at a size that runs in seconds (a smoke test of the script, not a benchmark)
TINY = dict(hidden_size=128, intermediate_size=288, num_attention_heads=4, num_key_value_heads=2,
            moe_intermediate_size=32, num_experts=16, n_group=4, topk_group=2)

PROMPT, NEW = 128, 64
CASES = {  # name: (kind, batch, sequence / tokens)
    "prefill_1x512": ("prefill", 1, 512),
    "prefill_4x256": ("prefill", 4, 256),
    "generate_b1": ("generate", 1, PROMPT),
    "generate_b8": ("generate", 8, PROMPT),
    "decode_b1": ("decode", 1, PROMPT),
    "decode_b8": ("decode", 8, PROMPT),
    "moe_t2048": ("moe", 1, 2048),
}
SIDES = ("torch", "jax")


def case_tokens(name: str) -> int:
    """Tokens one run of the case processes (what tok/s counts)."""
    kind, b, s = CASES[name]
    if kind == "generate":
        return b * NEW
    if kind == "decode":
        return b * (NEW - 1)  # the first new token comes from the prefill's logits
    return b * s


def case_ids(name: str) -> np.ndarray:
    """The prompt of a case ([B, S] int64), the same on both sides."""
    _, b, s = CASES[name]
    rng = np.random.default_rng([SEED, b, s])
    return rng.integers(0, TEXT_IDS, (b, s)).astype(np.int64)


def moe_input(hidden: int, t: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, t, hidden)).astype(np.float32)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


# ------------------------------------------------------------------------------------------------ official side


def import_official(folder: str):
    """(modeling module, configuration module) from `folder`, unmodified; `get_usable_length` put back on
    transformers' DynamicCache if this transformers lacks it (see the module docstring)."""
    import transformers  # noqa: F401  (imported before the official files, which import from it)
    from transformers.cache_utils import DynamicCache

    sys.path.insert(0, os.path.abspath(folder))
    import configuration_bailing_moe_v2 as conf
    import modeling_bailing_moe_v2 as mod

    if not hasattr(DynamicCache, "get_usable_length"):
        def get_usable_length(self, new_seq_length: int, layer_idx: int = 0) -> int:
            return self.get_seq_length(layer_idx)  # transformers <= 4.48 for a cache without a maximum length

        DynamicCache.get_usable_length = get_usable_length
    return mod, conf


def official_model(folder: str, config: dict, threads: int):
    import torch

    torch.set_num_threads(threads)
    mod, conf = import_official(folder)
    cfg = conf.BailingMoeV2Config(**config)
    cfg._attn_implementation = "eager"
    model = mod.BailingMoeV2ForCausalLM(cfg).float().eval()
    return model, torch


def make_weights(folder: str, out: str, config: dict) -> None:
    """The official model at `config`, every parameter from one seeded generator, as a release folder at `out`."""
    from tools.make_train_reference import fill_weights  # the same seeded fill as the train-step reference data

    model, torch = official_model(folder, config, 2)
    fill_weights(model, torch, SEED)
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n}))


class TorchSide:
    def __init__(self, folder: str, release: str, threads: int):
        from safetensors import safe_open

        t0 = time.perf_counter()
        with open(os.path.join(release, "config.json")) as f:
            config = json.load(f)
        self.model, self.torch = official_model(folder, config, threads)
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        with safe_open(os.path.join(release, "model.safetensors"), "pt") as f, self.torch.no_grad():
            for k in f.keys():  # one tensor at a time into the module (no second copy of the state dict)
                params[k].copy_(f.get_tensor(k))
        self.config = config
        self.load_s = time.perf_counter() - t0

    def run(self, name: str):
        torch = self.torch
        kind, b, s = CASES[name]
        with torch.inference_mode():
            if kind == "moe":
                x = torch.from_numpy(moe_input(self.config["hidden_size"], s))
                t0 = time.perf_counter()
                y = self.model.model.layers[self.config["first_k_dense_replace"]].mlp(x, None, None)[0]
                return time.perf_counter() - t0, y.numpy()
            ids = torch.from_numpy(case_ids(name))
            if kind == "prefill":
                t0 = time.perf_counter()
                logits = self.model(input_ids=ids, use_cache=False, return_dict=True).logits
                return time.perf_counter() - t0, logits.numpy()
            from transformers.cache_utils import DynamicCache

            t0 = time.perf_counter()
            cache = DynamicCache()
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, return_dict=True)
            tok = out.logits[:, -1].argmax(-1)
            t1 = time.perf_counter()
            tokens = [tok]
            for _ in range(NEW - 1):
                out = self.model(input_ids=tok[:, None], past_key_values=cache, use_cache=True, return_dict=True)
                tok = out.logits[:, -1].argmax(-1)
                tokens.append(tok)
            t2 = time.perf_counter()
            return (t2 - t0 if kind == "generate" else t2 - t1), torch.stack(tokens, 1).numpy()


# ------------------------------------------------------------------------------------------------ ming_jax side


class JaxSide:
    def __init__(self, release: str):
        import jax
        from flax import nnx

        from ming_jax.checkpoint import restore
        from ming_jax.gen import text as generation
        from ming_jax.models import inputs as multimodal

        self.jax, self.nnx, self.generation, self.multimodal = jax, nnx, generation, multimodal
        t0 = time.perf_counter()
        self.model = restore.load(release, components=("llm",)).llm
        jax.block_until_ready(nnx.state(self.model))
        self.load_s = time.perf_counter() - t0
        self.cfg = self.model.cfg
        # The first MoE layer as a module of its own (a slice of the stacked layers), its block jitted alone.
        self.moe_graph, self.moe_state = nnx.split(self.model.layer(len(self.model.dense_layers)).moe)

        @jax.jit
        def moe_fwd(state, x):
            return nnx.merge(self.moe_graph, state)(x)[0]

        self.moe_fwd = moe_fwd

    def run(self, name: str):
        jax, generation, multimodal = self.jax, self.generation, self.multimodal
        kind, b, s = CASES[name]
        if kind == "moe":
            x = jax.numpy.asarray(moe_input(self.cfg.hidden_size, s))
            t0 = time.perf_counter()
            y = jax.block_until_ready(self.moe_fwd(self.moe_state, x))
            return time.perf_counter() - t0, np.asarray(y)
        ids = case_ids(name)
        if kind == "prefill":
            t0 = time.perf_counter()
            prep = multimodal.prepare(self.cfg, ids)
            logits = jax.block_until_ready(generation.forward(self.model, prep)[1].logits)
            return time.perf_counter() - t0, np.asarray(logits)
        sampling = generation.SamplingConfig(max_new_tokens=NEW)
        if kind == "generate":
            t0 = time.perf_counter()
            gen = generation.generate(self.model, multimodal.prepare(self.cfg, ids), sampling)
            tokens = jax.block_until_ready(gen.tokens)
            return time.perf_counter() - t0, np.asarray(tokens)
        args, kw = decode_call(self.model, ids, sampling)
        t0 = time.perf_counter()
        gen, _ = generation._decode(*args, **kw)
        tokens = jax.block_until_ready(gen.tokens)
        return time.perf_counter() - t0, np.asarray(tokens)


def decode_call(model, ids: np.ndarray, sampling):
    """The decode case: `generate`'s first jitted stage (the prefill) run to completion, and the arguments of its
    second, `ming_jax.gen.text._decode` (the whole decode loop), as `generate` calls them: (args, kwargs) for timing
    the decode alone or lowering it."""
    import jax

    from ming_jax.gen import text as generation
    from ming_jax.models import inputs as multimodal

    graphdef, state, logits, cache, next_pos, pad_id = generation._prefilled(
        model, multimodal.prepare(model.cfg, ids), sampling, None, 64, None)
    jax.block_until_ready((logits, cache))
    return ((graphdef, state, logits, next_pos, cache, jax.random.key(0), None, None),
            {"sampling": sampling, "pad_id": pad_id, "return_logits": False})


# ------------------------------------------------------------------------------------------------ worker protocol


def worker(side: str, folder: str, release: str, threads: int) -> None:
    """Answer one JSON request per stdin line on the original stdout; anything libraries print goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    impl = TorchSide(folder, release, threads) if side == "torch" else JaxSide(release)
    proto.write(json.dumps({"load_s": impl.load_s, "rss_gib": rss_gib(), "peak_rss_gib": peak_rss_gib()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            proto.write(json.dumps({"rss_gib": rss_gib(), "peak_rss_gib": peak_rss_gib()}) + "\n")
            return
        seconds, out = impl.run(req["case"])
        if req.get("save"):
            np.save(req["save"], out)
        proto.write(json.dumps({"s": seconds}) + "\n")


class Worker:
    def __init__(self, side: str, args, release: str):
        cmd = [sys.executable, "-m", "benchmarks.vs_torch", "--worker", side, "--official", args.official,
               "--release", release, "--threads", str(args.threads)]
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.side} worker exited (status {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        stats = self.ask(op="quit")
        self.proc.wait()
        return stats


# ------------------------------------------------------------------------------------------------ main


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", help="folder with the official python files (unmodified)")
    p.add_argument("--reps", type=int, default=4, help="timed rounds per case and side (ABBA order)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--cases", default="all", help=f"comma list of {', '.join(CASES)} (default all)")
    p.add_argument("--tiny", action="store_true", help="a small config: checks the script, measures nothing useful")
    p.add_argument("--json", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ming_jax_vs_torch.json"))
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--release", help=argparse.SUPPRESS)
    p.add_argument("--make-weights", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    config = dict(CONFIG, **(TINY if a.tiny else {}))
    if a.worker:
        worker(a.worker, a.official, a.release, a.threads)
        return 0
    if a.make_weights:
        make_weights(a.official, a.make_weights, config)
        return 0
    if not a.official:
        print("vs_torch: skipped, no --official folder given (the official Ming-flash-omni 2.0 python files, e.g. "
              "a checkout of github Zihhan318/Ming2); nothing was measured")
        return 0
    missing = [f for f in OFFICIAL_FILES if not os.path.exists(os.path.join(a.official, f))]
    if missing:
        print(f"vs_torch: skipped, --official {a.official} lacks {', '.join(missing)}; nothing was measured")
        return 0
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"vs_torch: skipped, the official side needs torch and transformers ({e}); nothing was measured")
        return 0
    cases = list(CASES) if a.cases == "all" else a.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")

    from benchmarks.results import run_meta, write_json

    scratch = tempfile.mkdtemp(prefix="ming_jax_vs_torch.")
    try:
        release = os.path.join(scratch, "release")
        load_before = loadavg()
        made = subprocess.run([sys.executable, "-m", "benchmarks.vs_torch", "--official", a.official,
                               "--make-weights", release] + (["--tiny"] if a.tiny else []),
                              check=True, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        n_params = json.loads(made.stdout.strip().splitlines()[-1])["params"]
        print(f"release written: {n_params / 1e6:.1f}M parameters, float32; load average {load_before}", flush=True)
        workers = {"torch": Worker("torch", a, release), "jax": Worker("jax", a, release)}
        rows = {}
        for name in cases:
            row = rows[name] = {"case": name, "tokens": case_tokens(name)}
            for side in SIDES:  # untimed first run (jax: trace + compile + run)
                save = os.path.join(scratch, f"{side}_{name}.npy")
                row[f"{side}_first_s"] = workers[side].ask(op="run", case=name, save=save)["s"]
                row[f"{side}_times"] = []
            for r in range(a.reps):
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):  # torch jax | jax torch | ...
                    row[f"{side}_times"].append(workers[side].ask(op="run", case=name)["s"])
            for side in SIDES:
                med = statistics.median(row[f"{side}_times"])
                row[f"{side}_median_s"] = med
                row[f"{side}_tok_s"] = row["tokens"] / med
            row["ratio"] = row["jax_tok_s"] / row["torch_tok_s"]
            row["jax_compile_s"] = max(0.0, row["jax_first_s"] - row["jax_median_s"])
            ours, ref = (np.load(os.path.join(scratch, f"{side}_{name}.npy")) for side in ("jax", "torch"))
            if CASES[name][0] in ("generate", "decode"):
                row["tokens_identical"] = bool(ours.shape == ref.shape and (ours == ref).all())
                row["tokens_agree_frac"] = float((ours == ref).mean()) if ours.shape == ref.shape else 0.0
            else:
                row["max_abs_diff"] = float(np.abs(ours - ref).max())
                row["max_abs_ref"] = float(np.abs(ref).max())
            print(f"{name}: torch {row['torch_tok_s']:.1f} tok/s, jax {row['jax_tok_s']:.1f} tok/s, "
                  f"ratio {row['ratio']:.2f} (load {loadavg()})", flush=True)
        rss = {side: {**w.hello, **{f"end_{k}": v for k, v in w.close().items()}} for side, w in workers.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    load_after = loadavg()
    print(f"\nming_jax vs official BailingMoeV2, {n_params / 1e6:.0f}M params float32, torch {a.threads} threads, "
          f"{os.cpu_count()} CPUs, {a.reps} timed rounds per side (ABBA), load average before {load_before} "
          f"after {load_after}")
    print("| case | ming_jax tok/s | official tok/s | ratio | jax compile s | check |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        check = (("tokens identical" if r["tokens_identical"] else f"tokens agree {r['tokens_agree_frac']:.1%}")
                 if "tokens_identical" in r else f"max-abs {r['max_abs_diff']:.1e} (of {r['max_abs_ref']:.1f})")
        print(f"| {name} | {r['jax_tok_s']:.1f} | {r['torch_tok_s']:.1f} | {r['ratio']:.2f} | "
              f"{r['jax_compile_s']:.1f} | {check} |")
    pj, pt = rss["jax"]["end_peak_rss_gib"], rss["torch"]["end_peak_rss_gib"]
    print(f"peak RSS: ming_jax {pj:.2f} GiB, official {pt:.2f} GiB (ratio {pj / pt:.2f}); after loading: "
          f"{rss['jax']['rss_gib']:.2f} / {rss['torch']['rss_gib']:.2f} GiB; load s {rss['jax']['load_s']:.1f} / "
          f"{rss['torch']['load_s']:.1f}")
    out = {**run_meta(), "config": config, "params": n_params, "threads": a.threads, "reps": a.reps,
           "tiny": a.tiny, "loadavg_before": load_before, "loadavg_after": load_after, "rss": rss,
           "results": list(rows.values())}
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
