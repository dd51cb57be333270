"""The CPU decode loop reads the MoE layers' per-layer weights sliced once before the loop (`steps.decode_loop`,
`BailingMoeV2.preslice_moe_layers`), and computes what the layer scan computes."""

import collections
import re

import jax
import numpy as np
import pytest
from flax import nnx

from ming_jax.config.llm import LLMConfig
from ming_jax.gen import serving, steps
from ming_jax.gen import text as generation
from ming_jax.models import inputs as multimodal
from ming_jax.models import llm

CFG = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3, first_k_dense_replace=1,
                num_heads=4, num_kv_heads=2, head_dim=32, moe_intermediate_size=32, num_experts=8,
                num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=256,
                pad_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def model():
    return llm.create(CFG, seed=3, host=True)


@pytest.fixture
def scan_only(monkeypatch):
    """Call to make the decode loops use the layer scan on CPU too. The jitted programs are cached by their static
    arguments, not by this switch: the caches are cleared when it flips, and again afterwards, so that no program
    compiled either way is reused the other way (here or by later tests)."""

    def switch():
        jax.clear_caches()
        monkeypatch.setattr(steps, "decode_loop", lambda graphdef, state, run: run(None))

    yield switch
    monkeypatch.undo()
    jax.clear_caches()


def _layer_weight_shapes(model):
    """Per-layer shapes ([1, ...]) of the stacked MoE layers' weight matrices other than the routed experts."""
    _, params, _ = nnx.split(model.moe_layers, nnx.Param, ...)
    return {(1, *a.shape[1:]) for path, a in jax.tree_util.tree_flatten_with_path(params)[0]
            if a.ndim >= 3 and not llm._is_routed_expert(path)}


def _slice_shapes(model, op="dynamic-slice"):
    prep = multimodal.prepare(CFG, np.arange(5, 13)[None])
    sampling = generation.SamplingConfig(max_new_tokens=4)
    graphdef, state, logits, cache, next_pos, pad_id = generation._prefilled(model, prep, sampling, None, 64, None)
    hlo = generation._decode.lower(graphdef, state, logits, next_pos, cache, jax.random.key(0), None, None,
                                   sampling=sampling, pad_id=pad_id, return_logits=False).compile().as_text()
    found = collections.Counter()
    for line in hlo.splitlines():
        m = re.search(r"= f32\[([\d,]*)\]\{[\d,]*\} " + op + r"\(", line)
        if m:
            found[tuple(int(d) for d in m.group(1).split(","))] += 1
    return found


def test_the_cpu_decode_program_slices_no_layer_weight_inside_the_loop(model, scan_only):
    layer_shapes = _layer_weight_shapes(model)
    assert layer_shapes  # attention, router and shared-expert matrices
    assert not layer_shapes & set(_slice_shapes(model))
    # The routed experts are read from their stacks in place: no layer's whole expert stack is ever sliced.
    e, d, f = CFG.num_experts, CFG.hidden_size, CFG.moe_intermediate_size
    assert not {(1, e, d, f), (1, e, f, d)} & (set(_slice_shapes(model)) | set(_slice_shapes(model, "slice")))
    scan_only()  # the layer scan: XLA:CPU copies each layer's weights out of the stacks every step
    assert layer_shapes & set(_slice_shapes(model))


def test_presliced_decode_computes_what_the_layer_scan_computes(model, scan_only):
    ids = np.random.default_rng(0).integers(2, CFG.vocab_size, (3, 11))
    sampling = generation.SamplingConfig(max_new_tokens=6)
    prep = multimodal.prepare(CFG, ids)
    fast = generation.generate(model, prep, sampling, return_logits=True)
    scan_only()
    ref = generation.generate(model, prep, sampling, return_logits=True)
    np.testing.assert_array_equal(np.asarray(fast.tokens), np.asarray(ref.tokens))
    ref_logits = np.asarray(ref.step_logits)
    err = np.abs(np.asarray(fast.step_logits) - ref_logits).max()
    assert err <= 1e-4 * np.abs(ref_logits).max(), err


def test_continuous_batching_decodes_the_same_with_either_layout(model, scan_only):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]

    def answers():
        engine = serving.ContinuousEngine(model, slots=2, max_len=64, chunk=4, bucket=8, stop_tokens=[])
        done = engine.run([serving.Request(str(i), p, max_tokens=5) for i, p in enumerate(prompts)])
        return {r.id: list(r.tokens) for r in done}

    fast = answers()
    scan_only()
    assert answers() == fast


def test_no_preslicing_without_moe_layers():
    dense = llm.create(CFG.replace(num_layers=1, first_k_dense_replace=1), seed=0, host=True)
    assert not dense.can_preslice() and dense.preslice_moe_layers() is None
