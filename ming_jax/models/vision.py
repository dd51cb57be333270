"""The vision tower of Ming-flash-omni 2.0: a Qwen3-VL-MoE-style ViT over variable-resolution images and videos.

Reading order follows the data: the static layout of a batch (which patch sits where, which patches attend to each
other), patch embedding, learned position embeddings interpolated to each grid, 2-D rotary, attention restricted to
each (image, frame), the blocks, the 2x2 patch mergers (final and deepstack), the tower, and finally the projector
into the LLM width with the L2 normalisation the omni model applies to image embeddings.

Input contract (the image processor's output, unchanged):
* `pixel_values` [N, C * Tp * P * P]: one row per (temporal patch, spatial patch), flattened in (C, Tp, P, P) order.
  Within an image the rows come in 2x2-merge-window order: for each frame, for each window row, for each window
  column, the window's patches row-major. The merger therefore concatenates 4 consecutive rows.
* `grid_thw` [n, 3]: (t, h, w) in patches for each image / video, in row order; sum(t * h * w) == N, and h, w are
  multiples of `spatial_merge_size`.

The grid decides every shape and every index of the computation, so it is static: pass it as numpy / nested tuples
(jit with `grid` as a static argument, see `vision_forward`), never as a traced array.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ming_jax import sharding
from ming_jax.config.runtime import Runtime
from ming_jax.config.vision import VisionConfig
from ming_jax.pallas.attention import api as attention_api
from ming_jax.pallas.attention.reference import attend, segment_mask
from ming_jax.layers.mlp import GeluMLP, gelu_mlp
from ming_jax.layers.norms import LayerNorm
from ming_jax.layers.linear import Linear
from ming_jax.layers.norms import l2_normalize
from ming_jax.layers.params import fan_in_normal, normal, param, read, zeros
from ming_jax.layers.rotary import apply_rotary, inv_frequencies

Grid = tuple[tuple[int, int, int], ...]
# Logical names of the tower's [N, D] patch rows: the rows are the images' patches, split like a batch under a mesh
# (`sharding.constrain_even`: only when they divide the batch axes), so that the per-patch layers and the per-image
# attention stay on the chip that holds the image instead of running replicated with model-dim-sharded weights.
_ROWS = ("batch", "act_embed")


# --- the static layout of a batch --------------------------------------------------------------------------------


def as_grid(grid_thw) -> Grid:
    """grid_thw (numpy / torch-converted / nested sequences, [n, 3]) -> hashable nested tuple; rejects traced arrays."""
    if isinstance(grid_thw, jax.core.Tracer):
        raise TypeError("grid_thw must be concrete (numpy or nested tuples), not a traced array: it fixes every "
                        "shape of the vision tower; make it a static argument of the jitted function")
    arr = np.asarray(grid_thw)
    if arr.size == 0:
        arr = arr.reshape(0, 3).astype(np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [num_images, 3] (t, h, w), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"grid_thw must hold integers, got dtype {arr.dtype}")
    return tuple(tuple(int(v) for v in row) for row in arr)


@dataclasses.dataclass(frozen=True, eq=False)
class VisionLayout:
    """Everything about a batch that depends only on its grid: built once per grid in numpy, constant under jit."""

    grid: Grid
    rows: np.ndarray  # [N] int32: patch row inside its image, in processor (merge-window) order
    cols: np.ndarray  # [N] int32: patch column
    pos_index: np.ndarray  # [4, N] int32: the 4 bilinear neighbours in the learned position table
    pos_weight: np.ndarray  # [4, N] float32: their weights
    segment_ids: np.ndarray  # [N] int32: one id per (image, frame); attention stays inside a segment
    order: np.ndarray | None  # [N] int32 gather putting equal-length segments next to each other (None: identity)
    inverse: np.ndarray | None  # [N] int32 its inverse
    groups: tuple[tuple[int, int], ...]  # (segment length, number of segments), in `order`

    @property
    def num_patches(self) -> int:
        return int(self.rows.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """The layout of patches packed into B rows of P patch slots (training batches, `ming_jax.train.data`), as
    arrays, so that one compiled program serves every batch whatever its images' sizes.

    Each (image, frame) occupies consecutive slots of one row, starting at a multiple of merge**2 (its merge
    windows stay together), and is one attention segment: `segment_ids` numbers them within the row (1, 2, ...), 0
    marks an empty slot. The other fields are `vision_layout`'s per-patch values of each slot (0 on empty slots).
    Attention is one [P, P] block per row, masked to the segments: B * P**2 work, against the sum of segment
    lengths squared of the static grouped layout (the price of one program for all batches)."""

    rows: jax.Array  # [B, P] int32 patch row inside its image
    cols: jax.Array  # [B, P] int32 patch column
    pos_index: jax.Array  # [B, P, 4] int32 bilinear neighbours in the learned position table
    pos_weight: jax.Array  # [B, P, 4] float32 their weights
    segment_ids: jax.Array  # [B, P] int32 (image, frame) within the row; 0 = empty slot


def _linspace_f32(end: int, steps: int) -> np.ndarray:
    """`torch.linspace(0, end, steps)` in float32, bit for bit: float32 step, products and sums in float64,
    the first half counted up from 0 and the second half down from `end`."""
    if steps == 1:
        return np.zeros(1, np.float32)
    step = np.float64(np.float32(end) / np.float32(steps - 1))
    i = np.arange(steps)
    values = np.where(i < steps // 2, step * i, end - step * (steps - 1 - i))
    return values.astype(np.float32)


def _bilinear_axis(side: int, n: int):
    """Sample `n` points evenly over a table axis of `side` entries: (floor index, ceil index, fraction)."""
    x = _linspace_f32(side - 1, n)  # [n]
    lo = x.astype(np.int32)  # truncation == floor, x >= 0
    hi = np.minimum(lo + 1, side - 1)
    frac = (x - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac


@functools.lru_cache(maxsize=64)
def vision_layout(grid: Grid, merge: int, side: int) -> VisionLayout:
    """Patch coordinates, position-table interpolation and attention segments of a batch with this grid.

    Patch order inside an image is the processor's: frames, then merge windows row-major, then the window's patches
    row-major, so patch (r, c) has r = window_row * merge + i, c = window_col * merge + j. Each frame of each image is
    one attention segment (the official cu_seqlens), and every frame of an image uses the same positions.
    """
    rows, cols, idx, wts, seg_len = [], [], [], [], []
    for t, h, w in grid:
        wr, wc, i, j = np.meshgrid(np.arange(h // merge), np.arange(w // merge), np.arange(merge), np.arange(merge),
                                   indexing="ij")
        r = np.tile((wr * merge + i).reshape(-1), t).astype(np.int32)  # [t*h*w]
        c = np.tile((wc * merge + j).reshape(-1), t).astype(np.int32)
        h_lo, h_hi, dh = _bilinear_axis(side, h)
        w_lo, w_hi, dw = _bilinear_axis(side, w)
        idx.append(np.stack([h_lo[r] * side + w_lo[c], h_lo[r] * side + w_hi[c],
                             h_hi[r] * side + w_lo[c], h_hi[r] * side + w_hi[c]]))  # [4, t*h*w]
        one = np.float32(1)
        wts.append(np.stack([(one - dh[r]) * (one - dw[c]), (one - dh[r]) * dw[c],
                             dh[r] * (one - dw[c]), dh[r] * dw[c]]))
        rows.append(r)
        cols.append(c)
        seg_len += [h * w] * t
    seg_len = np.asarray(seg_len, np.int64)
    starts = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    segment_ids = np.repeat(np.arange(len(seg_len), dtype=np.int32), seg_len)
    # Group equal-length segments so that each group is one dense [G, L] attention batch: no padding, no masking.
    by_len = np.argsort(seg_len, kind="stable")
    groups = []
    for s in by_len:
        L = int(seg_len[s])
        if groups and groups[-1][0] == L:
            groups[-1][1] += 1
        else:
            groups.append([L, 1])
    order = np.concatenate([np.arange(starts[s], starts[s] + seg_len[s]) for s in by_len]).astype(np.int32)
    identity = bool(np.all(order == np.arange(order.size)))
    return VisionLayout(
        grid=grid,
        rows=np.concatenate(rows),
        cols=np.concatenate(cols),
        pos_index=np.concatenate(idx, axis=1).astype(np.int32),
        pos_weight=np.concatenate(wts, axis=1).astype(np.float32),
        segment_ids=segment_ids,
        order=None if identity else order,
        inverse=None if identity else np.argsort(order).astype(np.int32),
        groups=tuple((L, g) for L, g in groups),
    )


def check_inputs(cfg: VisionConfig, pixel_shape: Sequence[int], grid: Grid) -> None:
    """Raise ValueError naming the problem when pixel rows and grid do not describe the same patches."""
    if len(pixel_shape) != 2 or pixel_shape[1] != cfg.patch_dim:
        raise ValueError(f"pixel_values must be [num_patches, C*Tp*P*P = {cfg.patch_dim}] "
                         f"({cfg.in_channels}*{cfg.temporal_patch_size}*{cfg.patch_size}*{cfg.patch_size}), "
                         f"got {tuple(pixel_shape)}")
    if not grid:
        raise ValueError("grid_thw is empty: no image to encode")
    m = cfg.spatial_merge_size
    for n, (t, h, w) in enumerate(grid):
        if t <= 0 or h <= 0 or w <= 0:
            raise ValueError(f"grid_thw[{n}] = {(t, h, w)}: t, h, w must be positive")
        if h % m or w % m:
            raise ValueError(f"grid_thw[{n}] = {(t, h, w)}: h and w must be multiples of spatial_merge_size={m}")
    total = sum(t * h * w for t, h, w in grid)
    if total != pixel_shape[0]:
        raise ValueError(f"grid_thw {list(grid)} describes {total} patches but pixel_values has {pixel_shape[0]} rows")


# --- pure math ----------------------------------------------------------------------------------------------------


def interpolate_positions(table, layout: VisionLayout | PackedLayout):
    """table [side*side, D] -> [N, D]: bilinear interpolation of the learned grid at each patch position (a packed
    layout's B x P slots flattened to N rows)."""
    if isinstance(layout, PackedLayout):
        index, weight = layout.pos_index.reshape(-1, 4).T, layout.pos_weight.reshape(-1, 4).T
    else:
        index, weight = layout.pos_index, layout.pos_weight
    picked = table[index]  # [4, N, D]
    w = jnp.asarray(weight, table.dtype)[:, :, None]  # [4, N, 1]
    return picked[0] * w[0] + picked[1] * w[1] + picked[2] * w[2] + picked[3] * w[3]


def vision_rope(layout: VisionLayout | PackedLayout, head_dim: int, theta: float):
    """2-D rotary: cos, sin [N, head_dim]. The first quarter of the frequencies rotate with the patch row, the
    second with the column; the two halves of rotate_half repeat that pattern."""
    inv_freq = inv_frequencies(head_dim // 2, theta)  # [hd/4]
    rows = jnp.asarray(layout.rows, jnp.float32).reshape(-1)[:, None] * inv_freq  # [N, hd/4]
    cols = jnp.asarray(layout.cols, jnp.float32).reshape(-1)[:, None] * inv_freq
    freqs = jnp.concatenate([rows, cols], axis=-1)  # [N, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [N, hd]
    return jnp.cos(emb), jnp.sin(emb)


def to_grouped(x, layout: VisionLayout):
    """Rows in processor order -> grouped order (equal-length segments adjacent; each segment stays contiguous)."""
    return x if layout.order is None else x[layout.order]


def from_grouped(x, layout: VisionLayout):
    return x if layout.inverse is None else x[layout.inverse]


def segment_attention(q, k, v, layout: VisionLayout | PackedLayout, impl: str = "grouped", attention: str = "xla"):
    """q, k, v [N, H, hd] -> [N, H, hd], each patch attending only to the patches of its own (image, frame).

    `impl` is the layout of the work:
    "grouped": rows must be in grouped order (`to_grouped`); each run of equal-length segments is one [G, L] batch
    of attention calls, one (image, frame) per batch row, so the work is sum(L^2) with no padding and no mask.
    Everything else in a block is per patch, so the tower permutes once before the blocks and back once after.
    "masked": rows in processor order, one [1, N] call whose mask is the per-(image, frame) segment ids (1, 2, ...):
    N^2 work (splash's static mask is full, so no tile is skipped); the reference of the grouped path.

    A `PackedLayout` (training batches) ignores `impl`: the N rows are its B x P slots, and each row of P slots is
    one attention call masked to its segments.

    `attention` is the backend (`Runtime.attention`): "xla" is the plain `attend` formulation above, anything else
    goes through `ming_jax.pallas.attention.api.attention` with that impl and `pad_head_dim=True` (the release's
    head dim is 72: splash gets q, k, v zero-padded to 128 lanes). "auto" is splash when lowered for TPU, cuDNN on
    a GPU where it takes the call (bf16 / fp16), else exactly the "xla" formulation.
    """
    if attention not in attention_api.IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r} (known: {attention_api.IMPLEMENTATIONS})")
    if isinstance(layout, PackedLayout):  # N = B * P rows; each row of P slots is one masked attention block
        ids = layout.segment_ids.astype(jnp.int32)  # [B, P]
        rows = lambda x: x.reshape(ids.shape + x.shape[1:])  # noqa: E731  [B, P, H, hd]
        if attention == "xla":
            out = attend(rows(q), rows(k), rows(v), segment_mask(ids, ids))
        else:
            mask = attention_api.AttentionMask.self_attention(ids, causal=False)
            out = attention_api.attention(rows(q), rows(k), rows(v), mask, impl=attention, pad_head_dim=True)
        return out.reshape(q.shape)
    if impl == "masked":
        ids = jnp.asarray(layout.segment_ids + 1)[None]  # [1, N]; 0 is the dispatcher's padding id
        if attention == "xla":
            return attend(q[None], k[None], v[None], segment_mask(ids, ids))[0]
        mask = attention_api.AttentionMask.self_attention(ids, causal=False)
        return attention_api.attention(q[None], k[None], v[None], mask, impl=attention, pad_head_dim=True)[0]
    outs, start = [], 0
    for length, count in layout.groups:
        stop = start + length * count

        def batch(x):
            return x[start:stop].reshape((count, length) + x.shape[1:])  # [G, L, H, hd]

        if attention == "xla":
            out = attend(batch(q), batch(k), batch(v))
        else:  # each batch row is one segment: the block diagonal is the batch, no mask needed
            out = attention_api.attention(batch(q), batch(k), batch(v), None, impl=attention, pad_head_dim=True)
        outs.append(out.reshape((stop - start,) + q.shape[1:]))
        start = stop
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)  # [N, H, hd]


