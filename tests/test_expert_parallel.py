"""Expert parallelism on 8 fake CPU devices against the single-device path: the exchange layout and the padded
ragged all-to-all against a plain simulation of `jax.lax.ragged_all_to_all`'s documented semantics, the routed
experts / MoE block / a 2-layer model under meshes (ep=8), (dp=2, ep=4), (fsdp=2, ep=2, tp=2): outputs and
gradients, uniform and skewed routing, capacity-factor drops, ep=1.

Needs 8 host devices: `tests/multidevice.py` asks for them on import, and runs this file again in a subprocess when
another module started jax first (a whole-suite run).
"""

import multidevice  # first: asks for 8 host devices before jax starts
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ming_jax.models import llm as model_lib
from ming_jax.parity import numerics
from ming_jax import sharding
from ming_jax.config import LLMConfig
from ming_jax.config.runtime import Runtime
from ming_jax.moe import dispatch, expert_parallel as ep_lib
from ming_jax.pallas import gmm
from ming_jax.moe.block import MoEBlock

multi = multidevice.multi
MESHES = ["expert=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2"]
RULES = sharding.ShardingRules.preset("ep_fsdp")


test_suite_in_subprocess = multidevice.suite_in_subprocess(__file__)


# --- the ragged all-to-all, simulated -----------------------------------------------------------------------------


def simulate_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """`jax.lax.ragged_all_to_all` over n devices as its docstring states it, in numpy (lists indexed by device)."""
    n = len(operands)
    spd = len(input_offsets[0]) // n
    results = [np.array(o, copy=True) for o in outputs]
    for src in range(n):
        for i in range(len(input_offsets[src])):
            dst, size = i // spd, int(send_sizes[src][i])
            # The receiver's recv_sizes entry for (this source, this slice) must agree with what is sent.
            assert int(recv_sizes[dst][src * spd + i % spd]) == size
            lo, out = int(input_offsets[src][i]), int(output_offsets[src][i])
            results[dst][out:out + size] = operands[src][lo:lo + size]
    return results


def _kept(counts, capacity):
    if capacity is None:
        return counts
    before = np.cumsum(counts, 0) - counts
    return np.clip(capacity - before, 0, counts)


@pytest.mark.parametrize("n, e, capacity", [(4, 8, None), (4, 8, 3), (2, 6, None), (8, 16, 2), (1, 4, None)])
def test_exchange_layout_moves_every_kept_row_there_and_back(n, e, capacity):
    rng = np.random.default_rng(n * 100 + e)
    el = e // n
    counts = rng.integers(0, 5, size=(n, e))
    counts[:, 1] += 7  # one hot expert (over capacity when there is one)
    lay = [jax.tree.map(np.asarray, ep_lib.exchange_layout(jnp.asarray(counts), s, capacity)) for s in range(n)]
    kept = _kept(counts, capacity)
    rows_in = [counts[s].sum() for s in range(n)]
    buf = max(int(kept[:, j * el:(j + 1) * el].sum()) for j in range(n)) + 3
    # Row r of source s is tagged 1000 * (s + 1) + r.
    operands = [1000 * (s + 1) + np.arange(rows_in[s]) for s in range(n)]
    recv = simulate_ragged_all_to_all(operands, [np.zeros(buf, int) for _ in range(n)],
                                      *[[getattr(la, f"go_{k}") for la in lay]
                                        for k in ("input_offsets", "send_sizes", "output_offsets", "recv_sizes")])
    start = np.cumsum(counts, 1) - counts
    for j in range(n):
        expect = [operands[s][start[s, g]:start[s, g] + kept[s, g]] for g in range(j * el, (j + 1) * el)
                  for s in range(n)]
        expect = np.concatenate(expect) if expect else np.zeros(0, int)
        np.testing.assert_array_equal(recv[j][:len(expect)], expect)
        np.testing.assert_array_equal(lay[j].local_group_sizes, kept[:, j * el:(j + 1) * el].sum(0))
    back = simulate_ragged_all_to_all(recv, [np.zeros(r, int) for r in rows_in],
                                      *[[getattr(la, f"back_{k}") for la in lay]
                                        for k in ("input_offsets", "send_sizes", "output_offsets", "recv_sizes")])
    for s in range(n):
        keep = np.concatenate([np.arange(counts[s, g]) < kept[s, g] for g in range(e)])
        np.testing.assert_array_equal(back[s], np.where(keep, operands[s], 0))


