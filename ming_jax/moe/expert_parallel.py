"""Expert parallelism: the routed experts of one MoE layer split over a mesh axis, tokens exchanged in ONE shard_map.

The router and the shared expert stay outside (ordinary GSPMD-sharded code); only the routed part is manual:

  per device (E experts over n devices of the `expert` axis, E_l = E / n local experts, t local tokens, K per token)
    all-gather this layer's local expert weights over the FSDP axes (their transpose: a reduce-scatter)
    sort the t*K (token, expert) pairs by expert                                     dispatch.sort_by_expert
    counts [n, E] = all_gather(rows per expert)                                      one tiny collective
    send the rows: expert g's rows go to device g // E_l                              ragged all-to-all "go"
    grouped GLU on the received rows, grouped by local expert                         gmm.grouped_glu
    send the results back to where they came from                                    ragged all-to-all "back"
    weighted combine per token (float32), psum over the tensor axes of expert_mlp   dispatch.combine
Autodiff goes through all of it (the transpose of each exchange is the exchange the other way). With one shard on
the expert axis and no capacity limit ("auto" mode) the rows are already local and no exchange is emitted.

Receive layout: on device j, the rows of its local expert e come first for e = 0, 1, ..., and within one expert by
source device s = 0, 1, ... (each source's rows in token order). So the received rows are already grouped by local
expert and go straight into the grouped matmul. With every device knowing `counts` (and the capacity), every offset
is a cumsum of it, computed locally (`exchange_layout`):

  kept[s, g]       rows of expert g that source s may send (= counts[s, g], or clipped by the per-expert capacity:
                   an expert keeps its first `capacity` rows in (source, token) order, i.e. global token order)
  region[g]        start of expert g's block on its device = sum of kept[:, g'] over earlier local experts g'
  pos[s, g]        = region[g] + sum_{s' < s} kept[s', g]: where source s's rows of expert g land on device g // E_l
  start[s, g]      = sum_{g' < g} counts[s, g']: where those rows sit in source s's sorted buffer

  `jax.lax.ragged_all_to_all` takes one slice per (destination device, its local expert) = E slices, entry
  i = j * E_l + e addressing device j (i // E_l, as the primitive requires):
    go   (sender me):   input_offsets = start[me, :]   send_sizes = kept[me, :]   output_offsets = pos[me, :]
                        recv_sizes[i = s * E_l + e] = kept[s, me * E_l + e]   (from source s, for my expert e)
    back (sender me):   input_offsets[s * E_l + e] = pos[s, me * E_l + e]     send_sizes = kept[s, me * E_l + e]
                        output_offsets[s * E_l + e] = start[s, me * E_l + e]  recv_sizes = kept[me, :]
  (`output_offsets` are positions on the *receiver*; since all offsets derive from the gathered counts no extra
  all-to-all of offsets is needed.)

XLA:CPU has no ragged all-to-all: `padded_ragged_all_to_all` implements the primitive's documented semantics with
a dense `all_to_all` of fixed-size per-peer chunks plus a gather and a scatter (rows carry their destination
index). "auto" uses the ragged primitive on TPU / GPU and the padded one elsewhere. Tests check the layout and the
padded exchange against a plain simulation of the documented semantics, and compile the ragged one for TPU.

Buffers are static: dropless (the default), a device may receive at most n * t * min(K, E_l) rows (every token of
every source choosing it); with a capacity factor c each expert keeps at most ceil(c * n * t * K / E) rows and the
buffer is E_l times that. The capacity is per expert-parallel group (the devices of one `expert` axis line).
Assumes each token's K experts are distinct (the router's top-k guarantees it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ming_jax import sharding
from ming_jax.config.runtime import EXPERT_PARALLEL_MODES
from ming_jax.moe import dispatch
from ming_jax.pallas.gmm import api as gmm
from ming_jax.pallas.gmm import quant

EXCHANGES = ("ragged", "padded", "none")
MODES = EXPERT_PARALLEL_MODES


# --- layout ---------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExchangeLayout:
    """Offsets of one device's two ragged exchanges, "go" (to the experts) and "back" (see the module docstring),
    all [E] int32."""

    go_input_offsets: jax.Array
    go_send_sizes: jax.Array
    go_output_offsets: jax.Array
    go_recv_sizes: jax.Array
    back_input_offsets: jax.Array
    back_send_sizes: jax.Array
    back_output_offsets: jax.Array
    back_recv_sizes: jax.Array
    local_group_sizes: jax.Array  # [E_l] rows of each local expert in the receive buffer


def _exclusive_cumsum(x, axis):
    return jnp.cumsum(x, axis=axis) - x


def exchange_layout(counts, me, capacity: int | None = None) -> ExchangeLayout:
    """counts [n, E] int (rows each source holds per global expert), me: this device's index on the expert axis."""
    n, e = counts.shape
    el = e // n
    counts = counts.astype(jnp.int32)
    if capacity is None:
        kept = counts
    else:
        kept = jnp.clip(capacity - _exclusive_cumsum(counts, 0), 0, counts)
    total = kept.sum(0)  # [E]
    region = _exclusive_cumsum(total.reshape(n, el), 1).reshape(e)
    pos = region[None, :] + _exclusive_cumsum(kept, 0)  # [n, E]
    start = _exclusive_cumsum(counts, 1)  # [n, E]
    mine = lambda a: jax.lax.dynamic_slice_in_dim(a, me * el, el, axis=1).reshape(-1)  # noqa: E731  [n*E_l]
    row = lambda a: jax.lax.dynamic_index_in_dim(a, me, axis=0, keepdims=False)  # noqa: E731  [E]
    return ExchangeLayout(
        go_input_offsets=row(start), go_send_sizes=row(kept), go_output_offsets=row(pos), go_recv_sizes=mine(kept),
        back_input_offsets=mine(pos), back_send_sizes=mine(kept), back_output_offsets=mine(start),
        back_recv_sizes=row(kept), local_group_sizes=jax.lax.dynamic_slice_in_dim(total, me * el, el))


