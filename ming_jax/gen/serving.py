"""Continuous batching: S decode slots over one slot-based KV cache, refilled as their sequences finish.

    engine = ContinuousEngine(model, slots=8, max_len=512)     # model: the BailingMoeV2 backbone
    results = engine.run([Request("a", [12, 7, 99], max_tokens=64), Request("b", prep, max_tokens=8, seed=1)])

The device holds one `Slots` state: a KV cache of [S, max_len] slots per layer whose write position is per row
(`KVCache.length` [S]), and per slot the token to feed, its rope position, its random key, its budget, sampling
parameters and stop tokens. Two kinds of compiled programs run on it, each with the state donated (updated in place):

* admission (`_admit`, one program per prompt-length bucket, and per media feature rows): the prefill of one new
  request (`steps.prefill`, batch 1, left-padded to its bucket) into a small cache that is then written into the
  free slot's rows with `dynamic_update_slice` at the slot index (data: no recompilation per slot), plus its first
  token, sampled from the prefill's logits;
* decode (`_decode`, one program for the engine): a `lax.while_loop` of up to `chunk` decode steps of all S slots
  at once (`steps.decode_step`, the model's real attention / MoE / cache code; every slot at its own cache slot and
  rope position, with its own temperature / top-k / top-p / random stream and budget), finished and empty slots
  masked (their cache row does not advance, their tokens are not kept). It exits early after the step in which a
  slot finishes when requests are waiting, so the host can refill the slot.

The host scheduler (`ContinuousEngine.run`) admits requests first in, first out into the free slots (lowest slot
first), runs a decode chunk, reads back the new tokens of every slot (one small transfer per round trip), and
finishes requests on a stop token or their budget (`finish_reason` "stop" / "length"). Every request samples as it
would alone (`ming_jax.gen.text.generate` with `RowSampling`: the same key sequence from its seed, the same
sampling code), so greedy outputs equal generating each request alone. A slot cache rather than a paged one: the
attention of this model reads a layer's whole cache per step, a slot row is the contiguous layout that read wants
(a paged cache would add a gather of the pages per layer and step, worth it where memory, not compute, limits the
number of slots: the GPU issue); the cost of the slot layout is that every slot reserves `max_len` positions.

`TRACES` counts the traces of each program (tests check that admissions do not retrace the decode program).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax import sharding
from ming_jax.config.modality import TEXT
from ming_jax.gen import steps
from ming_jax.gen.sampling import sample_rows
from ming_jax.layers.kv_cache import KV_CACHE_AXES, KVCache
from ming_jax.models import inputs as multimodal
from ming_jax.models.inputs import Prepared
from ming_jax.models.llm import BailingMoeV2

TRACES: collections.Counter = collections.Counter()

STOP = 1  # finish codes on the device (0: running or empty)
LENGTH = 2
FINISH_REASONS = {STOP: "stop", LENGTH: "length"}


def length_bucket(n: int, base: int = 64) -> int:
    """The padded prompt length of an `n`-token prompt: `base` times 1, 2, 3, 4, 6, 8, 12, 16, ... (at most half
    the slots are padding, and the number of programs grows with the log of the longest prompt)."""
    units = max(1, -(-n // base))
    k = 1
    while True:
        for m in (k, k + k // 2) if k >= 2 else (k,):
            if m >= units:
                return m * base
        k *= 2


def pow2_bucket(n: int, least: int) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


# --- requests and results -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """One generation request: a prompt (token ids, or a `Prepared` batch of one, e.g. from `omni.prepare` with
    media features), a token budget, its sampling parameters and extra stop tokens (added to the engine's)."""

    id: Any
    prompt: Sequence[int] | np.ndarray | Prepared
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()


@dataclasses.dataclass
class Result:
    id: Any
    tokens: np.ndarray  # [n] int32 generated tokens (a stop token included, last)
    finish_reason: str  # "stop" (a stop token) or "length" (the budget)
    prompt_tokens: int
    slot: int  # the decode slot it ran in
    admitted_step: int  # engine decode steps run before its admission ...
    finished_step: int  # ... and before the host saw it finished

    @property
    def completion_tokens(self) -> int:
        return int(self.tokens.size)


@dataclasses.dataclass
class Stats:
    """What one `run` did: decode steps and host round trips, admissions, and how full the slots were."""

    requests: int = 0
    failed: int = 0
    steps: int = 0  # decode steps (each runs all S slots)
    round_trips: int = 0  # decode chunks called by the host
    admissions: int = 0
    generated: int = 0  # tokens kept (the prefill's first tokens included)
    active_slot_steps: int = 0  # sum over decode steps of the slots still generating
    slot_steps: int = 0  # steps * S
    prompt_tokens: int = 0
    prefill_slots: int = 0  # prompt tokens after padding to buckets
    seconds: float = 0.0

    @property
    def occupancy(self) -> float:
        return self.active_slot_steps / max(self.slot_steps, 1)


@dataclasses.dataclass
class _Plan:
    """A checked request, laid out for admission."""

    request: Request
    prep: Prepared  # left-padded to its bucket
    n_prompt: int
    budget: int
    stops: np.ndarray  # [max_stops] int32, -1 padded
    tokens: list = dataclasses.field(default_factory=list)
    slot: int = -1
    admitted_step: int = 0


# --- device state and programs ------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Slots:
    """The decode slots on the device (arrays [S, ...])."""

    cache: KVCache  # stacks [L, S, K, max_len, hd], valid [S, max_len], length [S]
    last: jax.Array  # [S] int32: the token to feed next
    pos: jax.Array  # [S] int32: its rope position
    key: jax.Array  # [S] random keys
    count: jax.Array  # [S] int32: tokens emitted
    budget: jax.Array  # [S] int32
    temperature: jax.Array  # [S] float32 (0 once a slot is not running: the all-greedy step skips the sort)
    top_k: jax.Array  # [S] int32
    top_p: jax.Array  # [S] float32
    stops: jax.Array  # [S, max_stops] int32, -1 padded
    active: jax.Array  # [S] bool: still generating
    finish: jax.Array  # [S] int32: 0, STOP or LENGTH
    out: jax.Array  # [S, chunk + 1] int32: tokens emitted since the host last read them
    n_out: jax.Array  # [S] int32


def _placed(cache: KVCache) -> KVCache:
    """The slot cache laid out by the active sharding rules (slots on the batch axes; identity without a mesh)."""
    c = sharding.constrain
    return KVCache(c(cache.k_dense, KV_CACHE_AXES), c(cache.v_dense, KV_CACHE_AXES), c(cache.k_moe, KV_CACHE_AXES),
                   c(cache.v_moe, KV_CACHE_AXES), c(cache.valid, ("batch", "cache_seq")), c(cache.length, ("batch",)))


@functools.partial(jax.jit, static_argnames=("layers", "slots", "max_len", "chunk", "max_stops", "dtype"))
def _init(*, layers, slots, max_len, chunk, max_stops, dtype):
    """Empty slots. `layers`: (dense layers, MoE layers, KV heads, head dim)."""
    TRACES["init"] += 1
    n_dense, n_moe, kv, hd = layers
    z = lambda n: jnp.zeros((n, slots, kv, max_len, hd), dtype)  # noqa: E731 (KVCache.create's layout)
    cache = _placed(KVCache(z(n_dense), z(n_dense), z(n_moe), z(n_moe), jnp.zeros((slots, max_len), bool),
                            jnp.zeros((slots,), jnp.int32)))
    zi = jnp.zeros((slots,), jnp.int32)
    return Slots(cache=cache, last=zi, pos=zi, key=jax.vmap(jax.random.key)(zi), count=zi, budget=zi,
                 temperature=jnp.zeros((slots,), jnp.float32), top_k=zi, top_p=jnp.ones((slots,), jnp.float32),
                 stops=jnp.full((slots, max_stops), -1, jnp.int32), active=jnp.zeros((slots,), bool), finish=zi,
                 out=jnp.zeros((slots, chunk + 1), jnp.int32), n_out=zi)


@functools.partial(jax.jit, static_argnames=("graphdef", "with_features", "with_modality"), donate_argnames=("s",))
def _admit(graphdef, state, s: Slots, slot, input_ids, attention_mask, positions, modality, features, feature_index,
           next_pos, budget, temperature, top_k, top_p, seed, stops, *, with_features, with_modality):
    """Prefill one request ([1, P]) and put it in slot `slot` (data) with its first token."""
    TRACES["admit"] += 1
    model = nnx.merge(graphdef, state)
    p = input_ids.shape[1]
    logits, small = steps.prefill(model, input_ids, attention_mask, positions, modality if with_modality else None,
                                  features if with_features else None, feature_index if with_features else None,
                                  max_len=p)
    c = s.cache
    put = lambda big, new: jax.lax.dynamic_update_slice(big, new.astype(big.dtype), (0, slot, 0, 0, 0))  # noqa
    row = jnp.zeros((1, c.max_len), bool).at[:, :p].set(small.valid)
    cache = KVCache(put(c.k_dense, small.k_dense), put(c.v_dense, small.v_dense), put(c.k_moe, small.k_moe),
                    put(c.v_moe, small.v_moe), jax.lax.dynamic_update_slice(c.valid, row, (slot, 0)),
                    c.length.at[slot].set(p))
    # The key sequence of `text.generate` with RowSampling: key(seed), split once per token.
    pairs = jax.vmap(jax.random.split)(jax.vmap(jax.random.key)(seed[None]))
    key, sub = pairs[:, 0], pairs[:, 1]
    tok = sample_rows(logits, sub, temperature[None], top_k[None], top_p[None])[0]
    stopped = jnp.any(tok == stops)
    finished = stopped | (budget <= 1)
    finish = jnp.where(stopped, STOP, jnp.where(finished, LENGTH, 0))
    return dataclasses.replace(
        s, cache=_placed(cache), last=s.last.at[slot].set(tok), pos=s.pos.at[slot].set(next_pos),
        key=s.key.at[slot].set(key[0]), count=s.count.at[slot].set(1), budget=s.budget.at[slot].set(budget),
        temperature=s.temperature.at[slot].set(jnp.where(finished, 0.0, temperature)),
        top_k=s.top_k.at[slot].set(top_k), top_p=s.top_p.at[slot].set(top_p), stops=s.stops.at[slot].set(stops),
        active=s.active.at[slot].set(~finished), finish=s.finish.at[slot].set(finish),
        out=s.out.at[slot, 0].set(tok), n_out=s.n_out.at[slot].set(1))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("s",))
