"""Bytes per decode step (`ming_jax.aot.decode_bytes`): the floor against an independent count from the config, the
cost analysis's single count of a loop body and its correction, and a reduced model's compiled step measured against
its floor on v5p:2x2x1 (libtpu's compiler on this CPU host, no TPU). The full-size table is
`python -m benchmarks.decode_bytes` (docs/scaling.md), minutes per case, not CI."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tpu_compile import need_libtpu

need_libtpu(module_level=True)

from ming_jax import sharding  # noqa: E402
from ming_jax.aot import compile as aot, decode_bytes as db  # noqa: E402
from ming_jax.config import LLMConfig  # noqa: E402
from ming_jax.config.runtime import Runtime  # noqa: E402

REDUCED = LLMConfig.ming_flash_omni_2(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=3,
                                      num_heads=4, num_kv_heads=2, head_dim=128, moe_intermediate_size=128,
                                      num_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
                                      pad_token_id=0, eos_token_id=1, image_patch_token=2, video_patch_token=3,
                                      image_start_token=4, video_start_token=5)
RUNTIME = Runtime.bf16(remat=True, attention="xla")
BATCH, SEQ, CHIPS = 16, 512, 4


def test_expected_and_worst_experts():
    assert db.expected_experts(256, 8, 1) == pytest.approx(8)
    assert db.expected_experts(256, 8, 10_000) == pytest.approx(256)
    assert db.worst_experts(256, 8, 4) == 32 and db.worst_experts(256, 8, 64) == 256
    # two tokens: 2K picks minus the expected overlap K * K / E
    assert db.expected_experts(256, 8, 2) == pytest.approx(16 - 64 / 256)


def _moe_layer_sizes(cfg):
    d, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    return d, f, e, cfg.num_layers - cfg.first_k_dense_replace


def test_floor_matches_an_independent_count_from_the_config():
    """ep_tp on expert=4: experts split 4 ways, every other weight replicated, the batch (and so the cache) split 4
    ways. Counted here from the config's sizes, not from the parameter tree."""
    cfg = REDUCED
    mesh = sharding.make_mesh("expert=4", aot.topology_devices("v5p:2x2x1"))
    floor = db.decode_floor(cfg, mesh, sharding.ShardingRules.preset("ep_tp"), batch=BATCH, seq=SEQ,
                            runtime=RUNTIME)
    d, f, e, lm = _moe_layer_sizes(cfg)
    bf16, f32 = 2, 4
    hd, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    attn = d * (h + 2 * kv) * hd * bf16 + h * hd * d * bf16 + 2 * hd * f32  # qkv, out, q / k norms
    norms = 2 * d * f32
    dense_layer = attn + norms + 3 * d * cfg.intermediate_size * bf16
    shared = 3 * d * f * cfg.num_shared_experts * bf16
    head = d * cfg.vocab_size * bf16
    embed_rows = BATCH * d * bf16
    experts = lm * 3 * e * d * f * bf16 / CHIPS
    kv_cache = 2 * cfg.num_layers * BATCH * kv * SEQ * hd * bf16 / CHIPS
    assert floor.experts_all == experts
    assert floor.local_experts == e // CHIPS
    assert floor.kv == kv_cache
    assert floor.parts["lm head"] == head
    assert floor.parts["embedding rows"] == embed_rows
    # The router's kernel is stored in the parameter dtype; only the text gate's [D, E] is read.
    router_kernel = floor.parts["router (text gate)"] / lm
    assert router_kernel in (d * e * bf16, d * e * f32)
    other = cfg.num_dense_layers * dense_layer + lm * (attn + norms + shared) + d * f32  # + the final norm
    biases = lm * cfg.num_routers * e * f32  # expert biases: float32, all gates (tiny)
    assert floor.parts["other dense"] == pytest.approx(other + biases, rel=0.02)
    p = 1 - (1 - cfg.num_experts_per_tok / e) ** BATCH
    assert floor.expected == pytest.approx(floor.dense + experts * p + kv_cache)
    assert floor.worst == pytest.approx(floor.dense + experts * min(1.0, BATCH * cfg.num_experts_per_tok / (e // 4))
                                        + kv_cache)


def test_cost_analysis_counts_a_loop_body_once_and_the_walk_multiplies_it():
    layers, width = 8, 1024
    devices = aot.topology_devices("v5p:2x2x1")
    one = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), P())
    w = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=one)
    x = jax.ShapeDtypeStruct((8, width), jnp.bfloat16, sharding=one)

    def scanned(w, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]

    compiled = jax.jit(scanned).lower(w, x).compile()
    cb, _ = db.compiled_bytes(compiled)
    layer_bytes = width * width * 2
    assert layer_bytes <= cb.cost_analysis < 2 * layer_bytes  # one layer's weight: the body counted once
    assert layers * layer_bytes <= cb.corrected < layers * 2 * layer_bytes  # every layer's weight once
    assert cb.walk_total == pytest.approx(layers * cb.walk_once, rel=0.05)


def test_reduced_decode_step_against_its_floor():
    """The compiled step's bytes and the ratio are computed; the grouped matmuls' declared weight operands are the
    chips' whole local expert stacks, once per MoE layer (counted here from the config)."""
    rules = "ep_tp"
    devices = aot.topology_devices("v5p:2x2x1")
    mesh = sharding.make_mesh("expert=4", devices)
    floor = db.decode_floor(REDUCED, mesh, sharding.ShardingRules.preset(rules), batch=BATCH, seq=SEQ,
                            runtime=RUNTIME)
    plan, compiled = aot.compile_step(REDUCED, "v5p:2x2x1", "expert=4", rules, "decode_step", batch=BATCH, seq=SEQ,
                                      runtime=RUNTIME, devices=devices)
    cb, ops = db.compiled_bytes(compiled)
    d, f, e, lm = _moe_layer_sizes(REDUCED)
    assert cb.gmm_stacks == lm * 3 * (e // CHIPS) * d * f * 2
    assert cb.gmm_declared >= cb.gmm_stacks  # the kernels declare their whole stacks as read
    assert cb.cost_analysis > 0 and cb.corrected > cb.cost_analysis  # the MoE layers are a scan
    ratio = cb.kernel_adjusted(floor.expected_fraction) / floor.expected
    assert math.isfinite(ratio) and ratio > 0
    assert db.breakdown(ops) and plan.fits
