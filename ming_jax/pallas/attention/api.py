"""Attention: the only entry of this folder, and the only place an attention backend is chosen.

  attention(q, k, v, mask, impl=)        "splash" (Pallas TPU kernel) | "cudnn" (GPU flash attention) | "xla"
                                         (`reference.attend`: any backend, any mask) | "auto"

Masks travel as an `AttentionMask`: "causal" plus segment ids (padding = segment 0, real tokens 1, 2, ... so packed
documents attend only within themselves; the ViT's per-image block diagonal is one id per image) is what kernels
take, and a general dense boolean mask (decoding against a KV cache) is what only the reference takes.

"auto" picks, per op call:
  * GPU backend: cuDNN when it supports the call (bf16 / fp16, head dim a multiple of 8 up to 256, no dense mask),
    else "xla". (A forced "cudnn" also takes dense masks, as an additive bias.)
  * otherwise, when splash can express the mask (no dense mask; causal only for equal lengths; head dim a multiple
    of 128, or any head dim with `pad_head_dim=True`): `lax.platform_dependent(tpu=splash, default=xla)`, decided
    when lowering. A TPU run gets the kernel,
    a CPU run the reference, and an ahead-of-time compile for a TPU topology from a CPU host gets the kernel too.
  * else "xla".
A forced "splash" off TPU runs the same kernels in the Pallas interpreter (tests); a forced "cudnn" needs a GPU.
`pad_head_dim=True` (the ViT: head dim 72) lets splash take a head dim that is not a multiple of the 128 TPU lanes by
zero-padding q, k, v to the next multiple (zero lanes add nothing to q.k, the softmax scale stays hd**-0.5, and the
output is sliced back); only the splash branch pads, "xla" and "cudnn" see the true head dim.
Under a mesh (`ming_jax.sharding.use_mesh`) splash runs in one `shard_map`: batch split by the `batch` rule, heads by
`act_heads`, sequences whole on every shard.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from ming_jax import sharding
from ming_jax.config.runtime import ATTENTION_IMPLEMENTATIONS
from ming_jax.pallas.attention import reference as attention_reference
from ming_jax.pallas.attention.reference import attend
from ming_jax.pallas.attention.splash import splash_attention

IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS
_LANES = 128  # TPU lane width: splash's head dim must be a multiple of it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query attends: (key slot <= query slot, if causal) and equal segment ids and `dense`.

    q_segment_ids [B, T] / kv_segment_ids [B, S] int (>= 0), both or neither; dense [B|1, 1|H, T, S] bool or None.
    Causal counts both query and key slots from 0, so it means self-attention over the same T slots.
    """

    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    dense: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def self_attention(cls, segment_ids=None, *, causal: bool) -> "AttentionMask":
        """Tokens of one sequence attending each other: segment_ids [B, T] (None: one segment)."""
        return cls(segment_ids, segment_ids, None, causal)

    @property
    def has_segments(self) -> bool:
        return self.q_segment_ids is not None

    def to_dense(self, q_len: int, kv_len: int):
        """[B|1, 1|H, T, S] bool, or None when every query sees every key."""
        if not (self.causal or self.has_segments):
            return self.dense
        mask = attention_reference.dense_mask(q_len, kv_len, q_segment_ids=self.q_segment_ids,
                                              kv_segment_ids=self.kv_segment_ids, causal=self.causal)
        return mask if self.dense is None else mask & self.dense


def as_mask(mask) -> AttentionMask:
    """None, a dense boolean array, or an AttentionMask -> AttentionMask."""
    if mask is None:
        return AttentionMask()
    if not isinstance(mask, AttentionMask):
        return AttentionMask(dense=mask)
    if (mask.q_segment_ids is None) != (mask.kv_segment_ids is None):
        raise ValueError("AttentionMask: give both q_segment_ids and kv_segment_ids, or neither")
    return mask


def splash_supports(q, k, mask: AttentionMask, *, pad_head_dim: bool = False) -> str | None:
    """None if splash can run this call, else the reason it cannot (`pad_head_dim`: any head dim, zero-padded)."""
    if mask.dense is not None:
        return "splash takes causal + segment ids, not a dense mask (decoding against a KV cache uses 'xla')"
    if mask.causal and q.shape[1] != k.shape[1]:
        return f"causal splash needs equal query / key lengths, got {q.shape[1]} and {k.shape[1]}"
    if q.shape[-1] % _LANES and not pad_head_dim:
        return f"head dim {q.shape[-1]} is not a multiple of 128 (TPU lane width; pad_head_dim=True pads it)"
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"dtype {q.dtype} (splash: bfloat16, float32)"
    return None


def cudnn_supports(q, k, mask: AttentionMask) -> str | None:
    """None if cuDNN flash attention can run this call, else the reason it cannot."""
    if jax.default_backend() != "gpu":
        return f"cuDNN needs a GPU backend, this one is {jax.default_backend()!r}"
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {q.dtype} (cuDNN flash attention: bfloat16, float16)"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} (cuDNN: a multiple of 8, at most 256)"
    if mask.causal and q.shape[1] != k.shape[1]:
        return f"causal with query / key lengths {q.shape[1]} != {k.shape[1]}"
    return None


