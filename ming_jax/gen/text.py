"""Jitted batch generation: one prefill, then a `lax.while_loop` of single-token decode steps over a preallocated
KV cache. No Python runs per token.

Padding: prompts may be left- or right-padded (`attention_mask`). Cache slots are shared by the batch (prompt slots
0..S-1, generated token j at slot S+j); a row's padding slots are marked invalid and never attended to. Positions are
per row: the release's decode position is `cache slot + rope_deltas`, which is exactly the row's last prompt
position + 1 + j for both paddings. Logits of the prefill are taken at each row's last real token.

Sampling: greedy (temperature 0), or temperature with optional top-k and top-p (nucleus) filtering; generation of a
row stops at any stop token (which is kept in its output) and the rest of its row is `pad_id`. With `RowSampling`
each row has its own token budget, temperature, top-k, top-p and random stream (one batch of different requests,
`ming_jax.gen.batch`).

Streaming (`stream_tokens`, and text pieces in `ming_jax.gen.stream`): the same loop body compiled as a chunk
program run until a given step (data), called again by the host with the returned carry. Progress callbacks enter
the programs as an id (data), so a new callback does not recompile. `TRACES` counts the traces of each program.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax.gen import steps
from ming_jax.gen.sampling import SamplingConfig, sample, sample_rows
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
    TRACES["prefill"] += 1
    return steps.prefill(nnx.merge(graphdef, state), input_ids, attention_mask, positions,
                         modality if with_modality else None, features if with_features else None,
                         feature_index if with_features else None, max_len=max_len)


# How often each jitted program of this module was traced (a trace precedes every compilation): tests read it to
# check that nothing retraces per batch, per callback or per streamed chunk.
TRACES: collections.Counter = collections.Counter()

# Progress callbacks are host functions looked up by an id that enters the program as data, so that a new callback
# (a new progress bar, a new batch) reuses the compiled decode loop. Only the newest few stay registered.
_PROGRESS: dict[int, Callable] = {}
_PROGRESS_IDS = itertools.count(1)
_PROGRESS_KEEP = 64


def _progress_id(fn: Callable | None):
    if fn is None:
        return None
    pid = next(_PROGRESS_IDS)
    _PROGRESS[pid] = fn
    while len(_PROGRESS) > _PROGRESS_KEEP:
        _PROGRESS.pop(next(iter(_PROGRESS)))
    return np.int32(pid)


def _report(pid, step, running):
    fn = _PROGRESS.get(int(pid))
    if fn is not None:
        fn(step, running)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
    """Sampling parameters per batch row (arrays [B]), for one batch of different requests. With it the program's
    `SamplingConfig` gives only the token budget (`max_new_tokens`, the most any row may take) and the stop tokens;
    every row samples with its own parameters from its own random stream (`seed`), so what a row draws does not
    depend on the other rows of its batch."""

    max_new_tokens: Any  # [B] int32: the row stops after this many tokens (finish reason "length")
    temperature: Any  # [B] float32, 0: greedy
    top_k: Any  # [B] int32, 0: off
    top_p: Any  # [B] float32, 1: off
    seed: Any  # [B] int32

    @classmethod
    def make(cls, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0, *, rows: int | None = None):
        """Scalars or sequences (broadcast to `rows`, or to the longest sequence given) -> numpy arrays [B]."""
        values = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "seed": seed}
        b = rows if rows is not None else max(np.size(v) for v in values.values())
        dtypes = {"max_new_tokens": np.int32, "temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
                  "seed": np.int32}
        out = {k: np.broadcast_to(np.asarray(v, dtypes[k]), (b,)).copy() for k, v in values.items()}
        if (out["max_new_tokens"] < 1).any() or (out["temperature"] < 0).any() or (out["top_k"] < 0).any() or not (
                (out["top_p"] > 0) & (out["top_p"] <= 1)).all():
            raise ValueError(f"per-row sampling needs max_new_tokens >= 1, temperature >= 0, top_k >= 0 and top_p in "
                             f"(0, 1]: {out}")
        return cls(**out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The decode loop's carry: what one chunk of decode steps hands the next (`stream_tokens`)."""

    step: jax.Array  # () int32: tokens emitted so far (the index of the next one)
    last: jax.Array  # [B] int32: the last emitted token, fed to the next step
    pos: jax.Array  # [B] int32: its rope position
    key: jax.Array  # one key (shared sampling) or [B] keys (RowSampling)
    tokens: jax.Array  # [B, N] int32
    lengths: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    positions: jax.Array  # [B, N] int32
    step_logits: jax.Array | None  # [B, N, V] with return_logits
    cache: Any  # KVCache
    rows: RowSampling | None