def _decode(graphdef, state, s: Slots, exit_on_finish):
    """Up to `chunk` decode steps of every slot; with `exit_on_finish` (data) it stops after the first step in which
    a slot finishes. -> (slots with n_out reset, (out, n_out, finish, steps run, active slot-steps))."""
    TRACES["decode"] += 1
    chunk = s.out.shape[1] - 1
    n_slots = s.last.shape[0]

    def cond(c):
        i, s, _, finished, _ = c
        return (i < chunk) & jnp.any(s.active) & ~(exit_on_finish & finished)

    def body(c):
        i, s, (state, presliced), _, busy = c
        # The weights ride in the loop carry (unchanged): nnx transforms inside the body need them at its trace level.
        # presliced: on CPU the per-layer weights sliced once before the loop (`steps.decode_loop`), else None.
        logits, cache = steps.decode_step(nnx.merge(graphdef, state), s.last, s.pos, s.cache, presliced)
        act = s.active
        cache = dataclasses.replace(cache, length=jnp.where(act, cache.length, s.cache.length))
        pairs = jax.vmap(jax.random.split)(s.key)
        key, sub = pairs[:, 0], pairs[:, 1]
        tok = sample_rows(logits, sub, s.temperature, s.top_k, s.top_p)
        stopped = act & jnp.any(tok[:, None] == s.stops, axis=1)
        count = s.count + act
        finished = act & (stopped | (count >= s.budget))
        at = jnp.where(act, s.n_out, chunk + 1)  # not running: out of range, dropped
        out = s.out.at[jnp.arange(n_slots), at].set(tok, mode="drop")
        active = act & ~finished
        s = dataclasses.replace(
            s, cache=cache, last=jnp.where(act, tok, s.last), pos=s.pos + act, key=key, count=count,
            temperature=jnp.where(active, s.temperature, 0.0), active=active,
            finish=jnp.where(finished, jnp.where(stopped, STOP, LENGTH), s.finish), out=out, n_out=s.n_out + act)
        return i + 1, s, (state, presliced), jnp.any(finished), busy + jnp.sum(act)

    # A request that ended with its first token (admission) counts as a finish: its slot is refilled at once.
    ended = jnp.any((s.n_out > 0) & ~s.active)

    def run(presliced):
        i, out, _, _, busy = jax.lax.while_loop(cond, body, (jnp.int32(0), s, (state, presliced), ended,
                                                             jnp.int32(0)))
        return i, out, busy

    i, s, busy = steps.decode_loop(graphdef, state, run)
    emitted = (s.out, s.n_out, s.finish, i, busy)
    return dataclasses.replace(s, cache=_placed(s.cache), n_out=jnp.zeros_like(s.n_out)), emitted