# --- the exchange ---------------------------------------------------------------------------------------------------


def padded_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                             axis_name: str, num_shards: int, max_rows_per_peer: int):
    """`jax.lax.ragged_all_to_all` semantics from a dense all_to_all (for backends without the ragged op).

    The slices bound for peer j (entries j * spd ... j * spd + spd - 1, spd = len(offsets) / n) are packed into a
    chunk of `max_rows_per_peer` rows; every packed row carries the receiver-side row index it must land at
    (padding rows carry an out-of-range index and are dropped by the receiving scatter). `recv_sizes` is implied by
    the indices and unused. Rows sent to one peer must not exceed `max_rows_per_peer` (the caller's static bound).
    """
    del recv_sizes
    n, p = num_shards, max_rows_per_peer
    spd = input_offsets.shape[0] // n
    sizes = send_sizes.reshape(n, spd)
    ends = jnp.cumsum(sizes, axis=1)  # [n, spd] end of each slice within its chunk
    q = jnp.arange(p, dtype=jnp.int32)
    slot = jax.vmap(lambda e: jnp.searchsorted(e, q, side="right"))(ends)  # [n, P] slice of each chunk row
    valid = slot < spd
    slot = jnp.minimum(slot, spd - 1)
    within = q[None, :] - jnp.take_along_axis(ends - sizes, slot, axis=1)  # row index inside its slice
    src = jnp.take_along_axis(input_offsets.reshape(n, spd), slot, axis=1) + within
    dst = jnp.take_along_axis(output_offsets.reshape(n, spd), slot, axis=1) + within
    rows = jnp.take(operand, jnp.where(valid, src, 0).reshape(-1), axis=0).reshape(n, p, *operand.shape[1:])
    rows = jnp.where(valid.reshape(n, p, *(1,) * (operand.ndim - 1)), rows, 0)
    dst = jnp.where(valid, dst, output.shape[0])  # out of range: dropped
    rows = jax.lax.all_to_all(rows, axis_name, 0, 0, tiled=True)
    dst = jax.lax.all_to_all(dst, axis_name, 0, 0, tiled=True)
    return output.at[dst.reshape(-1)].set(rows.reshape(n * p, *operand.shape[1:]), mode="drop")


