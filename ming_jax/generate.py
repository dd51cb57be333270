"""Text generation CLI.

    python -m ming_jax.generate --checkpoint DIR --prompt "Hello" [--prompt "Another"] --max_new_tokens 64
    python -m ming_jax.generate                     # no checkpoint: the tiny preset with RANDOM weights

DIR is an official release folder (config.json, safetensors shards, tokenizer.json). Several --prompt flags run as
one padded batch. All logic lives in `ming_jax.generation`; this file only parses flags and prints.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Official checkpoint folder (config.json + safetensors).")
_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "ming-flash-omni-2.0"],
                            "Model preset used when no --checkpoint is given (weights are random).")
_PROMPT = flags.DEFINE_multi_string("prompt", ["The quick brown fox"], "Prompt text; repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling / random-weights seed.")
_PADDING = flags.DEFINE_enum("padding_side", "left", ["left", "right"], "How the prompt batch is padded.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's).")


class _Progress:
    def __init__(self, total: int):
        self.total, self.t0 = total, time.perf_counter()

    def __call__(self, step, running):
        step, running = int(step), int(running)
        rate = step / max(time.perf_counter() - self.t0, 1e-9)
        sys.stderr.write(f"\rdecoding {step}/{self.total} tokens, {running} row(s) running, {rate:.1f} steps/s ")
        sys.stderr.flush()


def main(argv):
    del argv
    from ming_jax import generation, model as model_lib, multimodal, official, tokenizer
    from ming_jax.config.llm import PRESETS

    overrides = {"dtype": _DTYPE.value} if _DTYPE.value else {}
    if _CHECKPOINT.value:
        print(f"loading {_CHECKPOINT.value} ...", file=sys.stderr)
        model = official.load_llm(_CHECKPOINT.value, **overrides)
        tok = tokenizer.ReleaseTokenizer(_CHECKPOINT.value)
    else:
        if _PRESET.value != "tiny":
            raise app.UsageError(f"preset {_PRESET.value} needs --checkpoint: random weights of that size are "
                                 "neither useful nor likely to fit in memory")
        cfg = PRESETS["tiny"](**overrides)
        print("No --checkpoint given: running the TINY preset with RANDOM weights. The output is meaningless text; "
              "it only shows the pipeline working end to end.", file=sys.stderr)
        model = model_lib.create(cfg, seed=_SEED.value)
        tok = tokenizer.ByteTokenizer(cfg.vocab_size)
    cfg = model.cfg
    print(f"model: {cfg.num_layers} layers, {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}), "
          f"{model_lib.param_count(model) / 1e6:.1f}M parameters, dtype {cfg.dtype}", file=sys.stderr)

    ids, mask = generation.pad_prompts([tok.encode(p) for p in _PROMPT.value], side=_PADDING.value,
                                       pad_id=cfg.pad_token_id or 0)
    prep = multimodal.prepare(cfg, ids, mask)
    sampling = generation.SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                         top_k=_TOP_K.value, top_p=_TOP_P.value, stop_tokens=cfg.eos_ids)
    t0 = time.perf_counter()
    out = generation.generate(model, prep, sampling, seed=_SEED.value, progress=_Progress(_MAX_NEW.value))
    out = generation.as_numpy(out)
    sys.stderr.write(f"\ndone in {time.perf_counter() - t0:.1f} s (including compilation)\n")
    for prompt, toks, n in zip(_PROMPT.value, out.tokens, out.lengths):
        print(f"--- prompt: {prompt!r}")
        print(f"+++ {n} tokens: {tok.decode(toks[:n])!r}")
        print(f"    ids: {toks[:n].tolist()}")
    return 0


if __name__ == "__main__":
    app.run(main)