# --- the engine ---------------------------------------------------------------------------------------------------


class ContinuousEngine:
    """S decode slots over one KV cache of `max_len` positions per slot (prompt, padded to its bucket, plus the
    budget must fit). `chunk`: the most decode steps per host round trip. `stop_tokens` (default: the model's end
    tokens) end every request; a request may add its own (`max_stops` in all; default: 16, or 8 more than the
    engine's). `bucket`: prompts are left-padded to `length_bucket(n, bucket)` (one admission program per
    bucket)."""

    def __init__(self, model: BailingMoeV2, *, slots: int = 8, max_len: int = 1024, chunk: int = 32,
                 bucket: int = 64, stop_tokens: Sequence[int] | None = None, max_stops: int | None = None,
                 pad_id: int | None = None):
        cfg = model.cfg
        self.stop_tokens = tuple(int(t) for t in (cfg.eos_ids if stop_tokens is None else stop_tokens))
        max_stops = max(16, len(self.stop_tokens) + 8) if max_stops is None else max_stops
        if slots < 1 or max_len < 2 or chunk < 1 or bucket < 1 or max_stops < 1:
            raise ValueError(f"slots={slots}, chunk={chunk}, bucket={bucket}, max_stops={max_stops} must be >= 1 "
                             f"and max_len={max_len} >= 2")
        self.model, self.cfg = model, cfg
        self.n_slots, self.max_len, self.chunk, self.bucket, self.max_stops = slots, max_len, chunk, bucket, max_stops
        if len(self.stop_tokens) > max_stops:
            raise ValueError(f"{len(self.stop_tokens)} stop tokens, more than max_stops={max_stops}")
        pad_id = cfg.pad_token_id if pad_id is None else pad_id
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.graphdef, self.state = nnx.split(model)
        self.slots: Slots | None = None
        self.stats = Stats()

    # -- checks --
    def plan(self, req: Request) -> _Plan:
        """Check `req` and lay out its prompt; ValueError naming the problem (too long for a slot or for the
        context, bad sampling parameters, too many stop tokens)."""
        if isinstance(req.prompt, Prepared):
            prep = req.prompt
            if prep.input_ids.shape[0] != 1:
                raise ValueError(f"request {req.id!r}: a Prepared prompt must be a batch of one, got "
                                 f"{prep.input_ids.shape[0]} rows")
        else:
            ids = np.asarray(req.prompt, np.int64).reshape(-1)
            if ids.size == 0:
                raise ValueError(f"request {req.id!r}: the prompt is empty")
            prep = multimodal.prepare(self.cfg, ids[None])
        if prep.features is None and prep.modality is not None and not np.any(prep.modality != TEXT):
            prep = dataclasses.replace(prep, modality=None)  # text only: the text gate, and the text-only program
        n = int(prep.attention_mask.sum())
        if not (isinstance(req.max_tokens, (int, np.integer)) and req.max_tokens >= 1):
            raise ValueError(f"request {req.id!r}: max_tokens={req.max_tokens!r} must be an integer >= 1")
        if req.temperature < 0 or req.top_k < 0 or not 0 < req.top_p <= 1:
            raise ValueError(f"request {req.id!r}: temperature >= 0, top_k >= 0 and top_p in (0, 1] needed, got "
                             f"{req.temperature}, {req.top_k}, {req.top_p}")
        s = prep.input_ids.shape[1]
        length = length_bucket(s, self.bucket)
        if length + req.max_tokens > self.max_len:
            raise ValueError(f"request {req.id!r} is longer than a decode slot: its prompt of {s} tokens (padded to "
                             f"{length}) + max_tokens={req.max_tokens} need {length + req.max_tokens} cache "
                             f"positions, the engine's max_len is {self.max_len}")
        last = int(np.asarray(prep.positions).max())
        if last + 1 + req.max_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"request {req.id!r}: prompt positions up to {last} + {req.max_tokens} new tokens exceed "
                             f"the model's context of {self.cfg.max_position_embeddings} positions")
        stops = tuple(dict.fromkeys(self.stop_tokens + tuple(int(t) for t in req.stop_tokens)))
        if len(stops) > self.max_stops:
            raise ValueError(f"request {req.id!r}: {len(stops)} stop tokens, more than max_stops={self.max_stops}")
        prep = multimodal.left_pad(prep, length, self.pad_id)
        return _Plan(req, prep, n, int(req.max_tokens),
                     np.asarray(stops + (-1,) * (self.max_stops - len(stops)), np.int32))

    # -- device steps --
    def reset(self) -> None:
        c = self.cfg
        self.slots = _init(layers=(c.num_dense_layers, c.num_moe_layers, c.num_kv_heads, c.head_dim),
                           slots=self.n_slots, max_len=self.max_len, chunk=self.chunk, max_stops=self.max_stops,
                           dtype=jnp.dtype(self.model.runtime.dtype).name)

    def _admit(self, slot: int, p: _Plan) -> None:
        prep, r = p.prep, p.request
        with_features, with_modality = prep.features is not None, prep.modality is not None
        b, s = prep.input_ids.shape
        if with_features:  # feature rows padded to a power of two, the extra ones aimed past the prompt (dropped)
            f = np.asarray(prep.features)
            total = pow2_bucket(f.shape[0], 64)
            features = np.concatenate([f, np.zeros((total - f.shape[0], f.shape[1]), f.dtype)])
            index = np.concatenate([np.asarray(prep.feature_index, np.int32),
                                    np.full((total - f.shape[0],), b * s, np.int32)])
        else:
            features, index = np.zeros((0, self.cfg.hidden_size), np.float32), np.zeros((0,), np.int32)
        self.slots = _admit(
            self.graphdef, self.state, self.slots, np.int32(slot), np.asarray(prep.input_ids, np.int32),
            np.asarray(prep.attention_mask), np.asarray(prep.positions, np.int32),
            np.asarray(prep.modality, np.int32) if with_modality else np.zeros((b, s), np.int32), features, index,
            np.int32(int(prep.rope_deltas[0]) + s), np.int32(p.budget), np.float32(r.temperature),
            np.int32(r.top_k), np.float32(r.top_p), np.int32(int(r.seed) % (1 << 31)), p.stops,
            with_features=with_features, with_modality=with_modality)
        self.stats.admissions += 1
        self.stats.prompt_tokens += p.n_prompt
        self.stats.prefill_slots += s

    # -- the scheduler --
    def run(self, requests: Iterable[Request], *, on_result: Callable[[Result], None] | None = None,
            on_error: Callable[[Request, Exception], None] | None = None,
            on_round: Callable[[Stats], None] | None = None) -> list[Result]:
        """Generate every request (first in, first out into free slots) -> results in the order they finished.

        Every request is checked first (`plan`: ValueError before anything runs). `on_result(result)` is called as
        each finishes. A program that raises fails the requests then in the slots (`on_error(request, exc)`;
        without `on_error` it is raised) and the engine goes on with fresh slots. `on_round(stats)` after each
        round trip."""
        plans = collections.deque(self.plan(r) for r in requests)
        t0 = time.perf_counter()
        stats = self.stats = Stats(requests=len(plans))
        if self.slots is None:
            self.reset()
        occupant: list[_Plan | None] = [None] * self.n_slots
        done: list[Result] = []
        while plans or any(o is not None for o in occupant):
            try:
                for slot in range(self.n_slots):
                    if occupant[slot] is None and plans:
                        p = plans.popleft()
                        p.slot, p.admitted_step = slot, stats.steps
                        occupant[slot] = p
                        self._admit(slot, p)
                self.slots, emitted = _decode(self.graphdef, self.state, self.slots, np.bool_(bool(plans)))
                out, n_out, finish, n_steps, busy = jax.device_get(emitted)
            except Exception as e:  # noqa: BLE001 - the requests in the slots fail; the engine goes on
                if on_error is None:
                    raise
                for slot, p in enumerate(occupant):
                    if p is not None:
                        on_error(p.request, e)
                        stats.failed += 1
                occupant = [None] * self.n_slots
                self.reset()
                continue
            stats.round_trips += 1
            stats.steps += int(n_steps)
            stats.active_slot_steps += int(busy)
            stats.slot_steps += int(n_steps) * self.n_slots
            for slot, p in enumerate(occupant):
                if p is None:
                    continue
                p.tokens.extend(out[slot, :n_out[slot]].tolist())
                stats.generated += int(n_out[slot])
                if finish[slot]:
                    res = Result(p.request.id, np.asarray(p.tokens, np.int32), FINISH_REASONS[int(finish[slot])],
                                 p.n_prompt, slot, p.admitted_step, stats.steps)
                    occupant[slot] = None
                    done.append(res)
                    if on_result is not None:
                        on_result(res)
            if on_round is not None:
                on_round(stats)
        stats.seconds = time.perf_counter() - t0
        return done
