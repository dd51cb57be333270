"""Jitted batch generation: one prefill, then a `lax.while_loop` of single-token decode steps over a preallocated
KV cache. No Python runs per token.

Padding: prompts may be left- or right-padded (`attention_mask`). Cache slots are shared by the batch (prompt slots
0..S-1, generated token j at slot S+j); a row's padding slots are marked invalid and never attended to. Positions are
per row: the release's decode position is `cache slot + rope_deltas`, which is exactly the row's last prompt
position + 1 + j for both paddings. Logits of the prefill are taken at each row's last real token.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p (nucleus) filtering; generation of a
row stops at any stop token (which is kept in its output) and the rest of its row is `pad_id`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.gen import steps
from ming_jax.gen.sampling import SamplingConfig, sample
from ming_jax.models import inputs as multimodal
from ming_jax.models.inputs import Prepared
from ming_jax.models.llm import BailingMoeV2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generated:
    tokens: jax.Array  # [B, N] int32, pad_id after a row stops
    lengths: jax.Array  # [B] int32 generated tokens per row (stop token included)
    positions: jax.Array  # [B, N] int32 rope position of the token fed to produce token i (-1: from the prefill)
    step_logits: jax.Array | None  # [B, N, V] float32 logits each token was sampled from (return_logits=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "with_features", "with_modality"))
def _prefill(graphdef, state, input_ids, attention_mask, positions, modality, features, feature_index, *, max_len,
             with_features, with_modality):
    return steps.prefill(nnx.merge(graphdef, state), input_ids, attention_mask, positions,
                         modality if with_modality else None, features if with_features else None,
                         feature_index if with_features else None, max_len=max_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "pad_id", "return_logits", "progress"),
                   donate_argnames=("cache",))
def _decode(graphdef, state, first_logits, next_pos, cache, key, *, sampling: SamplingConfig, pad_id: int,
            return_logits: bool, progress=None):
    b, v = first_logits.shape
    n = sampling.max_new_tokens
    stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)

    def emit(i, logits, key, tokens, done, lengths, step_logits, positions, pos):
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, sample(logits, sub, sampling))
        tokens = tokens.at[:, i].set(tok)
        positions = positions.at[:, i].set(pos)
        if return_logits:
            step_logits = step_logits.at[:, i].set(logits)
        stopped = ~done & jnp.isin(tok, stops)  # recorded here: a stop token may equal pad_id
        lengths = jnp.where(stopped, i + 1, lengths)
        done = done | stopped
        return key, tok, tokens, done, lengths, step_logits, positions

    tokens = jnp.full((b, n), pad_id, jnp.int32)
    positions = jnp.zeros((b, n), jnp.int32)
    step_logits = jnp.zeros((b, n, v), jnp.float32) if return_logits else None
    done = jnp.zeros((b,), bool)
    lengths = jnp.full((b,), n, jnp.int32)
    key, tok, tokens, done, lengths, step_logits, positions = emit(0, first_logits, key, tokens, done, lengths,
                                                                   step_logits, positions, jnp.full_like(next_pos, -1))

    def cond(c):
        i, _, _, _, done, *_ = c
        return (i < n) & ~jnp.all(done)

    def body(c):
        i, tok, key, tokens, done, lengths, step_logits, positions, cache, pos = c
        # The weights are closed over, not carried: in the loop carry XLA copies them into the loop's buffers (one
        # more weight-sized temporary; at 8 chips it is what made the int8 100B loop not fit 128 GB). The barrier
        # gives nnx's transforms inside the body (the layer scan) the weights at the body's trace level.
        logits, cache = steps.decode_step(nnx.merge(graphdef, jax.lax.optimization_barrier(state)), tok, pos, cache)
        key, tok, tokens, done, lengths, step_logits, positions = emit(i, logits, key, tokens, done, lengths,
                                                                       step_logits, positions, pos)
        if progress is not None:  # host callback per step, e.g. a progress bar; absent from the graph otherwise
            jax.debug.callback(progress, i + 1, jnp.sum(~done))
        return i + 1, tok, key, tokens, done, lengths, step_logits, positions, cache, pos + 1

    init = (jnp.int32(1), tok, key, tokens, done, lengths, step_logits, positions, cache, next_pos)
    _, _, _, tokens, done, lengths, step_logits, positions, cache, _ = jax.lax.while_loop(cond, body, init)
    # The final cache is returned so the donated input cache can back the loop's cache in place.
    return Generated(tokens, lengths, positions, step_logits), cache


def generate(model: BailingMoeV2, prep: Prepared, sampling: SamplingConfig, *, seed: int = 0,
             return_logits: bool = False, pad_id: int | None = None, progress=None, bucket: int = 64) -> Generated:
    """Generate up to `sampling.max_new_tokens` tokens for each prompt row of `prep` (see `multimodal.prepare`).

    Prompts are left-padded to a multiple of `bucket` slots so that prompts of similar length share one compiled
    program (padding slots are invisible to the result). `progress(step, rows_still_running)`, if given, is called
    from inside the jitted loop after every step.
    """
    cfg = model.cfg
    n_ctx = int(prep.positions.max()) + 1 + sampling.max_new_tokens
    if n_ctx > cfg.max_position_embeddings:
        raise ValueError(f"prompt positions up to {int(prep.positions.max())} + {sampling.max_new_tokens} new tokens "
                         f"exceed the context of {cfg.max_position_embeddings} positions")
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    pad_id = 0 if pad_id is None else pad_id
    s = prep.input_ids.shape[1]
    prep = multimodal.left_pad(prep, -(-s // bucket) * bucket, pad_id)
    b, s = prep.input_ids.shape
    graphdef, state = nnx.split(model)
    with_features = prep.features is not None
    with_modality = prep.modality is not None
    d = cfg.hidden_size
    logits, cache = _prefill(
        graphdef, state, jnp.asarray(prep.input_ids), jnp.asarray(prep.attention_mask), jnp.asarray(prep.positions),
        jnp.asarray(prep.modality) if with_modality else jnp.zeros((b, s), jnp.int32),
        jnp.asarray(prep.features) if with_features else jnp.zeros((0, d), jnp.float32),
        jnp.asarray(prep.feature_index) if with_features else jnp.zeros((0,), jnp.int32),
        max_len=s + sampling.max_new_tokens, with_features=with_features, with_modality=with_modality)
    next_pos = jnp.asarray(prep.rope_deltas + s, jnp.int32)  # the release: cache slot + rope_deltas
    generated, _ = _decode(graphdef, state, logits, next_pos, cache, jax.random.key(seed), sampling=sampling,
                           pad_id=int(pad_id), return_logits=return_logits, progress=progress)
    return generated


def forward(model: BailingMoeV2, prep: Prepared, *, collect: bool = False):
    """One full-sequence forward (no cache) of a prepared prompt; `collect` adds per-layer outputs and routing."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, prep.input_ids, prep.attention_mask, prep.positions, prep.modality,
                    prep.features, prep.feature_index, collect=collect)


@functools.partial(jax.jit, static_argnames=("graphdef", "collect"))
def _forward(graphdef, state, input_ids, attention_mask, positions, modality, features, feature_index, *, collect):
    model = nnx.merge(graphdef, state)
    x = model.embed_tokens(input_ids, features, feature_index)
    out = model(x, positions, attention_mask=attention_mask, modality=modality, collect=collect)
    return x, out


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def pad_prompts(prompts, *, side: str = "left", pad_id: int = 0):
    """Token id lists -> (ids [B, S] int32, attention_mask [B, S] bool), padded on `side` ("left" or "right")."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    s = max(len(p) for p in prompts)
    ids = np.full((len(prompts), s), pad_id, np.int32)
    mask = np.zeros((len(prompts), s), bool)
    for i, p in enumerate(prompts):
        sl = slice(s - len(p), s) if side == "left" else slice(0, len(p))
        ids[i, sl] = p
        mask[i, sl] = True
    return ids, mask