def _mesh(spec, devices=None):
    return sharding.make_mesh(spec, devices)


@multi
def test_padded_ragged_all_to_all_reproduces_the_documented_example():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    arg = lambda *rows: jnp.asarray(np.array(rows, np.int32).reshape(-1))  # noqa: E731
    operand, output = arg([1, 2, 2], [3, 4, 0]), jnp.zeros(8, jnp.int32)
    offsets = [arg([0, 1], [0, 1]), arg([1, 2], [1, 1]), arg([0, 0], [1, 2]), arg([1, 1], [2, 1])]

    def f(operand, output, *offsets):
        return ep_lib.padded_ragged_all_to_all(operand, output, *offsets, axis_name="x", num_shards=2,
                                               max_rows_per_peer=2)

    out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(operand, output, *offsets)
    np.testing.assert_array_equal(np.asarray(out).reshape(2, 4), [[1, 3, 0, 0], [2, 2, 4, 0]])


@multi
@pytest.mark.parametrize("spd", [1, 3])
def test_padded_ragged_all_to_all_matches_simulation_with_gaps(spd):
    """Random slices (reads may overlap, receivers get gaps between slices) over 8 devices."""
    n, rows, width = 8, 40, 3
    rng = np.random.default_rng(spd)
    sizes = rng.integers(0, 4, size=(n, n * spd))  # [src, slice]
    in_off = rng.integers(0, rows - 4, size=(n, n * spd))
    out_off = np.zeros_like(sizes)
    recv = np.zeros_like(sizes)
    for dst in range(n):  # lay out every slice arriving at dst with random gaps
        pos = 0
        for src in range(n):
            for k in range(spd):
                i = dst * spd + k
                pos += int(rng.integers(0, 3))
                out_off[src, i] = pos
                recv[dst, src * spd + k] = sizes[src, i]
                pos += sizes[src, i]
    out_rows = int(max(out_off.max() + sizes.max(), 1)) + 2
    operands = rng.normal(size=(n, rows, width)).astype(np.float32)
    outputs = np.full((n, out_rows, width), -1.0, np.float32)
    expect = simulate_ragged_all_to_all(list(operands), list(outputs), in_off, sizes, out_off, recv)
    per_peer = int(sizes.reshape(n, n, spd).sum(-1).max())
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))

    def f(operand, output, *offs):
        offs = [o.reshape(-1) for o in offs]
        return ep_lib.padded_ragged_all_to_all(operand[0], output[0], *offs, axis_name="x", num_shards=n,
                                               max_rows_per_peer=per_peer)[None]

    got = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))(
        operands, outputs, *(jnp.asarray(a, jnp.int32) for a in (in_off, sizes, out_off, recv)))
    np.testing.assert_array_equal(np.asarray(got), np.stack(expect))


# --- routed experts, MoE block, model -----------------------------------------------------------------------------


def _plain_routed(x, ids, w, wg, wu, wd):
    plan = dispatch.sort_by_expert(ids, wg.shape[0])
    ys = gmm.grouped_glu(dispatch.permute(x, plan), plan.group_sizes, wg, wu, wd, implementation="xla")
    return dispatch.combine(ys, plan, w)


def _routing(rng, t, e, k, skew: bool):
    """Distinct experts per token; skewed: every token picks expert 3 and 90% of them only from experts 0..k."""
    ids = np.stack([rng.permutation(e)[:k] for _ in range(t)])
    if skew:
        for row in range(t):
            pool = np.arange(k + 1) if rng.random() < 0.9 else np.arange(e)
            ids[row] = np.concatenate([[3], rng.permutation(pool[pool != 3])[:k - 1]])
    w = rng.uniform(0.1, 1.0, size=(t, k)).astype(np.float32)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(w)


