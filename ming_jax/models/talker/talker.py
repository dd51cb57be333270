"""The talker (the release's `BailingTalker2` without its text / voice front end): a Qwen2 LM over prompt
embeddings, then one LM position per generated patch of `patch_size` acoustic latents.

One step, given h_t [B, H] (the LM's last hidden state) and the latent history [B, Hp, C]:

    latents    = flow sampler(h_t, history, noise)                     [B, P, C]   (`flow.sample`)
    next_embed = aggregator(latents)                                   [B, H]      (the LM's next input)
    stop_prob  = softmax(stop_head(h_t))                               [B, 2]      (on the SAME h_t)
    history    = [history ; latents][-Hp:]                             (the last Hp - P kept, the P new appended)

Stop rule: a row stops at step s (0-based) when s > min_new_token and stop_prob[1] > 0.5; that step's latents are
still emitted. The history starts as zeros with the voice-prompt latents right-aligned in it (only the last Hp if
longer). The LM is fed `next_embed` at the next position through its KV cache (`Qwen2Model` with a `Qwen2Cache`);
the whole loop is `ming_jax.gen.speech`. `spk_head` (speaker embedding -> LM width) is built and loaded for the
prompt front end, which is not part of this module.

Parameter axis names: the LM's, the heads' (`flow`, `aggregator`), and ("embed", None) / (None, "embed") for the
stop / speaker heads. No new names.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.runtime import Runtime
from ming_jax.config.talker import TalkerConfig
from ming_jax.layers.linear import Linear
from ming_jax.models.qwen2 import Qwen2Cache, Qwen2Model
from ming_jax.models.talker import flow
from ming_jax.models.talker.aggregator import Aggregator

STOP_THRESHOLD = 0.5


class Talker(nnx.Module):
    """`llm` (the release's `model`), `flow` (`cfm.model`), `aggregator`, `stop_head`, `spk_head`."""

    def __init__(self, cfg: TalkerConfig, runtime: Runtime | None = None, *, rngs: nnx.Rngs):
        runtime = Runtime() if runtime is None else runtime
        pdt = jnp.dtype(runtime.param_dtype)
        h = cfg.hidden_size
        self.cfg = cfg
        self.runtime = runtime
        self.llm = Qwen2Model(cfg.llm, runtime, rngs=rngs)
        self.flow = flow.FlowDiT(cfg.flow, runtime, rngs=rngs)
        self.aggregator = Aggregator(cfg.aggregator, h, runtime, rngs=rngs)
        self.stop_head = Linear(h, 2, ("embed", None), param_dtype=pdt, rngs=rngs)
        self.spk_head = Linear(cfg.speaker_dim, h, (None, "embed"), param_dtype=pdt, rngs=rngs)


def create(cfg: TalkerConfig, runtime: Runtime | None = None, *, seed: int = 0) -> Talker:
    return Talker(cfg, runtime, rngs=nnx.Rngs(seed))


def create_abstract(cfg: TalkerConfig, runtime: Runtime | None = None) -> Talker:
    """The talker with `jax.ShapeDtypeStruct` leaves (fill it with `ming_jax.weights.talker.load_talker`)."""
    return nnx.eval_shape(lambda: Talker(cfg, runtime, rngs=nnx.Rngs(0)))


# --- the latent history ----------------------------------------------------------------------------------------------


def initial_history(cfg: TalkerConfig, batch: int, prompt_latents=None, prompt_lengths=None):
    """[B, Hp, C] float32: zeros with each row's voice-prompt latents right-aligned (their last Hp if longer).

    prompt_latents [B, N, C] left-aligned (row b's first prompt_lengths[b] latents are real; None: N each)."""
    hp, c = cfg.history_patch_size, cfg.latent_dim
    if prompt_latents is None:
        return jnp.zeros((batch, hp, c), jnp.float32)
    lat = jnp.asarray(prompt_latents, jnp.float32)
    n = lat.shape[1]
    lengths = jnp.full((batch,), n, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    src = lengths[:, None] - hp + jnp.arange(hp)[None, :]  # [B, Hp]: the prompt latent in each history slot
    rows = jnp.take_along_axis(lat, jnp.clip(src, 0, max(n - 1, 0))[..., None], axis=1) if n else \
        jnp.zeros((batch, hp, c), jnp.float32)
    return jnp.where((src >= 0)[..., None], rows, 0.0)


def update_history(history, latents):
    """[B, Hp, C], [B, P, C] -> the last Hp of [history ; latents] (= the new latents alone when Hp == P)."""
    hp = history.shape[1]
    return jnp.concatenate([history, latents.astype(history.dtype)], axis=1)[:, -hp:]


# --- one step --------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerArgs:
    """The per-call sampling knobs, as traced scalars (new values reuse the compiled program)."""

    cfg: jax.Array  # guidance strength
    sigma: jax.Array
    temperature: jax.Array

    @classmethod
    def of(cls, cfg=2.0, sigma=0.25, temperature=0.0) -> "SamplerArgs":
        f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return cls(f(cfg), f(sigma), f(temperature))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepOut:
    latents: jax.Array  # [B, P, C] float32
    next_embed: jax.Array  # [B, H] the aggregator output: the LM's next input embedding
    stop_logits: jax.Array  # [B, 2] float32
    stop_prob: jax.Array  # [B, 2] float32
    history: jax.Array  # [B, Hp, C] after appending `latents`


def sample_step(talker: Talker, h_t, history, y0, sde_noise, args: SamplerArgs, *, taps: bool = False):
    """h_t [B, H], history [B, Hp, C], y0 [B, P, C], sde_noise [steps, B, P, C] -> StepOut (and the sampler's DiT
    taps with taps=True). The release's `_sample_step` plus the history update."""
    cfg = talker.cfg
    out = flow.sample(talker.flow, h_t, history, y0, sde_noise, steps=cfg.steps, cfg_strength=args.cfg,
                      sigma=args.sigma, temperature=args.temperature, sway_coef=cfg.sway_coef, taps=taps)
    latents, recorded = out if taps else (out, None)
    next_embed = talker.aggregator(latents)[:, 0]  # [B, H]
    with jax.named_scope("stop_head"):
        logits = talker.stop_head(h_t.astype(talker.runtime.dtype)).astype(jnp.float32)
    step = StepOut(latents, next_embed, logits, jax.nn.softmax(logits, axis=-1), update_history(history, latents))
    return (step, recorded) if taps else step


def should_stop(step, stop_prob, min_new_token):
    """[B] bool: the release's rule, step > min_new_token and p(stop) > 0.5 (step 0-based)."""
    return (step > min_new_token) & (stop_prob[:, 1] > STOP_THRESHOLD)


# --- the LM ------------------------------------------------------------------------------------------------------


def prefill(talker: Talker, embeds, lengths, max_len: int):
    """embeds [B, T, H] right-padded (row b real in 0 .. lengths[b]-1) -> (hidden [B, T, H], h_t [B, H] at each
    row's last real token, a cache of `max_len` slots holding the T prompt slots, padding invalid)."""
    b, t, _ = embeds.shape
    real = jnp.arange(t)[None, :] < lengths[:, None]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = Qwen2Cache.create(talker.cfg.llm, b, max_len, talker.runtime.dtype)
    hidden, cache = talker.llm(embeds, positions=positions, segment_ids=real.astype(jnp.int32), cache=cache,
                               prefill=True)
    h_t = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return hidden, h_t, cache


def lm_step(talker: Talker, embed, positions, cache: Qwen2Cache):
    """embed [B, H] at rope positions [B] into the next cache slot -> (h [B, H], the updated cache)."""
    hidden, cache = talker.llm(embed[:, None, :], positions=positions[:, None], cache=cache)
    return hidden[:, 0], cache
