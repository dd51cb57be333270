"""Tile schedules for grouped matmuls over expert-sorted rows.

The rows of `lhs` are sorted by group: group g owns rows [offsets[g], offsets[g+1]). The kernels walk the rows in
`tm`-row tiles, and a tile that straddles a group boundary is visited once per group that owns some of its rows, each
visit storing only that group's rows. The schedule is a flat list of grid steps; step s works on row tile
`tile_ids[s]` with the weights of group `group_ids[s]`. Tile ids never decrease along the schedule, so every output
tile (gmm) or every group's output block (tgmm) is revisited on consecutive steps only, which is what lets a Pallas
TPU pipeline keep it resident in VMEM between visits.

Rows at or past sum(group_sizes) are padding. With `tail_group=True` they form one extra group (id G, no weights)
whose steps store zeros, so the kernel itself writes every output row and nothing downstream has to mask.

Everything here is plain jnp on traced group sizes, so it runs inside jit and under `shard_map`; only the array
lengths (`max_steps`) are static.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupSchedule(NamedTuple):
    """Scalar-prefetch operands of the grouped kernels plus the dynamic grid length."""

    offsets: jax.Array  # [G' + 1] int32 row where each group starts; G' = G (+1 with the tail group)
    group_ids: jax.Array  # [max_steps] int32 group each grid step works on
    tile_ids: jax.Array  # [max_steps] int32 row tile each grid step works on
    num_steps: jax.Array  # [] int32 grid steps actually used (<= max_steps)


def num_row_tiles(m: int, tm: int) -> int:
    return -(-m // tm)


def max_steps(m: int, tm: int, num_groups: int) -> int:
    """Static bound on the schedule length: every group adds at most one tile beyond the row tiles.

    A non-empty group costs the tiles it touches, and consecutive groups share at most one tile, so the non-empty
    groups together cost at most row_tiles + (#non-empty - 1); each visited empty group costs one more step.
    """
    return num_row_tiles(m, tm) + num_groups


def group_offsets(group_sizes: jax.Array, m: int, *, tail_group: bool) -> jax.Array:
    """[G + 1] (or [G + 2] with the tail group) int32 row offsets, clamped to m.

    Sizes whose running sum passes m are cut at m (rows that do not exist cannot belong to a group) and negative sizes
    count as 0, so any int32 input gives a well-formed partition of the rows.
    """
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)  # [G]
    parts = [jnp.zeros((1,), jnp.int32), ends]
    if tail_group:
        parts.append(jnp.full((1,), m, jnp.int32))
    return jnp.concatenate(parts).astype(jnp.int32)


def make_schedule(
    group_sizes: jax.Array, *, m: int, tm: int, tail_group: bool, visit_empty: bool
) -> GroupSchedule:
    """Build the step list for `m` rows in `tm`-row tiles.

    tail_group: add the padding rows [sum, m) as group G (gmm: so padding outputs are written as zeros).
    visit_empty: give every empty group one step (tgmm: its weight gradient must still be written, as zeros).
    """
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes must be 1-D [G], got shape {group_sizes.shape}")
    offsets = group_offsets(group_sizes, m, tail_group=tail_group)  # [G' + 1]
    starts, ends = offsets[:-1], offsets[1:]  # [G']
    n_groups = starts.shape[0]
    row_tiles = num_row_tiles(m, tm)
    length = max_steps(m, tm, n_groups)

    nonempty = ends > starts
    first_tile = jnp.minimum(starts // tm, row_tiles - 1)
    last_tile = jnp.where(nonempty, (ends - 1) // tm, first_tile)
    tiles = jnp.where(nonempty, last_tile - first_tile + 1, 1 if visit_empty else 0).astype(jnp.int32)  # [G']

    step_start = jnp.cumsum(tiles) - tiles  # [G'] first step of each group
    num_steps = jnp.sum(tiles).astype(jnp.int32)
    # Steps past num_steps repeat the last group; the dynamic grid never runs them.
    group_ids = jnp.repeat(jnp.arange(n_groups, dtype=jnp.int32), tiles, total_repeat_length=length)  # [S]
    step = jnp.arange(length, dtype=jnp.int32)
    tile_ids = first_tile[group_ids] + step - step_start[group_ids]
    tile_ids = jnp.clip(tile_ids, 0, row_tiles - 1).astype(jnp.int32)  # [S]
    return GroupSchedule(offsets, group_ids, tile_ids, num_steps)