def _grads_close(name, got, ref):
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                 jax.tree_util.tree_flatten_with_path(ref)[0]):
        numerics.assert_close(f"{name}{jax.tree_util.keystr(path)}", a, b)


@multi
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_routed_experts_match_single_device_uniform_and_skewed(mesh_spec):
    rng = np.random.default_rng(7)
    t, d, f, e, k = 64, 32, 16, 16, 4
    x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    ws = [jnp.asarray(rng.normal(size=s).astype(np.float32) / np.sqrt(s[1])) for s in ((e, d, f), (e, d, f),
                                                                                     (e, f, d))]
    ct = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    loss = lambda fn: lambda x, ids, w, *ws: jnp.sum(fn(x, ids, w, *ws) * ct)  # noqa: E731
    plain = jax.jit(jax.value_and_grad(loss(_plain_routed), argnums=(0, 2, 3, 4, 5)))
    # References on one device, outside the mesh: eager ops under a mesh context run on every device of it.
    cases = []
    for skew in (False, True):
        ids, w = _routing(rng, t, e, k, skew)
        cases.append((skew, ids, w, jax.jit(_plain_routed)(x, ids, w, *ws), plain(x, ids, w, *ws)[1]))
    mesh = _mesh(mesh_spec)
    with sharding.use_mesh(mesh, RULES):
        plan = ep_lib.plan(e, impl="xla")
        assert plan is not None and plan.exchange == "padded" and plan.num_shards == mesh.shape["expert"]
        routed = lambda x, ids, w, *ws: ep_lib.routed_experts(x, ids, w, *ws, plan)  # noqa: E731
        fwd = jax.jit(routed)
        grad = jax.jit(jax.grad(loss(routed), argnums=(0, 2, 3, 4, 5)))
        got = [(fwd(x, ids, w, *ws), grad(x, ids, w, *ws)) for _, ids, w, _, _ in cases]
    for (skew, _, _, yref, gref), (y, g) in zip(cases, got):
        numerics.assert_close(f"routed_y(skew={skew})", y, yref)
        _grads_close(f"routed_grad(skew={skew})", g, gref)


def _block_fn(graphdef):
    def f(state, x, modality):
        y, _, _ = nnx.merge(graphdef, state)(x, modality)
        return y

    return f


@multi
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_moe_block_matches_single_device_with_one_exchange(mesh_spec):
    cfg = LLMConfig.tiny()
    block = MoEBlock(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 16, cfg.hidden_size)).astype(np.float32))
    modality = jnp.asarray(rng.integers(0, 3, size=(8, 16)), jnp.int32)
    ct = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    graphdef, state = nnx.split(block)
    f = _block_fn(graphdef)
    loss = lambda s, x: jnp.sum(f(s, x, modality) * ct)  # noqa: E731
    ref, gref = jax.jit(f)(state, x, modality), jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    mesh = _mesh(mesh_spec)
    st = jax.device_put(state, sharding.state_shardings(block, mesh, RULES))
    xs = sharding.shard_inputs(x, mesh, RULES)
    with sharding.use_mesh(mesh, RULES):
        hlo = jax.jit(f).lower(st, xs, modality).as_text()
        y = jax.jit(f)(st, xs, modality)
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))(st, xs)
    assert hlo.count("all_to_all") == 4, "one shard_map: rows and their row indices, there and back"
    numerics.assert_close("moe_block_y", y, ref)
    _grads_close("moe_block_grad", g, gref)