def _emit(s: DecodeState, logits, fed_pos, sampling: SamplingConfig, pad_id: int, return_logits: bool):
    """Sample token `s.step` of every row from `logits` (which the token at `fed_pos` produced)."""
    i = s.step
    stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)
    if s.rows is None:
        key, sub = jax.random.split(s.key)
        tok = sample(logits, sub, sampling)
    else:
        pairs = jax.vmap(jax.random.split)(s.key)
        key, sub = pairs[:, 0], pairs[:, 1]
        tok = sample_rows(logits, sub, s.rows.temperature, s.rows.top_k, s.rows.top_p)
    tok = jnp.where(s.done, pad_id, tok)
    stopped = ~s.done & jnp.isin(tok, stops)  # recorded here: a stop token may equal pad_id
    done = s.done | stopped
    if s.rows is not None:
        done = done | (i + 1 >= s.rows.max_new_tokens)  # lengths already hold the row's budget
    return dataclasses.replace(
        s, step=i + 1, last=tok, key=key, tokens=s.tokens.at[:, i].set(tok),
        lengths=jnp.where(stopped, i + 1, s.lengths), done=done, positions=s.positions.at[:, i].set(fed_pos),
        step_logits=s.step_logits.at[:, i].set(logits) if return_logits else None)


def _begin(first_logits, next_pos, cache, key, rows, sampling: SamplingConfig, pad_id: int, return_logits: bool):
    """The carry after the prefill's token (token 0, sampled from the prefill's logits)."""
    b, v = first_logits.shape
    n = sampling.max_new_tokens
    if rows is None:
        lengths = jnp.full((b,), n, jnp.int32)
    else:
        key = jax.vmap(jax.random.key)(rows.seed)
        lengths = jnp.minimum(rows.max_new_tokens, n).astype(jnp.int32)
    s = DecodeState(step=jnp.int32(0), last=jnp.full((b,), pad_id, jnp.int32), pos=next_pos, key=key,
                    tokens=jnp.full((b, n), pad_id, jnp.int32), lengths=lengths, done=jnp.zeros((b,), bool),
                    positions=jnp.zeros((b, n), jnp.int32),
                    step_logits=jnp.zeros((b, n, v), jnp.float32) if return_logits else None, cache=cache, rows=rows)
    return _emit(s, first_logits, jnp.full_like(next_pos, -1), sampling, pad_id, return_logits)


def _loop(graphdef, state, s: DecodeState, until, sampling, pad_id, return_logits, progress_id=None):
    """Decode steps while `s.step < until` and some row runs: one `lax.while_loop`."""

    def cond(s):
        return (s.step < until) & ~jnp.all(s.done)

    def run(presliced):  # presliced: the per-layer weights sliced before the loop (CPU, `steps.decode_loop`) or None
        def body(s):
            # The weights are closed over, not carried: in the loop carry XLA copies them into the loop's buffers
            # (one more weight-sized temporary; at 8 chips it is what made the int8 100B loop not fit 128 GB). The
            # barrier gives nnx's transforms inside the body (the layer scan) the weights at the body's trace level.
            weights, layers = jax.lax.optimization_barrier((state, presliced))
            logits, cache = steps.decode_step(nnx.merge(graphdef, weights), s.last, s.pos, s.cache, layers)
            s = _emit(dataclasses.replace(s, cache=cache), logits, s.pos, sampling, pad_id, return_logits)
            s = dataclasses.replace(s, pos=s.pos + 1)
            if progress_id is not None:  # host callback per step, e.g. a progress bar; absent from the graph otherwise
                jax.debug.callback(_report, progress_id, s.step, jnp.sum(~s.done))
            return s

        return jax.lax.while_loop(cond, body, s)

    return steps.decode_loop(graphdef, state, run)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "pad_id", "return_logits"),
                   donate_argnames=("cache",))
def _decode(graphdef, state, first_logits, next_pos, cache, key, rows=None, progress_id=None, *,
            sampling: SamplingConfig, pad_id: int, return_logits: bool):
    """The whole decode: token 0 from the prefill's logits, then one while loop of decode steps. `progress_id`
    (data, not a static argument: any callback reuses the program) names the host callback called per step."""
    TRACES["decode"] += 1
    s = _begin(first_logits, next_pos, cache, key, rows, sampling, pad_id, return_logits)
    s = _loop(graphdef, state, s, sampling.max_new_tokens, sampling, pad_id, return_logits, progress_id)
    # The final cache is returned so the donated input cache can back the loop's cache in place.
    return Generated(s.tokens, s.lengths, s.positions, s.step_logits), s.cache


@functools.partial(jax.jit, static_argnames=("sampling", "pad_id", "return_logits"), donate_argnames=("cache",))
def _decode_begin(first_logits, next_pos, cache, key, rows=None, *, sampling, pad_id, return_logits):
    TRACES["decode_begin"] += 1
    return _begin(first_logits, next_pos, cache, key, rows, sampling, pad_id, return_logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "pad_id", "return_logits"),
                   donate_argnames=("s",))
