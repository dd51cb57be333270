"""Splash attention tiles and the cached construction of jax's splash kernel for one problem.

jax ships the kernel itself (`jax.experimental.pallas.ops.tpu.splash_attention`): a flash-attention forward plus dq and
dkv backward kernels with their own custom VJP, block-sparse over a static mask (blocks the mask rules out are never
loaded or computed) and with per-token segment ids and-ed into the static mask inside the kernel. What this module
adds is the choice of tiles and a cache: turning a static mask into the kernel's block metadata is numpy work at trace
time, done once per (heads, lengths, causal, tiles, interpret) and reused by every layer and every retrace.

Grouped-query attention uses splash's "MHA" kernel with fewer KV heads than query heads (k / v [K, S, hd]): query
head h reads KV head h // (H // K) through the index maps, and the dkv kernel sums the gradient of a KV head over its
query heads in VMEM, so KV heads are never repeated in HBM.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

_LANES = 128  # kv tiles must be multiples of the 128-lane vreg width; q tiles too, so that one padding rule serves


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the three splash kernels: forward, dq (backward) and dkv (backward).

    `block_q` query rows x `block_kv` keys per grid step (the forward walks the kv tile in `block_kv_compute` slices).
    Backward tiles left as None follow the forward ones. Every tile must be a multiple of 128; sequences are padded to
    a multiple of every q tile (`q_multiple`) and every kv tile (`kv_multiple`).
    """

    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int | None = None
    block_q_dq: int | None = None
    block_kv_dq: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    block_kv_dkv_compute: int | None = None

    def __post_init__(self):
        fill = dict(block_kv_compute=self.block_kv, block_q_dq=self.block_q, block_kv_dq=self.block_kv,
                    block_q_dkv=self.block_q, block_kv_dkv=self.block_kv)
        for name, default in fill.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.block_kv_dkv_compute is None:
            object.__setattr__(self, "block_kv_dkv_compute", self.block_kv_dkv)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0 or v % _LANES:
                raise ValueError(f"BlockSizes.{f.name}={v!r} must be a positive multiple of {_LANES}")
        for tile, part in (("block_kv", "block_kv_compute"), ("block_kv_dkv", "block_kv_dkv_compute")):
            if getattr(self, tile) % getattr(self, part):
                raise ValueError(f"BlockSizes.{tile}={getattr(self, tile)} is not a multiple of "
                                 f"{part}={getattr(self, part)}")

    @property
    def q_multiple(self) -> int:
        return math.lcm(self.block_q, self.block_q_dq, self.block_q_dkv)

    @property
    def kv_multiple(self) -> int:
        return math.lcm(self.block_kv, self.block_kv_dq, self.block_kv_dkv)

    @classmethod
    def get_default(cls, q_len: int, kv_len: int) -> "BlockSizes":
        """512-wide tiles (jax / maxtext's choice for v5p-class chips), shrunk for short sequences.

        Each tile is the largest of 512, 256, 128 that divides the length rounded up to 128, so padding never exceeds
        127 tokens. Not tuned on hardware: no TPU was available to time alternatives.
        """

        def fit(n: int) -> int:
            n = -(-n // _LANES) * _LANES
            return next(b for b in (512, 256, 128) if n % b == 0)

        return cls(block_q=fit(q_len), block_kv=fit(kv_len))

    def to_splash(self) -> splash.BlockSizes:
        return splash.BlockSizes(
            block_q=self.block_q, block_kv=self.block_kv, block_kv_compute=self.block_kv_compute,
            block_q_dkv=self.block_q_dkv, block_kv_dkv=self.block_kv_dkv,
            block_kv_dkv_compute=self.block_kv_dkv_compute, block_q_dq=self.block_q_dq,
            block_kv_dq=self.block_kv_dq, use_fused_bwd_kernel=False)


def get_default(q_len: int, kv_len: int) -> BlockSizes:
    return BlockSizes.get_default(q_len, kv_len)


def static_mask(num_heads: int, q_len: int, kv_len: int, causal: bool) -> splash.MultiHeadMask:
    """The per-head static mask: causal (key slot <= query slot, both counted from 0) or full."""
    one = splash.CausalMask((q_len, kv_len)) if causal else splash.FullMask((q_len, kv_len))
    return splash.MultiHeadMask([one] * num_heads)


@functools.lru_cache(maxsize=64)
def make_kernel(num_heads: int, q_len: int, kv_len: int, causal: bool, blocks: BlockSizes, interpret=False):
    """One single-device splash kernel for [H, q_len, hd] queries against [K, kv_len, hd] keys / values.

    Lengths must already be multiples of `blocks.q_multiple` / `blocks.kv_multiple`. `interpret` (True, or a
    `pltpu.InterpretParams` for TPU memory semantics) runs the same kernels in a Pallas interpreter on any backend.
    """
    if q_len % blocks.q_multiple or kv_len % blocks.kv_multiple:
        raise ValueError(f"lengths ({q_len}, {kv_len}) are not multiples of the tiles "
                         f"({blocks.q_multiple}, {blocks.kv_multiple}); pad first")
    # The block metadata becomes jnp arrays inside; build them as concrete constants even when first called while
    # tracing, so that the cached kernel never holds a tracer of the trace that happened to build it.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha_single_device(
            static_mask(num_heads, q_len, kv_len, causal), block_sizes=blocks.to_splash(), interpret=interpret)