@multi
def test_expert_parallel_off_keeps_the_single_device_path():
    cfg = LLMConfig.tiny()
    block = MoEBlock(cfg, Runtime(expert_parallel="off"), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(block)
    x = jnp.ones((8, 4, cfg.hidden_size))
    mesh = _mesh("expert=8")
    with sharding.use_mesh(mesh, RULES):
        hlo = jax.jit(_block_fn(graphdef)).lower(state, x, None).as_text()
    assert "all_to_all" not in hlo and "shard_map" not in hlo


def _model_loss(graphdef, ct):
    def loss(state, ids, pos):
        m = nnx.merge(graphdef, state)
        out = m(m.embed_tokens(ids), pos)
        return jnp.sum(out.logits * ct), out.logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@multi
@pytest.mark.parametrize("mesh_spec", MESHES)
def test_two_layer_model_matches_single_device_uniform_and_skewed(mesh_spec):
    cfg = LLMConfig.tiny(num_layers=2)
    model = model_lib.create(cfg, seed=3)
    b, t = 8, 16
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t)[None, None], (3, b, t))
    ct = jnp.asarray(rng.normal(size=(b, t, cfg.vocab_size)).astype(np.float32))
    graphdef, state = nnx.split(model)
    # Skewed: the expert bias steers selection only; every token of every gate picks experts 0..3 (one group).
    bias = np.zeros(model.moe_layers.moe.router.expert_bias[...].shape, np.float32)
    bias[..., :4] = 10.0
    skewed = jax.tree.map(lambda a: a, state)
    skewed["moe_layers"]["moe"]["router"]["expert_bias"][...] = jnp.asarray(bias)
    f = _model_loss(graphdef, ct)
    mesh = _mesh(mesh_spec)
    shardings = sharding.state_shardings(model, mesh, RULES)
    for name, st in (("uniform", state), ("skewed", skewed)):
        (_, ref), gref = f(st, ids, pos)
        with sharding.use_mesh(mesh, RULES):
            (_, logits), g = f(jax.device_put(st, shardings), sharding.shard_inputs(ids, mesh, RULES),
                               sharding.shard_inputs(pos, mesh, RULES, batch_dim=1))
        numerics.assert_close(f"logits({name})", logits, ref)
        _grads_close(f"model_grad({name})", g, gref)