def _decode_chunk(graphdef, state, s: DecodeState, until, *, sampling, pad_id, return_logits):
    """Decode steps of the same loop body as `_decode` until `until` tokens (data: one program for any chunk)."""
    TRACES["decode_chunk"] += 1
    return _loop(graphdef, state, s, jnp.minimum(until, sampling.max_new_tokens), sampling, pad_id, return_logits)


def _prefilled(model: BailingMoeV2, prep: Prepared, sampling: SamplingConfig, pad_id, bucket: int, rows):
    """Check the context, left-pad to the bucket, run the prefill -> (graphdef, state, logits, cache, next_pos,
    pad_id)."""
    cfg = model.cfg
    budget = sampling.max_new_tokens if rows is None else np.minimum(np.asarray(rows.max_new_tokens),
                                                                     sampling.max_new_tokens)
    last = np.asarray(prep.positions).max(axis=(0, 2))  # [B] each row's last prompt position
    over = np.flatnonzero(last + 1 + budget > cfg.max_position_embeddings)
    if over.size:
        r = int(over[0])
        n = int(np.broadcast_to(budget, last.shape)[r])
        raise ValueError(f"prompt positions up to {int(last[r])} + {n} new tokens exceed the context of "
                         f"{cfg.max_position_embeddings} positions (batch row {r})")
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    pad_id = 0 if pad_id is None else int(pad_id)
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
    return graphdef, state, logits, cache, next_pos, pad_id


def generate(model: BailingMoeV2, prep: Prepared, sampling: SamplingConfig, *, seed: int = 0,
             return_logits: bool = False, pad_id: int | None = None, progress=None, bucket: int = 64,
             rows: RowSampling | None = None) -> Generated:
    """Generate up to `sampling.max_new_tokens` tokens for each prompt row of `prep` (see `multimodal.prepare`).

    Prompts are left-padded to a multiple of `bucket` slots so that prompts of similar length share one compiled
    program (padding slots are invisible to the result). `progress(step, rows_still_running)`, if given, is called
    from inside the jitted loop after every step; it is not part of the compiled program's key (a new callback
    does not recompile). `rows` gives each row its own token budget, temperature, top-k, top-p and seed (the
    temperature / top_k / top_p of `sampling` are then unused).
    """
    graphdef, state, logits, cache, next_pos, pad_id = _prefilled(model, prep, sampling, pad_id, bucket, rows)
    generated, _ = _decode(graphdef, state, logits, next_pos, cache, jax.random.key(seed), rows,
                           _progress_id(progress), sampling=sampling, pad_id=pad_id, return_logits=return_logits)
    return generated


@dataclasses.dataclass
class TokenChunk:
    """What `stream_tokens` yields after each chunk of decode steps (host arrays)."""

    tokens: list[np.ndarray]  # per row: the tokens new since the last chunk (a stop token included; none after it)
    done: np.ndarray  # [B] bool: the row has finished (stop token or budget)
    lengths: np.ndarray  # [B] int32: tokens generated so far per row


def stream_tokens(model: BailingMoeV2, prep: Prepared, sampling: SamplingConfig, *, seed: int = 0,
                  pad_id: int | None = None, bucket: int = 64, rows: RowSampling | None = None,
                  chunk: int = 8) -> Iterator[TokenChunk]:
    """`generate`, yielding the new tokens after every `chunk` decode steps (the first yield: the prefill's token).

    The steps are the same loop body as `generate`'s, compiled once as a chunk program that the host calls again
    with the returned carry and the step to stop at (data: no recompilation per chunk or chunk size; the KV cache
    is donated from chunk to chunk), so the
    tokens equal `generate`'s, sampled ones included. Stops early once every row is done."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    graphdef, state, logits, cache, next_pos, pad_id = _prefilled(model, prep, sampling, pad_id, bucket, rows)
    s = _decode_begin(logits, next_pos, cache, jax.random.key(seed), rows, sampling=sampling, pad_id=pad_id,
                      return_logits=False)
    sent = np.zeros(prep.input_ids.shape[0], np.int64)
    while True:
        tokens, lengths, done, step = jax.device_get((s.tokens, s.lengths, s.done, s.step))
        ends = np.where(done, lengths, int(step))
        done = done | (int(step) >= sampling.max_new_tokens)  # the budget is spent
        yield TokenChunk([tokens[r, sent[r]:ends[r]] for r in range(len(ends))], done, ends.astype(np.int32))
        sent = ends
        if done.all():
            return
        s = _decode_chunk(graphdef, state, s, np.int32(int(step) + chunk), sampling=sampling, pad_id=pad_id,
                          return_logits=False)


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
