"""Golden kind `talker_generate`: the release's whole talker loop (`BailingTalker2.generate`) run until the stop head
fires, here as ONE jitted `ming_jax.gen.speech.generate_speech` call on the case's recorded noise (`y0` [N, B, P, C],
`sde_rnd` [N, steps, B, P, C]; the step buffer is N steps).

Outputs: `prefill_inputs_embeds`, `step_latents` [S, P, C], `all_latents` [B, S P, C], `stop_flags` [S] (1 at the
step the stop head ended the utterance), `stop_step` [1], and per step `step_lm_hidden` [S, B, H], `step_agg_embed`
[S, B, H], `step_stop_prob` [S, 2], `step_his_lat` [S, Hp, C], S = the steps we ran (a different stop gives a shape
failure). The sampling settings (cfg, sigma, temperature, min_new_token) come from the case's config.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ming_jax.gen import speech
from ming_jax.parity import numerics
from ming_jax.parity.cases.talker_step import build, compare_all
from ming_jax.parity.golden import GoldenCase
from ming_jax.parity.numerics import runtime_for as _runtime


def run(case: GoldenCase, mode: str = "float32") -> list[numerics.Comparison]:
    model = build(case.config, case.weights, _runtime(mode))
    ids = jnp.asarray(case.inputs["text_ids"])
    if ids.shape[0] != 1:
        raise ValueError(f"{case.path}: the case is one utterance, text_ids is {tuple(ids.shape)}")
    embeds = model.llm.embed_tokens(ids)
    noise = speech.Noise(jnp.asarray(case.inputs["y0"]), jnp.asarray(case.inputs["sde_rnd"]))
    out = speech.generate_speech(model, embeds, prompt_latents=case.inputs.get("prompt_wav_lat"), noise=noise,
                                 taps=True)
    n = int(out.steps[0])
    p = model.cfg.patch_size
    flags = np.zeros((n,), np.int64)
    if n and bool(out.stopped[0]):
        flags[-1] = 1
    latents = np.asarray(out.latents[:, :n * p])  # [1, S P, C]
    ours = {"prefill_inputs_embeds": embeds, "all_latents": latents,
            "step_latents": latents[0].reshape(n, p, -1), "stop_flags": flags,
            "stop_step": np.asarray([n - 1], np.int64), "step_lm_hidden": out.taps["lm_hidden"][:n],
            "step_agg_embed": out.taps["agg_embed"][:n], "step_stop_prob": out.taps["stop_prob"][:n, 0],
            "step_his_lat": out.taps["history"][:n, 0]}
    return compare_all(ours, case, mode)
