"""The preallocated KV cache of a decoder-only LM (the BailingMoeV2 backbone; later the talker's Qwen2 LM), its
logical axes, and one layer's view of the stacked cache inside the layer scan."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ming_jax import sharding
from ming_jax.config.llm import LLMConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys / values of every layer plus which slots hold a real (non-padding) token.

    Slots are written left to right at `length`; a batch row's padding slots stay invalid forever, so left and right
    padded prompts share one layout. Dense and MoE layers keep separate stacks to match the parameter layout.
    `length` is one write position for the whole batch ([], the static batch of `ming_jax.gen.text`), or one per
    row ([B]: every row at its own slot, the decode slots of `ming_jax.gen.serving`).
    """

    k_dense: jax.Array  # [Ld, B, K, S_max, hd]
    v_dense: jax.Array
    k_moe: jax.Array  # [Lm, B, K, S_max, hd]
    v_moe: jax.Array
    valid: jax.Array  # [B, S_max] bool
    length: jax.Array  # [] or [B] int32: next slot to write (per row when [B])

    @classmethod
    def create(cls, cfg: LLMConfig, batch: int, max_len: int, dtype="float32") -> "KVCache":
        """Zeros for `batch` rows of `max_len` slots; `dtype`: the model's compute dtype (`Runtime.dtype`)."""
        dtype = jnp.dtype(dtype)
        shape = lambda n: (n, batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # noqa: E731
        z = lambda n: jnp.zeros(shape(n), dtype)  # noqa: E731
        return cls(z(cfg.num_dense_layers), z(cfg.num_dense_layers), z(cfg.num_moe_layers), z(cfg.num_moe_layers),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


# KV heads before slots. Either order compiles; on TPU the layer loop carries the stacks in a tiled layout of the
# compiler's choosing, so a row-major cache is relaid out at loop entry / exit: allocate it in the layout the compiled
# step reports (`ming_jax.aot`, --cache_layout auto) to avoid that (docs/scaling.md).
KV_CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CacheSlot:
    """One layer's view of a stacked cache: the [L, B, K, S_max, hd] key / value stacks and which layer to use.

    Writes go into the stacks with one dynamic_update_slice (no per-layer copy of the cache: inside the layer scan
    the stacks are the loop carry, updated in place). `attend_cache=False` marks a prefill of an empty cache: the
    new tokens attend only to each other, with the kernel-friendly causal + segment mask.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array  # [] int32
    attend_cache: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def write(self, k_new, v_new, start) -> "CacheSlot":
        """k_new / v_new [B, T, K, hd] -> slots start .. start+T-1 of this layer; `start` [] (every row) or [B] (row
        b at start[b]: one scatter; slots past the end are dropped)."""
        if jnp.ndim(start) == 1:
            b, t = k_new.shape[:2]
            rows = jnp.arange(b)[:, None]
            cols = start[:, None] + jnp.arange(t)[None, :]  # [B, T]
            put = lambda stack, new: stack.at[self.layer, rows, :, cols, :].set(  # noqa: E731
                new.astype(stack.dtype), mode="drop")  # indexed dims first: new is [B, T, K, hd] as it comes
            return dataclasses.replace(self, k=put(self.k, k_new), v=put(self.v, v_new))
        at = (self.layer, jnp.int32(0), jnp.int32(0), start, jnp.int32(0))
        put = lambda stack, new: jax.lax.dynamic_update_slice(  # noqa: E731
            stack, new.swapaxes(1, 2).astype(stack.dtype)[None], at)
        return dataclasses.replace(self, k=put(self.k, k_new), v=put(self.v, v_new))

    def read(self, dtype):
        """This layer's whole cache: k, v [B, S_max, K, hd]."""
        get = lambda stack: jax.lax.dynamic_index_in_dim(  # noqa: E731
            stack, self.layer, 0, keepdims=False).swapaxes(1, 2).astype(dtype)
        return get(self.k), get(self.v)


def cache_axes() -> "KVCache":
    """The logical axis names of every field of a `KVCache`, as a KVCache of name tuples."""
    return KVCache(KV_CACHE_AXES, KV_CACHE_AXES, KV_CACHE_AXES, KV_CACHE_AXES, ("batch", "cache_seq"), ())


def kv_cache_shardings(mesh: Mesh, rules: sharding.ShardingRules, cache):
    """NamedShardings for a `KVCache` (concrete or abstract): the stacks by KV_CACHE_AXES, `valid` by batch and
    slot, `length` replicated."""
    return sharding.tree_shardings(cache, cache_axes(), mesh, rules, what="kv cache")
