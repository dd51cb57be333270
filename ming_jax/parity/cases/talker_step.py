"""Golden kind `talker_step`: the first steps of the release's talker loop, piece by piece, on the case's recorded
noise (`step<k>_y0`, `step<k>_sde_rnd`): step 0 is the LM prefill over `text_ids`, step k > 0 one KV-cached LM
position fed with step k-1's aggregator output.

Outputs: `prefill_inputs_embeds`; per step k `step<k>_{lm_last_hidden, his_lat, gen_lat, agg_embed, stop_logits,
stop_prob}` (+ `step<k>_cache_position` for k > 0); where present, `step<k>_dit_{x,t,out}` (the DiT inputs /
outputs of every Euler step, CFG batch [cond, uncond]) and `step<k>_gen_lat_temperature` (the step's sampler
re-run at temperature `RERUN_TEMPERATURE`); the time grid `cfm_t_epss` / `cfm_t_sway`. Every output of the case is
compared; sizes, steps and sampling settings come from the case's config.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.config.runtime import Runtime
from ming_jax.config.talker import TalkerConfig
from ming_jax.models.talker import flow
from ming_jax.models.talker import talker as tk
from ming_jax.parity import numerics
from ming_jax.parity.golden import GoldenCase
from ming_jax.parity.numerics import runtime_for as _runtime
from ming_jax.weights.talker import load_talker

RERUN_TEMPERATURE = 0.5  # the case's `step0_gen_lat_temperature` re-run (its README: sde_args [cfg, sigma, 0.5])

_prefill = nnx.jit(tk.prefill, static_argnames=("max_len",))
_lm_step = nnx.jit(tk.lm_step)
_sample_step = nnx.jit(tk.sample_step, static_argnames=("taps",))


def build(config: dict, tensors, runtime: Runtime | None = None) -> tk.Talker:
    """The case's talker with every parameter loaded from the official tensors (strict)."""
    return load_talker(tk.create_abstract(TalkerConfig.from_official(config), runtime), tensors)


def compare_all(ours: dict, case: GoldenCase, mode: str) -> list[numerics.Comparison]:
    """One row per output of the case (a failure row for any we do not produce), in the case's order."""
    rows = []
    for key, ref in case.outputs.items():
        if key not in ours:
            rows.append(numerics.Comparison(key, float("nan"), float("nan"), float("nan"), 0.0, False, False,
                                            "the case has it, we do not produce it"))
            continue
        value = np.asarray(ours[key])
        if np.issubdtype(ref.dtype, np.floating):
            value = value.astype(np.float32)
        rows.append(numerics.compare(key, value, ref, dtype=mode))
    return rows


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    model = build(case.config, case.weights, _runtime(mode))
    cfg = model.cfg
    steps = sorted(int(m.group(1)) for k in case.inputs if (m := re.fullmatch(r"step(\d+)_y0", k)))
    if steps != list(range(len(steps))) or not steps:
        raise ValueError(f"{case.path}: expected inputs step0_y0 .. step<K>_y0, got steps {steps}")
    gen = cfg.generate
    args = tk.SamplerArgs.of(gen.cfg, gen.sigma, gen.temperature)
    ids = jnp.asarray(case.inputs["text_ids"])
    embeds = model.llm.embed_tokens(ids)
    b, t = ids.shape
    lengths = jnp.full((b,), t, jnp.int32)
    ours = {"prefill_inputs_embeds": embeds, "cfm_t_epss": flow.epss_times(cfg.steps),
            "cfm_t_sway": flow.time_grid(cfg.steps, cfg.sway_coef)}
    prompt = case.inputs.get("prompt_wav_lat")
    history = tk.initial_history(cfg, b, prompt)
    hidden, h_t, cache = _prefill(model, embeds, lengths, max_len=t + len(steps))
    next_embed = None
    for k in steps:
        if k:  # one cached LM position, fed with the previous step's aggregator output
            ours[f"step{k}_cache_position"] = np.asarray(cache.length).reshape(1).astype(np.int64)
            h_t, cache = _lm_step(model, next_embed, lengths + (k - 1), cache)
            hidden = h_t[:, None]
        y0, sde = jnp.asarray(case.inputs[f"step{k}_y0"]), jnp.asarray(case.inputs[f"step{k}_sde_rnd"])
        step, taps = _sample_step(model, h_t, history, y0, sde, args, taps=True)
        ours.update({f"step{k}_lm_last_hidden": hidden, f"step{k}_his_lat": history,
                     f"step{k}_gen_lat": step.latents, f"step{k}_agg_embed": step.next_embed[:, None],
                     f"step{k}_stop_logits": step.stop_logits, f"step{k}_stop_prob": step.stop_prob,
                     **{f"step{k}_{name}": value for name, value in taps.items()}})
        if f"step{k}_gen_lat_temperature" in case.outputs:
            hot, _ = _sample_step(model, h_t, history, y0, sde, tk.SamplerArgs.of(gen.cfg, gen.sigma,
                                                                                 RERUN_TEMPERATURE), taps=True)
            ours[f"step{k}_gen_lat_temperature"] = hot.latents  # (the taps program again: no extra compile)
        history, next_embed = step.history, step.next_embed
    return compare_all(ours, case, mode)
