"""Speech generation with the talker, jitted: one LM prefill over the prompt embeddings, then ONE `lax.while_loop`
over steps (flow sampler -> aggregator -> stop head -> history update -> one KV-cached LM position). No Python
runs per step; nothing is recompiled for another utterance length within a bucket (prompt lengths padded to a
multiple of `prompt_bucket`, the step buffer sized `max_steps`), nor for other sampling knobs (cfg, sigma,
temperature, min_new_token and the per-row caps are traced).

Batch: B utterances of different prompt lengths (right-padded; cache slots shared, padding slots invalid, rope
positions per row), each stopping on its own: a row stops at the first step s > min_new_token whose stop
probability exceeds 0.5 (that step's latents emitted), or when it reaches its cap min(max_new_steps[b],
max_steps (config, 1000), max_cache_len (config, 2048) - prompt length, the buffer). The loop ends when every row
has stopped. Rows run independently: a batch gives each row what it gets alone (up to float rounding).

Noise: y0 [B, P, C] and the Euler noise [steps, B, P, C] of step s are drawn from fold_in(row key, s) (one key
per row, so a row's noise does not depend on its batch), or injected (`Noise`, e.g. the recorded noise of the
release's run: the parity path).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.models.talker import talker as tk
from ming_jax.models.talker.talker import SamplerArgs, Talker


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Noise:
    """Injected noise of every step: y0 [N, B, P, C] and sde [N, steps, B, P, C] (N >= the steps that run)."""

    y0: jax.Array
    sde: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeechOutput:
    latents: jax.Array  # [B, N * P, C] float32; zeros past each row's length
    lengths: jax.Array  # [B] int32 latent frames emitted (= steps * P)
    steps: jax.Array  # [B] int32 steps emitted
    stopped: jax.Array  # [B] bool: the stop head ended the row (False: its cap did)
    taps: dict | None = None  # taps=True, per step [N, B, ...]: lm_hidden, agg_embed, stop_prob, history (input)


def _row_noise(keys, step, shape_y0, steps):
    """Per-row draws for one step: keys [B] -> y0 [B, P, C], sde [steps, B, P, C]."""

    def one(key):
        k0, k1 = jax.random.split(jax.random.fold_in(key, step))
        return jax.random.normal(k0, shape_y0, jnp.float32), jax.random.normal(k1, (steps,) + shape_y0, jnp.float32)

    y0, sde = jax.vmap(one)(keys)  # [B, P, C], [B, steps, P, C]
    return y0, jnp.swapaxes(sde, 0, 1)


def _loop(graphdef, state, embeds, lengths, history, caps, min_new, args, keys, noise, *, max_steps, taps):
    fresh = lambda: nnx.merge(graphdef, state, copy=True)  # noqa: E731  (a module at the current trace level)
    talker = fresh()
    cfg = talker.cfg
    b, t, h = embeds.shape
    p, c = cfg.patch_size, cfg.latent_dim
    _, h_t, cache = tk.prefill(talker, embeds, lengths, t + max_steps)
    buf = jnp.zeros((b, max_steps * p, c), jnp.float32)
    rec = None
    if taps:
        z = lambda *s: jnp.zeros((max_steps, b) + s, jnp.float32)  # noqa: E731
        rec = dict(lm_hidden=z(h), agg_embed=z(h), stop_prob=z(2), history=z(cfg.history_patch_size, c))
    done = caps <= 0
    zeros = jnp.zeros((b,), jnp.int32)
    carry = (jnp.int32(0), h_t.astype(jnp.float32), history, cache, done, zeros, jnp.zeros((b,), bool), buf, rec)

    def cond(carry):
        s, done = carry[0], carry[4]
        return (s < max_steps) & ~jnp.all(done)

    def body(carry):
        s, h_t, hist, cache, done, emitted, stopped, buf, rec = carry
        if noise is None:
            y0, sde = _row_noise(keys, s, (p, c), cfg.steps)
        else:
            y0 = jax.lax.dynamic_index_in_dim(noise.y0, s, 0, keepdims=False)
            sde = jax.lax.dynamic_index_in_dim(noise.sde, s, 0, keepdims=False)
        out = tk.sample_step(fresh(), h_t, hist, y0, sde, args)
        active = ~done
        buf = jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(active[:, None, None], out.latents, 0.0), s * p, 1)
        if taps:
            put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), s, 0)  # noqa: E731
            rec = dict(lm_hidden=put(rec["lm_hidden"], h_t), agg_embed=put(rec["agg_embed"], out.next_embed),
                       stop_prob=put(rec["stop_prob"], out.stop_prob), history=put(rec["history"], hist))
        fired = active & tk.should_stop(s, out.stop_prob, min_new)
        done = done | fired | (s + 1 >= caps)

        def advance(cache):  # the next LM position, fed with the aggregator output
            h_next, cache = tk.lm_step(fresh(), out.next_embed, lengths + s, cache)
            return h_next.astype(jnp.float32), cache

        h_t, cache = jax.lax.cond(jnp.all(done), lambda cache: (h_t, cache), advance, cache)
        return (s + 1, h_t, out.history, cache, done, emitted + active.astype(jnp.int32), stopped | fired, buf, rec)

    _, _, _, _, _, emitted, stopped, buf, rec = jax.lax.while_loop(cond, body, carry)
    return SpeechOutput(buf, emitted * p, emitted, stopped, rec)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps", "taps"))
def _generate(graphdef, state, embeds, lengths, history, caps, min_new, args, keys, noise, *, max_steps, taps):
    return _loop(graphdef, state, embeds, lengths, history, caps, min_new, args, keys, noise, max_steps=max_steps,
                 taps=taps)


def bucket(n: int, multiple: int) -> int:
    """The padded length of a prompt of n positions: the next multiple of `multiple`."""
    return max(1, -(-n // multiple)) * multiple


def _row_keys(key, batch: int):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == 0 if typed else key.shape == (2,)
    if single:
        return jax.random.split(key, batch)
    if key.shape[0] != batch:
        raise ValueError(f"generate_speech: {key.shape[0]} row keys for a batch of {batch}")
    return key


def _check(talker: Talker, embeds, lengths, prompt_latents, prompt_latent_lengths, noise, max_steps):
    cfg = talker.cfg
    if embeds.ndim != 3 or embeds.shape[2] != cfg.hidden_size or embeds.shape[1] == 0:
        raise ValueError(f"generate_speech: prompt_embeds must be [B, T >= 1, {cfg.hidden_size}], got "
                         f"{tuple(embeds.shape)}")
    b, t = embeds.shape[:2]
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(f"generate_speech: prompt_lengths must be [B] = [{b}] in 1 .. {t}, got {lengths.tolist()}")
    if prompt_latents is not None:
        if prompt_latents.ndim != 3 or prompt_latents.shape[0] != b or prompt_latents.shape[2] != cfg.latent_dim:
            raise ValueError(f"generate_speech: prompt_latents must be [{b}, N, {cfg.latent_dim}], got "
                             f"{tuple(prompt_latents.shape)}")
        n = prompt_latents.shape[1]
        if prompt_latent_lengths is not None and (prompt_latent_lengths.shape != (b,) or
                                                  prompt_latent_lengths.min() < 0 or prompt_latent_lengths.max() > n):
            raise ValueError(f"generate_speech: prompt_latent_lengths must be [B] = [{b}] in 0 .. {n}")
    if max_steps < 1:
        raise ValueError(f"generate_speech: max_steps={max_steps} must be >= 1")
    if noise is not None:
        want_y0 = (max_steps, b, cfg.patch_size, cfg.latent_dim)
        want_sde = (max_steps, cfg.steps, b, cfg.patch_size, cfg.latent_dim)
        if tuple(noise.y0.shape) != want_y0 or tuple(noise.sde.shape) != want_sde:
            raise ValueError(f"generate_speech: injected noise must be y0 {want_y0} and sde {want_sde}, got "
                             f"{tuple(noise.y0.shape)} and {tuple(noise.sde.shape)}")


def generate_speech(talker: Talker, prompt_embeds, prompt_lengths=None, *, prompt_latents=None,
                    prompt_latent_lengths=None, key=None, noise: Noise | None = None, max_steps: int | None = None,
                    max_new_steps=None, cfg: float | None = None, sigma: float | None = None,
                    temperature: float | None = None, min_new_token: int | None = None, prompt_bucket: int = 64,
                    taps: bool = False) -> SpeechOutput:
    """The release's `BailingTalker2.generate` on a batch: prompt_embeds [B, T, H] right-padded (row b real in
    0 .. prompt_lengths[b]-1; None: all T), prompt_latents [B, N, C] the voice-prompt latents (left-aligned,
    prompt_latent_lengths [B] real; None: no prompt audio). Exactly one of `key` (one key, split per row, or [B]
    row keys) and `noise` (injected, `max_steps` steps; then max_steps defaults to its length).

    max_steps: the static step buffer (default: the config's max_steps); max_new_steps [B] int: per-row caps.
    cfg / sigma / temperature / min_new_token default to the config's generate settings. Returns `SpeechOutput`
    (latents [B, max_steps * P, C]); with taps=True also the per-step LM states, aggregator outputs, stop
    probabilities and histories."""
    tcfg, gen = talker.cfg, talker.cfg.generate
    embeds = jnp.asarray(prompt_embeds)
    b, t = embeds.shape[:2] if embeds.ndim == 3 else (0, 0)
    lengths = np.full((b,), t, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths)
    if (key is None) == (noise is None):
        raise ValueError("generate_speech: give exactly one of key (random noise) and noise (injected)")
    if max_steps is None:
        max_steps = int(noise.y0.shape[0]) if noise is not None else gen.max_steps
    lat = None if prompt_latents is None else np.asarray(prompt_latents)
    lat_len = None if prompt_latent_lengths is None else np.asarray(prompt_latent_lengths)
    _check(talker, embeds, lengths, lat, lat_len, noise, max_steps)
    caps = np.minimum(np.minimum(gen.max_steps, gen.max_cache_len - lengths), max_steps)
    if max_new_steps is not None:
        caps = np.minimum(caps, np.broadcast_to(np.asarray(max_new_steps), (b,)))
    padded = bucket(t, prompt_bucket)
    embeds = jnp.pad(embeds.astype(talker.runtime.dtype), ((0, 0), (0, padded - t), (0, 0)))
    history = tk.initial_history(tcfg, b, lat, lat_len)
    args = SamplerArgs.of(gen.cfg if cfg is None else cfg, gen.sigma if sigma is None else sigma,
                          gen.temperature if temperature is None else temperature)
    min_new = jnp.int32(gen.min_new_token if min_new_token is None else min_new_token)
    keys = None if key is None else _row_keys(key, b)
    graphdef, state = nnx.split(talker)
    return _generate(graphdef, state, embeds, jnp.asarray(lengths, jnp.int32), history,
                     jnp.asarray(caps, jnp.int32), min_new, args, keys, noise, max_steps=max_steps, taps=taps)


# --- generation in segments (streaming) -------------------------------------------------------------------------------
#
# The same loop as `generate_speech`, cut into calls of at most `steps` steps each, so that the host can decode and
# play the latents of one segment while asking for the next. The carry between calls is the loop's own (step count,
# LM state, history, KV cache, per-row flags); the noise of step s is drawn from fold_in(row key, s) as in
# `generate_speech`, so a segmented run emits the same latents as one `generate_speech` call with the same key (up
# to float rounding between the two compiled programs). One program per segment length.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeechCarry:
    step: jax.Array  # int32: steps run so far
    h_t: jax.Array  # [B, H] float32: the LM's state for the next step
    history: jax.Array  # [B, Hp, C]
    cache: object  # Qwen2Cache
    done: jax.Array  # [B] bool
    emitted: jax.Array  # [B] int32 steps emitted so far
    stopped: jax.Array  # [B] bool: the stop head ended the row


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeechSegment:
    latents: jax.Array  # [B, steps * P, C] float32: this segment's latents, row b's first new_steps[b] * P real
    new_steps: jax.Array  # [B] int32 steps row b emitted in this segment
    done: jax.Array  # [B] bool after the segment
    stopped: jax.Array  # [B] bool


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps"))
def _segment_start(graphdef, state, embeds, lengths, history, caps, *, max_steps):
    talker = nnx.merge(graphdef, state, copy=True)
    b, t, _ = embeds.shape
    _, h_t, cache = tk.prefill(talker, embeds, lengths, t + max_steps)
    zeros = jnp.zeros((b,), jnp.int32)
    return SpeechCarry(jnp.int32(0), h_t.astype(jnp.float32), history, cache, caps <= 0, zeros,
                       jnp.zeros((b,), bool))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps", "steps"))
def _segment_run(graphdef, state, carry: SpeechCarry, lengths, caps, min_new, args, keys, halt, *, max_steps, steps):
    fresh = lambda: nnx.merge(graphdef, state, copy=True)  # noqa: E731
    cfg = fresh().cfg
    b = lengths.shape[0]
    p, c = cfg.patch_size, cfg.latent_dim
    buf = jnp.zeros((b, steps * p, c), jnp.float32)
    done0 = carry.done | halt
    init = (jnp.int32(0), carry.step, carry.h_t, carry.history, carry.cache, done0, carry.emitted, carry.stopped, buf,
            jnp.zeros((b,), jnp.int32))

    def cond(x):
        i, s, done = x[0], x[1], x[5]
        return (i < steps) & (s < max_steps) & ~jnp.all(done)

    def body(x):
        i, s, h_t, hist, cache, done, emitted, stopped, buf, new = x
        y0, sde = _row_noise(keys, s, (p, c), cfg.steps)
        out = tk.sample_step(fresh(), h_t, hist, y0, sde, args)
        active = ~done
        buf = jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(active[:, None, None], out.latents, 0.0), i * p, 1)
        fired = active & tk.should_stop(s, out.stop_prob, min_new)
        done = done | fired | (s + 1 >= caps)

        def advance(cache):
            h_next, cache = tk.lm_step(fresh(), out.next_embed, lengths + s, cache)
            return h_next.astype(jnp.float32), cache

        h_t, cache = jax.lax.cond(jnp.all(done), lambda cache: (h_t, cache), advance, cache)
        step = active.astype(jnp.int32)
        return (i + 1, s + 1, h_t, out.history, cache, done, emitted + step, stopped | fired, buf, new + step)

    _, s, h_t, hist, cache, done, emitted, stopped, buf, new = jax.lax.while_loop(cond, body, init)
    return SpeechCarry(s, h_t, hist, cache, done, emitted, stopped), SpeechSegment(buf, new, done, stopped)


class SpeechStream:
    """`generate_speech` one segment at a time (same arguments, random noise only):

        stream = SpeechStream(talker, embeds, lengths, key=key, ...)
        while not stream.finished:
            seg = stream.advance(4)        # up to 4 more steps per row; seg.latents [B, 4 P, C], seg.new_steps [B]

    `halt` (a [B] bool mask given to `advance`) ends rows before the segment runs (they emit nothing more and do not
    count as stopped by the stop head): the caller's own length guard. A row's emitted latents, in order over the
    segments, are what `generate_speech` emits for it with the same key."""

    def __init__(self, talker: Talker, prompt_embeds, prompt_lengths=None, *, prompt_latents=None,
                 prompt_latent_lengths=None, key, max_steps: int | None = None, max_new_steps=None,
                 cfg: float | None = None, sigma: float | None = None, temperature: float | None = None,
                 min_new_token: int | None = None, prompt_bucket: int = 64):
        tcfg, gen = talker.cfg, talker.cfg.generate
        embeds = jnp.asarray(prompt_embeds)
        b, t = embeds.shape[:2] if embeds.ndim == 3 else (0, 0)
        lengths = np.full((b,), t, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths)
        if key is None:
            raise ValueError("SpeechStream: a key is needed (segments draw their noise from it)")
        max_steps = gen.max_steps if max_steps is None else max_steps
        lat = None if prompt_latents is None else np.asarray(prompt_latents)
        lat_len = None if prompt_latent_lengths is None else np.asarray(prompt_latent_lengths)
        _check(talker, embeds, lengths, lat, lat_len, None, max_steps)
        caps = np.minimum(np.minimum(gen.max_steps, gen.max_cache_len - lengths), max_steps)
        if max_new_steps is not None:
            caps = np.minimum(caps, np.broadcast_to(np.asarray(max_new_steps), (b,)))
        padded = bucket(t, prompt_bucket)
        embeds = jnp.pad(embeds.astype(talker.runtime.dtype), ((0, 0), (0, padded - t), (0, 0)))
        self.batch, self.max_steps = b, max_steps
        self.caps = caps.astype(np.int64)  # [B] the most steps each row can run
        self._graphdef, self._state = nnx.split(talker)
        self._lengths = jnp.asarray(lengths, jnp.int32)
        self._caps = jnp.asarray(caps, jnp.int32)
        self._min_new = jnp.int32(gen.min_new_token if min_new_token is None else min_new_token)
        self._args = SamplerArgs.of(gen.cfg if cfg is None else cfg, gen.sigma if sigma is None else sigma,
                                    gen.temperature if temperature is None else temperature)
        self._keys = _row_keys(key, b)
        history = tk.initial_history(tcfg, b, lat, lat_len)
        self._carry = _segment_start(self._graphdef, self._state, embeds, self._lengths, history, self._caps,
                                     max_steps=max_steps)
        self._done = np.asarray(self._carry.done)
        self._step = 0

    @property
    def finished(self) -> bool:
        return bool(self._done.all()) or self._step >= self.max_steps

    @property
    def done(self) -> np.ndarray:
        return self._done.copy()

    def advance(self, steps: int, halt=None) -> SpeechSegment:
        """Run up to `steps` more steps (fewer when every row is done first); halt [B] bool: rows to end now."""
        if steps < 1:
            raise ValueError(f"SpeechStream.advance: steps={steps} must be >= 1")
        halt = np.zeros((self.batch,), bool) if halt is None else np.asarray(halt, bool)
        self._carry, seg = _segment_run(self._graphdef, self._state, self._carry, self._lengths, self._caps,
                                        self._min_new, self._args, self._keys, jnp.asarray(halt),
                                        max_steps=self.max_steps, steps=steps)
        self._done = np.asarray(seg.done)
        self._step = int(self._carry.step)
        return seg