# --- modules ------------------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """The official Conv3d with kernel == stride over one patch, as the matmul it is on flattened patch rows."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs: nnx.Rngs):
        pdt = param_dtype
        self.kernel = param(rngs, fan_in_normal(), (cfg.patch_dim, cfg.hidden_size), ("patch", "embed"), pdt)
        self.bias = param(rngs, zeros, (cfg.hidden_size,), ("embed",), pdt)

    def __call__(self, pixels):  # [N, K] -> [N, D]
        dt = pixels.dtype
        return jnp.einsum("nk,kd->nd", pixels, read(self.kernel, dt)) + read(self.bias, dt)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, segment_layout: str, attention: str = "xla",
                 rngs: nnx.Rngs):
        d, h, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        pdt = param_dtype
        self.impl = segment_layout
        self.attention = attention
        self.qkv_kernel = param(rngs, fan_in_normal(), (d, 3, h, hd), ("embed", None, "heads", "head_dim"), pdt)
        self.qkv_bias = param(rngs, zeros, (3, h, hd), (None, "heads", "head_dim"), pdt)
        self.out_kernel = param(rngs, fan_in_normal((0, 1)), (h, hd, d), ("heads", "head_dim", "embed"), pdt)
        self.out_bias = param(rngs, zeros, (d,), ("embed",), pdt)

    def __call__(self, x, cos, sin, layout: VisionLayout):  # x [N, D]
        dt = x.dtype
        qkv = jnp.einsum("nd,dchk->nchk", x, read(self.qkv_kernel, dt))
        qkv = qkv + read(self.qkv_bias, dt)  # [N, 3, H, hd]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, hd]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        o = segment_attention(q, k, v, layout, self.impl, self.attention)  # [N, H, hd]
        return jnp.einsum("nhk,hkd->nd", o, read(self.out_kernel, dt)) + read(self.out_bias, dt)


class VisionBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, *, param_dtype, segment_layout: str, attention: str = "xla",
                 rngs: nnx.Rngs):
        pdt = param_dtype
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt, rngs=rngs)
        self.attn = VisionAttention(cfg, param_dtype=pdt, segment_layout=segment_layout, attention=attention,
                                    rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size, approximate=cfg.gelu_approximate,
                           param_dtype=pdt, rngs=rngs)

    def __call__(self, x, cos, sin, layout: VisionLayout):
        with jax.named_scope("vit_attention"):
            x = x + self.attn(self.norm1(x), cos, sin, layout)
        with jax.named_scope("vit_mlp"):
            x = x + self.mlp(self.norm2(x))
        return x


class PatchMerger(nnx.Module):
    """Merge windows (2x2 in the release) -> one token: LayerNorm, concatenate the window's consecutive rows, fc1,
    erf GELU, fc2.

    The final merger normalises each patch before the concatenation; the deepstack mergers (`postshuffle=True`)
    normalise the concatenated window.
    """

    def __init__(self, cfg: VisionConfig, *, postshuffle: bool, param_dtype, rngs: nnx.Rngs):
        pdt = param_dtype
        m, o = cfg.merged_size, cfg.out_hidden_size
        self.postshuffle = postshuffle
        self.merged_size = m
        self.norm = LayerNorm(m if postshuffle else cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=pdt,
                              rngs=rngs)
        self.w_in = param(rngs, fan_in_normal(), (m, m), ("embed", "mlp"), pdt)
        self.b_in = param(rngs, zeros, (m,), ("mlp",), pdt)
        self.w_out = param(rngs, fan_in_normal(), (m, o), ("mlp", "embed"), pdt)
        self.b_out = param(rngs, zeros, (o,), ("embed",), pdt)

    def __call__(self, x):  # [N, D] -> [N / merge_unit, out_hidden]
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        dt = x.dtype
        return gelu_mlp(x, read(self.w_in, dt), read(self.b_in, dt), read(self.w_out, dt),
                        read(self.b_out, dt), approximate=False)