def resolve_attention_impl(impl: str, q, k, mask, *, pad_head_dim: bool = False) -> str:
    """The implementation `attention` will use: "xla", "splash", "cudnn" or "tpu_else_xla" (decided when lowering)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r}; known: {IMPLEMENTATIONS}")
    mask = as_mask(mask)
    if impl != "auto":
        return impl
    if jax.default_backend() == "gpu":
        return "cudnn" if mask.dense is None and cudnn_supports(q, k, mask) is None else "xla"
    if splash_supports(q, k, mask, pad_head_dim=pad_head_dim) is None:
        return "splash" if jax.default_backend() == "tpu" else "tpu_else_xla"
    return "xla"


def attention(q, k, v, mask=None, *, scale: float | None = None, impl: str = "auto", pad_head_dim: bool = False):
    """q [B, T, H, hd], k / v [B, S, K, hd] (H % K == 0), mask: AttentionMask | dense bool | None -> [B, T, H, hd].

    Every backend computes `attend(q, k, v, mask.to_dense(T, S), scale=scale)` up to float rounding, and every
    backend differentiates. Queries whose mask row is empty are the caller's problem (kernels may return anything
    there); self-attention with causal / segment masks never has one. `pad_head_dim`: see the module docstring.
    """
    mask = as_mask(mask)
    choice = resolve_attention_impl(impl, q, k, mask, pad_head_dim=pad_head_dim)
    with jax.named_scope(f"attention_{choice}"):
        if choice == "xla":
            return _xla(q, k, v, mask, scale)
        if choice == "cudnn":
            return _cudnn(q, k, v, mask, scale)
        reason = splash_supports(q, k, mask, pad_head_dim=pad_head_dim)
        if reason is not None:
            raise ValueError(f"attention impl 'splash': {reason}")
        if choice == "splash" and jax.default_backend() == "tpu":
            return _padded_splash(q, k, v, mask, scale, interpret=False)
        if choice == "splash":  # forced off TPU: the interpreter here, the compiled kernel if lowered for TPU
            default = lambda q, k, v: _padded_splash(q, k, v, mask, scale, interpret=True)  # noqa: E731
        else:
            default = lambda q, k, v: _xla(q, k, v, mask, scale)  # noqa: E731
        return lax.platform_dependent(
            q, k, v, tpu=lambda q, k, v: _padded_splash(q, k, v, mask, scale, interpret=False), default=default)


def _xla(q, k, v, mask: AttentionMask, scale):
    return attend(q, k, v, mask.to_dense(q.shape[1], k.shape[1]), scale=scale)


def _padded_splash(q, k, v, mask: AttentionMask, scale, *, interpret):
    """`_splash` with the head dim zero-padded to a multiple of 128 lanes (a no-op when it is one already): padded
    lanes add 0 to every q.k, the scale stays the true hd**-0.5, and the padded output lanes (0) are sliced off."""
    hd = q.shape[-1]
    width = -(-hd // _LANES) * _LANES
    if width == hd:
        return _splash(q, k, v, mask, scale, interpret=interpret)
    scale = hd**-0.5 if scale is None else scale
    pad = lambda x: jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, width - hd),))  # noqa: E731
    return _splash(pad(q), pad(k), pad(v), mask, scale, interpret=interpret)[..., :hd]


def _splash(q, k, v, mask: AttentionMask, scale, *, interpret):
    """Splash on the local shard: under an active mesh (`sharding.use_mesh`) one `shard_map` splits the batch over
    the `batch` rule's axes and the heads over the `act_heads` rule's axes (a Mosaic call cannot be partitioned by
    XLA). Query head h reads KV head h // G and heads are laid out group by group, so H / n contiguous query heads
    and K / n KV heads stay together on each shard. An axis that does not divide its dim is not split."""

    def local(q, k, v, *segments):
        q_seg, kv_seg = segments or (None, None)
        return splash_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=mask.causal,
                                scale=scale, interpret=interpret)

    segments = (mask.q_segment_ids, mask.kv_segment_ids) if mask.has_segments else ()
    act = sharding.active()
    if act is None:
        return local(q, k, v, *segments)
    mesh, rules = act.mesh, act.rules

    def split(name: str, *sizes: int):
        axes = tuple(a for a in rules.mesh_axes(name) if mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in axes)
        return axes if axes and all(size % n == 0 for size in sizes) else None

    batch = split("batch", q.shape[0])
    heads = split("act_heads", q.shape[2], k.shape[2])
    qkv_spec = PartitionSpec(batch, None, heads, None)
    seg_spec = (PartitionSpec(batch, None),) * len(segments)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + seg_spec, out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v, *segments)


def _cudnn(q, k, v, mask: AttentionMask, scale):
    reason = cudnn_supports(q, k, mask)
    if reason is not None:
        raise ValueError(f"attention impl 'cudnn': {reason}")
    dense = AttentionMask(mask.q_segment_ids, mask.kv_segment_ids, mask.dense).to_dense(q.shape[1], k.shape[1])
    if dense is not None:
        dense = jnp.broadcast_to(dense, (q.shape[0],) + dense.shape[1:])  # cuDNN wants the batch dim spelled out
    return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, is_causal=mask.causal,
                                        implementation="cudnn")