def _exchange(kind, operand, output, offsets, *, axis, n, max_rows_per_peer):
    if kind == "ragged":
        return jax.lax.ragged_all_to_all(operand, output, *offsets, axis_name=axis)
    return padded_ragged_all_to_all(operand, output, *offsets, axis_name=axis, num_shards=n,
                                    max_rows_per_peer=max_rows_per_peer)


# --- plan -----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Static description of the expert-parallel computation of one MoE layer on a mesh."""

    mesh: object  # Mesh or AbstractMesh
    axis: str  # mesh axis splitting the experts
    token_axes: tuple[str, ...]  # mesh axes splitting the tokens (must include `axis`)
    embed_axes: tuple[str, ...]  # mesh axes splitting the experts' embed dim (all-gathered inside)
    mlp_axes: tuple[str, ...]  # mesh axes splitting expert_mlp (partial sums, psum'd at the end)
    exchange: str  # "ragged" | "padded" | "none" (one shard, dropless: the sorted rows are already local)
    capacity_factor: float | None = None  # None: dropless
    impl: str = "auto"  # grouped-matmul backend (`ming_jax.pallas.gmm.api`)
    platform: str = "cpu"  # of the mesh devices (the compile target, which may differ from the host)

    def __post_init__(self):
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange={self.exchange!r} (known: {EXCHANGES})")
        if self.axis not in self.token_axes:
            raise sharding.ShardingError(
                f"expert parallelism over mesh axis {self.axis!r} needs the tokens split over it too (batch rule "
                f"{self.token_axes}); otherwise every expert would receive each token {self.num_shards} times")
        both = set(self.mlp_axes) & set(self.token_axes)
        if both:
            raise sharding.ShardingError(f"mesh axes {sorted(both)} split both the tokens and expert_mlp: the "
                                         "partial sums over expert_mlp would mix different tokens")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 (None: dropless)")

    @property
    def num_shards(self) -> int:
        return self.mesh.shape[self.axis]

    def buffer_rows(self, tokens: int, top_k: int, num_experts: int) -> tuple[int, int]:
        """(rows of the receive buffer, max rows one source sends to one peer) for `tokens` local tokens."""
        n = self.num_shards
        el = num_experts // n
        per_peer = tokens * min(top_k, el)
        if self.capacity_factor is None:
            return n * per_peer, per_peer
        cap = self.capacity(tokens, top_k, num_experts)
        return min(el * cap, n * per_peer), min(el * cap, per_peer)

    def capacity(self, tokens: int, top_k: int, num_experts: int) -> int | None:
        """Per-expert row capacity: factor x the group's average rows per expert (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * self.num_shards * tokens * top_k / num_experts))


def plan(num_experts: int, *, mode: str = "auto", capacity_factor: float | None = None,
         impl: str = "auto") -> ExpertParallel | None:
    """The expert-parallel plan under the active mesh (`sharding.use_mesh` / `jax.set_mesh`), or None for the
    single-device path: mode "off", no mesh, no `experts` rule, or (mode "auto") an expert axis of size 1 with no
    capacity factor. Modes "ragged" / "padded" force that exchange whenever a mesh with an experts axis is active."""
    if mode not in MODES:
        raise ValueError(f"expert_parallel={mode!r} (known: {MODES})")
    act = sharding.active()
    if mode == "off" or act is None:
        return None
    mesh, rules, concrete = act.mesh, act.rules, act.concrete
    ep_axes = rules.mesh_axes("experts")
    if not ep_axes:
        return None
    if len(ep_axes) != 1:
        raise sharding.ShardingError(f"experts rule {ep_axes}: expert parallelism uses exactly one mesh axis")
    axis = ep_axes[0]
    n = mesh.shape[axis]
    if num_experts % n:
        raise sharding.ShardingError(f"{num_experts} experts do not split over mesh axis {axis!r} of size {n}")
    platform = concrete.devices.flat[0].platform if concrete is not None else jax.default_backend()
    if mode == "auto":
        if n == 1 and capacity_factor is None:
            exchange = "none"
        else:
            exchange = "ragged" if platform in ("tpu", "gpu", "cuda", "rocm") else "padded"
    else:
        exchange = mode
    return ExpertParallel(mesh, axis, rules.mesh_axes("batch"), rules.mesh_axes("expert_embed"),
                          rules.mesh_axes("expert_mlp"), exchange, capacity_factor, impl, platform)


# --- the routed experts ---------------------------------------------------------------------------------------------


def _weight_spec(w, axes3, stacked: bool = False):
    """The shard_map spec of an expert stack: P(axes3) for a float weight; for a quantized `qwix.QArray` the same on
    its values and on its scale with the reduced / blocked axes (scale dim != weight dim) unsharded. stacked: `w` is
    the [L, E, ...] stack of all MoE layers; its layers axis is unsplit inside (each device holds every layer of its
    local experts, as the layer scan's per-layer slices imply)."""
    from jax.sharding import PartitionSpec as P

    lead = (None,) if stacked else ()
    if not quant.is_quantized(w):
        return P(*lead, *axes3)
    axes = (*lead, *axes3)
    scale = [a if s == d else None for a, s, d in zip(axes, w.scale.shape, w.qvalue.shape)]
    return quant.QArray(P(*axes), P(*scale), None, w.qtype)


def _gather_weight(w, spec, axes, axis: int):
    """all_gather a (maybe quantized) local expert stack over the FSDP `axes` along `axis` wherever its spec splits
    that dim (a quantized weight's scale is unsplit along its reduced axis)."""
    if not quant.is_quantized(w):
        return jax.lax.all_gather(w, axes, axis=axis, tiled=True)
    parts = {}
    for name, s in (("qvalue", spec.qvalue), ("scale", spec.scale)):
        a = getattr(w, name)
        split = tuple(s)[axis] if len(tuple(s)) > axis else None
        parts[name] = jax.lax.all_gather(a, axes, axis=axis, tiled=True) if split is not None else a
    return quant.QArray(parts["qvalue"], parts["scale"], None, w.qtype)


def routed_experts(x, expert_ids, weights, w_gate, w_up, w_down, ep: ExpertParallel, stacked=None):
    """x [T, D], expert_ids / weights [T, K] (global, as the router gives them), w_gate / w_up [E, D, F],
    w_down [E, F, D] (global arrays, sharded by the rules; or quantized `qwix.QArray`s of those shapes, exchanged
    and gathered as their int8 / fp8 values and scales) -> sum_k weights[t, k] * expert_k(x[t])  [T, D].

    stacked: None or (layer, w_gate_all, w_up_all, w_down_all), the [L, E, ...] stacks of all MoE layers inside the
    layer scan (`gmm.grouped_glu`'s `stacked`): they enter the shard_map with their layers axis unsplit and their
    expert dims split like the per-layer weights, so the local grouped matmuls read the local experts of layer
    `layer` in place. Not with FSDP-split expert weights (`embed_axes` of size > 1): those are all-gathered per
    layer, a new buffer anyway, so the per-layer weights are used there."""
    from jax.sharding import PartitionSpec as P

    num_experts = quant.weight_shape(w_gate)[0]
    tok = P(ep.token_axes or None)
    in_axes = (ep.axis, ep.embed_axes or None, ep.mlp_axes or None)
    out_axes = (ep.axis, ep.mlp_axes or None, ep.embed_axes or None)
    s_gate, s_up, s_down = _weight_spec(w_gate, in_axes), _weight_spec(w_up, in_axes), _weight_spec(w_down, out_axes)
    n = ep.num_shards
    t_global, k = expert_ids.shape
    splits = math.prod(ep.mesh.shape[a] for a in ep.token_axes)
    if t_global % splits or x.shape[0] != t_global:
        raise sharding.ShardingError(f"{t_global} tokens (x {x.shape}) do not split over the token mesh axes "
                                     f"{ep.token_axes} of total size {splits}")
    t_local = t_global // splits
    fsdp = math.prod(ep.mesh.shape[a] for a in ep.embed_axes) > 1  # FSDP axes of size 1 split nothing
    if fsdp:
        stacked = None
    if stacked is not None:
        layer, *stacks = stacked
        st_specs = (P(), _weight_spec(stacks[0], in_axes, True), _weight_spec(stacks[1], in_axes, True),
                    _weight_spec(stacks[2], out_axes, True))
        stacked = (jnp.asarray(layer, jnp.int32), *stacks)
    rows, per_peer = ep.buffer_rows(t_local, k, num_experts)
    capacity = ep.capacity(t_local, k, num_experts)

    def local(x, expert_ids, weights, w_gate, w_up, w_down, stacked):
        # x [t, D]; expert_ids / weights [t, K]; w_* [E_l, D / fsdp, F / tp] ([E_l, F / tp, D / fsdp] for down)
        if fsdp:  # FSDP: gather this layer's local experts in full width (transpose: reduce-scatter)
            w_gate = _gather_weight(w_gate, s_gate, ep.embed_axes, 1)
            w_up = _gather_weight(w_up, s_up, ep.embed_axes, 1)
            w_down = _gather_weight(w_down, s_down, ep.embed_axes, 2)
        plan_ = dispatch.sort_by_expert(expert_ids, num_experts)
        xs = dispatch.permute(x, plan_)  # [t*K, D] sorted by global expert
        if ep.exchange == "none":
            ys = gmm.grouped_glu(xs, plan_.group_sizes, w_gate, w_up, w_down, implementation=ep.impl,
                                 stacked=stacked)
        else:
            me = jax.lax.axis_index(ep.axis)
            counts = jax.lax.all_gather(plan_.group_sizes, ep.axis, axis=0, tiled=False)  # [n, E]
            lay = exchange_layout(counts, me, capacity)
            with jax.named_scope("dispatch_exchange"):
                recv = _exchange(ep.exchange, xs, jnp.zeros((rows, xs.shape[1]), xs.dtype),
                                 (lay.go_input_offsets, lay.go_send_sizes, lay.go_output_offsets,
                                  lay.go_recv_sizes), axis=ep.axis, n=n, max_rows_per_peer=per_peer)
            out = gmm.grouped_glu(recv, lay.local_group_sizes, w_gate, w_up, w_down, implementation=ep.impl,
                                  stacked=stacked)  # [rows, D]
            with jax.named_scope("return_exchange"):
                ys = _exchange(ep.exchange, out, jnp.zeros_like(xs),
                               (lay.back_input_offsets, lay.back_send_sizes, lay.back_output_offsets,
                                lay.back_recv_sizes), axis=ep.axis, n=n, max_rows_per_peer=per_peer)
        y = dispatch.combine(ys, plan_, weights)  # [t, D]; dropped rows are zeros
        if ep.mlp_axes:  # tensor-parallel expert_mlp: every rank holds a partial sum over its F slice
            y = jax.lax.psum(y, ep.mlp_axes)
        return y

    fn = jax.shard_map(local, mesh=ep.mesh, in_specs=(tok, tok, tok, s_gate, s_up, s_down,
                                                      None if stacked is None else st_specs),
                       out_specs=tok, check_vma=False)
    return fn(x, expert_ids, weights, w_gate, w_up, w_down, stacked)