class VisionTransformer(nnx.Module):
    """The tower: `(pixel_values, grid_thw) -> merged tokens [N / 4, out_hidden_size]`.

    With `use_deepstack=True` it returns `(hidden, [deepstack features])`, one [N / 4, out_hidden_size] feature per
    `deepstack_visual_indexes` entry, in block order, each from the deepstack merger at that entry's position (the
    official forward). Without it only the hidden states come back and the deepstack mergers are not run (the omni
    model builds its tower that way and would discard them); their weights are still part of the tower.

    Blocks are stacked on a leading "layers" axis and run with `lax.scan`, split at the deepstack taps.
    `runtime` sets the dtypes and the attention backend (`runtime.attention`: "auto" = splash, head dim padded to
    128 lanes, when lowered for TPU, cuDNN on GPU where it applies, else "xla"; "xla" = plain `attend`).
    `segment_layout` is how the per-image attention is laid out (see `segment_attention`): "grouped" (default,
    sum(L^2) work) or "masked" (one N x N attention with per-(image, frame) segment ids, the reference).
    """

    def __init__(self, cfg: VisionConfig, runtime: Runtime | None = None, *, use_deepstack: bool = False,
                 segment_layout: str = "grouped", rngs: nnx.Rngs):
        if segment_layout not in ("grouped", "masked"):
            raise ValueError(f"segment_layout={segment_layout!r} (grouped, masked)")
        runtime = Runtime() if runtime is None else runtime
        self.cfg = cfg
        self.runtime = runtime
        self.use_deepstack = use_deepstack
        self.segment_layout = segment_layout
        pdt = jnp.dtype(runtime.param_dtype)
        self.patch_embed = PatchEmbed(cfg, param_dtype=pdt, rngs=rngs)
        self.pos_embed = param(rngs, normal(0.02), (cfg.num_position_embeddings, cfg.hidden_size), ("pos", "embed"),
                               pdt)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return VisionBlock(cfg, param_dtype=pdt, segment_layout=segment_layout, attention=runtime.attention,
                               rngs=r)

        self.blocks = make_blocks(rngs)
        self.merger = PatchMerger(cfg, postshuffle=False, param_dtype=pdt, rngs=rngs)
        self.deepstack_mergers = nnx.List(
            [PatchMerger(cfg, postshuffle=True, param_dtype=pdt, rngs=rngs) for _ in cfg.deepstack_visual_indexes])

    def layout(self, pixel_values, grid_thw) -> VisionLayout:
        grid = as_grid(grid_thw)
        check_inputs(self.cfg, tuple(pixel_values.shape), grid)
        return vision_layout(grid, self.cfg.spatial_merge_size, self.cfg.position_grid_side)

    def _run_blocks(self, x, cos, sin, layout: VisionLayout, start: int, stop: int):
        """Blocks [start, stop) as one scan over the stacked parameters."""
        graphdef, state = nnx.split(self.blocks)
        state = jax.tree.map(lambda a: a[start:stop], state)

        def body(h, layer_state):  # rows split over the batch axes under a mesh: each chip keeps its own patches
            return sharding.constrain_even(nnx.merge(graphdef, layer_state)(h, cos, sin, layout), _ROWS), None

        x, _ = jax.lax.scan(body, x, state)
        return x

    def __call__(self, pixel_values, grid_thw):
        layout = self.layout(pixel_values, grid_thw)
        x, cos, sin = self._embed(pixel_values, layout)
        grouped = self.segment_layout == "grouped"
        if grouped:  # blocks run in grouped row order; `restore` brings rows back wherever they leave the blocks
            x, cos, sin = (to_grouped(a, layout) for a in (x, cos, sin))
        restore = (lambda a: from_grouped(a, layout)) if grouped else (lambda a: a)
        return self._blocks_and_mergers(x, cos, sin, layout, restore)

    def packed(self, pixel_values, layout: PackedLayout):
        """Training batches: pixel rows [B, P, patch_dim] in P patch slots per row, their `PackedLayout` (arrays:
        traceable, one program for every batch of that shape) -> merged tokens [B, P / merge**2, out_hidden] (and
        the deepstack features alike with `use_deepstack`). Empty slots give merged rows that nothing may use."""
        b, p = layout.segment_ids.shape
        unit = self.cfg.spatial_merge_size ** 2
        if pixel_values.shape != (b, p, self.cfg.patch_dim) or p % unit:
            raise ValueError(f"packed patches: pixel_values {tuple(pixel_values.shape)} for a layout of {b} rows x "
                             f"{p} slots; expected {(b, p, self.cfg.patch_dim)} with slots a multiple of {unit}")
        x, cos, sin = self._embed(pixel_values.reshape(b * p, -1), layout)
        out = self._blocks_and_mergers(x, cos, sin, layout, lambda a: a)
        rows = lambda a: a.reshape(b, p // unit, a.shape[-1])  # noqa: E731
        return (rows(out[0]), [rows(f) for f in out[1]]) if self.use_deepstack else rows(out)

    def _embed(self, pixel_values, layout):
        cfg = self.cfg
        dt = jnp.dtype(self.runtime.dtype)
        with jax.named_scope("vit_embed"):
            x = self.patch_embed(jnp.asarray(pixel_values, dt))  # [N, D]
            x = x + interpolate_positions(read(self.pos_embed, dt), layout)
            cos, sin = vision_rope(layout, cfg.head_dim, cfg.rope_theta)  # [N, hd]
        return x, cos, sin

    def _blocks_and_mergers(self, x, cos, sin, layout, restore):
        cfg = self.cfg
        x = sharding.constrain_even(x, _ROWS)
        taps = sorted(cfg.deepstack_visual_indexes) if self.use_deepstack else []
        features, start = [], 0
        for layer in sorted(set(taps) | {cfg.depth - 1}):  # run up to each tap (and to the end)
            with jax.named_scope(f"vit_blocks_{start}_{layer}"):
                x = self._run_blocks(x, cos, sin, layout, start, layer + 1)
            start = layer + 1
            if layer in taps:
                with jax.named_scope(f"vit_deepstack_{layer}"):
                    merger = self.deepstack_mergers[cfg.deepstack_visual_indexes.index(layer)]
                    features.append(merger(restore(x)))
        with jax.named_scope("vit_merger"):
            hidden = self.merger(restore(x))  # [N / 4, out_hidden]
        return (hidden, features) if self.use_deepstack else hidden


@functools.partial(nnx.jit, static_argnames=("grid",))
def vision_forward(model: VisionTransformer, pixel_values, grid: Grid):
    """Jitted tower call; `grid` is `as_grid(grid_thw)` (hashable), one compilation per distinct grid."""
    return model(pixel_values, grid)


# --- into the language model --------------------------------------------------------------------------------------


class VisionProjector(nnx.Module):
    """Vision tokens -> LLM width: Linear(in, out), then (erf GELU, Linear(out, out)) `mlp_depth - 1` times.

    The omni model's `linear_proj`; `image_features` adds the L2 normalisation it applies afterwards.
    """

    def __init__(self, in_dim: int, out_dim: int, mlp_depth: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if mlp_depth < 1:
            raise ValueError(f"mlp_depth={mlp_depth} must be >= 1")
        dims = [in_dim] + [out_dim] * mlp_depth
        self.layers = nnx.List([Linear(a, b, ("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x):  # [..., in] -> [..., out]
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = layer(jax.nn.gelu(x, approximate=False))
        return x


@functools.partial(nnx.jit, static_argnames=("grid",))
def image_features(tower: VisionTransformer, projector: VisionProjector, pixel_values, grid: Grid):
    """The omni model's image / video embeddings: L2-normalised projection of the tower's merged tokens
    [N / 4, llm_hidden] (`grid` = `as_grid(grid_thw)`). Deepstack features, if the tower makes them, are not used
    there."""
    out = tower(pixel_values, grid)
    hidden = out[0] if tower.use_deepstack else out
    with jax.named_scope("vision_projector"):
        return l2_normalize(projector(hidden))
