"""Sampling one token per row from logits: greedy, or temperature with optional top-k and top-p (nucleus)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 and top_p={self.top_p} in (0, 1]")


def sample(logits, key, cfg: SamplingConfig):
    """logits [B, V] -> tokens [B] int32."""
    logits = logits.astype(jnp.float32)
    if cfg.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if cfg.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        n_keep = jnp.maximum(jnp.sum(before < cfg.top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Per-row sampling parameters in one batch: logits [B, V], keys [B] (one per row), temperature [B] (0: greedy),
    top_k [B] int (0: off), top_p [B] (1: off) -> tokens [B] int32. A row samples exactly as `sample` does with
    its own parameters (temperature first, then top-k, then top-p of what is left), from its own key. The sort
    over the vocabulary is skipped when every row is greedy."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        v = logits.shape[-1]
        neg = jnp.finfo(jnp.float32).min
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
        kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
        scaled = jnp.where(scaled < kth, neg, scaled)
        ordered = jnp.where(ordered < kth, neg, ordered)  # still sorted: the top-k survivors, then the filtered
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
        n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(ordered, n_keep - 1, axis=-1)
        threshold = jnp.where(top_p[:, None] < 1.0, threshold, neg)
        scaled = jnp.where(scaled < threshold, neg, scaled)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)