@multi
@pytest.mark.parametrize("mesh_spec, groups", [("expert=8", 1), ("data=2,expert=4", 2)])
def test_capacity_factor_drops_each_experts_rows_past_capacity_in_token_order(mesh_spec, groups):
    rng = np.random.default_rng(3)
    t, d, f, e, k, factor = 64, 16, 8, 16, 4, 1.0
    x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    ids, w = _routing(rng, t, e, k, skew=True)
    ws = [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((e, d, f), (e, d, f), (e, f, d))]
    # Reference: within each expert-parallel group (a contiguous block of tokens), expert g keeps its first
    # `cap` (token, slot) pairs in token order; dropped pairs contribute nothing.
    cap = int(np.ceil(factor * (t // groups) * k / e))
    keep = np.zeros((t, k), bool)
    for grp in np.split(np.arange(t), groups):
        seen = np.zeros(e, int)
        for row in grp:
            for slot in range(k):
                g = int(ids[row, slot])
                keep[row, slot] = seen[g] < cap
                seen[g] += 1
    assert (~keep).sum() > t // 4, "the skewed routing must overflow capacity"
    ref = _plain_routed(x, ids, w * keep, *ws)
    with sharding.use_mesh(_mesh(mesh_spec), RULES):
        plan = ep_lib.plan(e, capacity_factor=factor, impl="xla")
        y = jax.jit(lambda *a: ep_lib.routed_experts(*a, plan))(x, ids, w, *ws)
        # A factor no routing can exceed is the dropless result.
        big = ep_lib.plan(e, capacity_factor=float(e), impl="xla")
        y_big = jax.jit(lambda *a: ep_lib.routed_experts(*a, big))(x, ids, w, *ws)
    numerics.assert_close("capacity_y", y, ref)
    numerics.assert_close("capacity_big_y", y_big, _plain_routed(x, ids, w, *ws))


@multi
def test_ep1_auto_skips_the_exchange_and_forced_padded_matches():
    rng = np.random.default_rng(5)
    t, d, f, e, k = 32, 16, 8, 8, 2
    x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    ids, w = _routing(rng, t, e, k, skew=True)
    ws = [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((e, d, f), (e, d, f), (e, f, d))]
    ref = _plain_routed(x, ids, w, *ws)
    with sharding.use_mesh(_mesh("fsdp=1", jax.devices()[:1]), RULES):
        auto = ep_lib.plan(e, impl="xla")
        forced = ep_lib.plan(e, mode="padded", impl="xla")
        assert auto.exchange == "none" and forced.exchange == "padded"
        for p in (auto, forced):
            numerics.assert_close(f"ep1_{p.exchange}", jax.jit(lambda *a: ep_lib.routed_experts(*a, p))(x, ids, w, *ws),
                                  ref)


@multi
def test_plan_is_none_without_mesh_and_rejects_bad_layouts():
    assert ep_lib.plan(16) is None
    mesh = _mesh("expert=8")
    with sharding.use_mesh(mesh, RULES):
        with pytest.raises(sharding.ShardingError, match="do not split"):
            ep_lib.plan(12)
        with pytest.raises(ValueError, match="expert_parallel="):
            ep_lib.plan(16, mode="sideways")
        assert ep_lib.plan(16, mode="off") is None
    with sharding.use_mesh(mesh, RULES.replace(batch=("data", "fsdp"))):
        with pytest.raises(sharding.ShardingError, match="tokens split over it"):
            ep_lib.plan(16)
    with sharding.use_mesh(_mesh("expert=4,tensor=2"), RULES.replace(batch=("expert", "tensor"))):
        with pytest.raises(sharding.ShardingError, match="partial sums"):
            ep_lib.plan(16)
    with sharding.use_mesh(mesh, RULES):
        plan = ep_lib.plan(16)
        with pytest.raises(sharding.ShardingError, match="do not split over the token mesh axes"):
            ep_lib.routed_experts(jnp.ones((12, 4)), jnp.zeros((12, 2), jnp.int32), jnp.ones((12, 2)),
                                  jnp.ones((16, 4, 2)), jnp.ones((16, 4, 2)), jnp.ones((16, 2, 4)), plan)


@multi
@pytest.mark.parametrize("impl,quantized", [("portable", False), ("pallas", False), ("pallas", True)])
def test_routed_experts_read_the_stacks_in_place(impl, quantized):
    """`stacked=` (the [L, E, ...] stacks and the layer, as the layer scan gives them): the local grouped matmuls
    read layer `layer` of the local stacks in place (the stacks enter the shard_map with an unsplit layers axis).
    Same values and gradients as the per-layer weights; quantized (Pallas) too."""
    from ming_jax.pallas.gmm import quant

    rng = np.random.default_rng(3)
    n_layers, t, d, f, e, k, layer = 3, 16, 32, 16, 8, 2, 1
    x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    stacks = [jnp.asarray(rng.normal(size=(n_layers, *s)).astype(np.float32) / np.sqrt(s[1]))
              for s in ((e, d, f), (e, d, f), (e, f, d))]
    if quantized:
        stacks = [quant.quantize(s, "int8", (2,)) for s in stacks]
    ws = [jax.tree.map(lambda a: a[layer], s) for s in stacks]
    ids, w = _routing(rng, t, e, k, False)
    with sharding.use_mesh(_mesh("data=2,expert=4"), RULES):
        plan = ep_lib.plan(e, impl=impl)
        assert plan is not None and all(plan.mesh.shape[a] == 1 for a in plan.embed_axes)

        def run(in_place):
            def f(x, ws, stacks):
                return ep_lib.routed_experts(x, ids, w, *ws, plan,
                                             stacked=(jnp.int32(layer), *stacks) if in_place else None)

            loss = lambda x, ws, stacks: jnp.sum(f(x, ws, stacks) ** 2)  # noqa: E731
            argnums = 0 if quantized else (0, 1)
            if in_place and impl == "pallas":  # the kernels that index the stacks are the ones that run
                assert "_stacked" in str(jax.make_jaxpr(f)(x, ws, stacks))
            return jax.jit(f)(x, ws, stacks), jax.jit(jax.grad(loss, argnums=argnums))(x, ws, stacks)

        (y, g), (y_ref, g_ref) = run(True), run(False)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
