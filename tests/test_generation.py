"""Generation: padded batches equal one-by-one runs (left and right padding, text and multimodal), the KV-cache
decode equals a full forward, sampling filters, stop tokens, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ming_jax.gen import steps
from ming_jax.gen import text as generation
from ming_jax.models import llm as model_lib, inputs as multimodal
from ming_jax.parity import numerics
from ming_jax.config import LLMConfig

CFG = LLMConfig.tiny(num_layers=3, first_k_dense_replace=1)
PROMPTS = [[5, 17, 300, 41, 8, 9, 77], [11, 12], [400, 2, 3, 99]]


@pytest.fixture(scope="module")
def model():
    return model_lib.create(CFG, seed=7)


def _single(model, ids, n):
    prep = multimodal.prepare(CFG, np.asarray([ids]))
    g = generation.generate(model, prep, generation.SamplingConfig(max_new_tokens=n), return_logits=True)
    return generation.as_numpy(g)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_one_by_one(model, side):
    n = 5
    ids, mask = generation.pad_prompts(PROMPTS, side=side, pad_id=CFG.pad_token_id)
    batch = generation.as_numpy(generation.generate(model, multimodal.prepare(CFG, ids, mask),
                                                    generation.SamplingConfig(max_new_tokens=n), return_logits=True))
    for i, p in enumerate(PROMPTS):
        one = _single(model, p, n)
        np.testing.assert_array_equal(batch.tokens[i], one.tokens[0])
        numerics.assert_close(f"step_logits[{i}]", batch.step_logits[i], one.step_logits[0])
    # Full forward of padded prompts: each row's real-token logits equal the unpadded forward.
    _, out = generation.forward(model, multimodal.prepare(CFG, ids, mask))
    for i, p in enumerate(PROMPTS):
        _, single = generation.forward(model, multimodal.prepare(CFG, np.asarray([p])))
        numerics.assert_close(f"logits[{i}]", np.asarray(out.logits)[i][mask[i]], np.asarray(single.logits)[0])


def test_kv_cache_decode_equals_full_forward(model):
    n = 6
    g = _single(model, PROMPTS[0], n)
    full = np.asarray(PROMPTS[0] + g.tokens[0, :-1].tolist())[None]
    _, out = generation.forward(model, multimodal.prepare(CFG, full))
    want = np.asarray(out.logits)[0, len(PROMPTS[0]) - 1:]
    numerics.assert_close("step_logits_vs_forward", g.step_logits[0], want)


def _prompt_inputs(side):
    ids, mask = generation.pad_prompts(PROMPTS, side=side, pad_id=CFG.pad_token_id)
    prep = multimodal.prepare(CFG, ids, mask)
    return prep, jnp.asarray(mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_prefill_mode_equals_the_dense_cache_path(model, side):
    """prefill=True (T tokens attend to each other with the causal + segment mask: what splash / cuDNN take) gives
    the logits and cache of the general cache path (dense mask over the cache), and starts a used cache over."""
    prep, mask = _prompt_inputs(side)
    b, t = mask.shape
    x = model.embed_tokens(jnp.asarray(prep.input_ids))
    pos = jnp.asarray(prep.positions)
    last = steps.last_real_index(mask)
    fresh = model_lib.KVCache.create(CFG, b, 16)
    rng = np.random.default_rng(1)
    used = model_lib.KVCache(*(jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in
                               (fresh.k_dense, fresh.v_dense, fresh.k_moe, fresh.v_moe)),
                             jnp.asarray(rng.random(fresh.valid.shape) < 0.5), jnp.int32(5))
    want = model(x, pos, attention_mask=mask, cache=fresh, logits_at=last)
    for name, cache in (("fresh", fresh), ("used", used)):
        got = model(x, pos, attention_mask=mask, cache=cache, logits_at=last, prefill=True)
        numerics.assert_close(f"{name}: logits", got.logits, want.logits)
        np.testing.assert_array_equal(got.cache.valid, want.cache.valid)
        assert int(got.cache.length) == t
        for field in ("k_dense", "v_dense", "k_moe", "v_moe"):  # the written slots of real tokens
            g, w = (np.asarray(getattr(c.cache, field)).swapaxes(2, 3) for c in (got, want))  # [L, B, S, K, hd]
            numerics.assert_close(f"{name}: {field}", g[:, np.asarray(want.cache.valid)],
                                  w[:, np.asarray(want.cache.valid)])


def test_decode_step_updates_the_cache_in_place():
    """The layer scan carries the stacked cache and writes one slot per layer: XLA's plan for a decode step holds
    no second copy of the cache (with each layer's cache slice a scanned output it held 1.26x the cache in
    temporaries; now at most the one layer being read)."""
    from ming_jax.aot import compile as aot
    from flax import nnx

    cfg = LLMConfig.tiny(num_layers=4, first_k_dense_replace=1)
    graphdef, state = nnx.split(model_lib.create_abstract(cfg))
    cache = jax.eval_shape(lambda: model_lib.KVCache.create(cfg, 8, 2048))
    tok = jax.ShapeDtypeStruct((8,), jnp.int32)
    compiled = jax.jit(aot.make_decode_step(graphdef), donate_argnums=(1,)).lower(state, cache, tok, tok).compile()
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    mem = compiled.memory_analysis()
    one_layer = cache_bytes / cfg.num_layers  # the layer being read may be copied once; the old scan copied them all
    assert mem.temp_size_in_bytes < 2 * one_layer, (mem.temp_size_in_bytes, cache_bytes)
    assert mem.alias_size_in_bytes >= cache_bytes - 4096  # the output cache is the donated input


def _mm_inputs(rng, d):
    """A prompt with an image (grid 1x4x4 -> 4 tokens), an audio span and text, and its features."""
    c = CFG
    ids = [1, 2, c.image_start_token] + [c.image_patch_token] * 4 + [994, 5, 6] + [997] * 5 + [7, 8]
    mm = multimodal.MultimodalInputs(
        image_embeds=rng.normal(size=(4, d)).astype(np.float32), image_grid_thw=np.asarray([[1, 4, 4]]),
        audio_embeds=rng.normal(size=(1, 5, d)).astype(np.float32), audio_lengths=np.asarray([[5]]),
        audio_spans=np.asarray([[[10, 5]]]))
    return ids, mm


@pytest.mark.parametrize("side", ["left", "right"])
def test_multimodal_batch_with_text_row_equals_one_by_one(model, side):
    rng = np.random.default_rng(0)
    ids, mm = _mm_inputs(rng, CFG.hidden_size)
    text = [9, 10, 11]
    batch_ids, mask = generation.pad_prompts([ids, text], side=side, pad_id=CFG.pad_token_id)
    shift = 0 if side == "right" else batch_ids.shape[1] - len(ids)
    mm_b = multimodal.MultimodalInputs(
        image_embeds=mm.image_embeds, image_grid_thw=mm.image_grid_thw,
        audio_embeds=np.concatenate([mm.audio_embeds, np.zeros_like(mm.audio_embeds)]),
        audio_lengths=np.asarray([[5], [0]]), audio_spans=np.asarray([[[10 + shift, 5]], [[0, 0]]]))
    prep_b = multimodal.prepare(CFG, batch_ids, mask, mm_b)
    prep_1 = multimodal.prepare(CFG, np.asarray([ids]), mm=mm)
    np.testing.assert_array_equal(prep_b.positions[:, 0][:, mask[0]], prep_1.positions[:, 0])
    sampling = generation.SamplingConfig(max_new_tokens=4)
    gb = generation.as_numpy(generation.generate(model, prep_b, sampling, return_logits=True))
    g1 = generation.as_numpy(generation.generate(model, prep_1, sampling, return_logits=True))
    gt = _single(model, text, 4)
    np.testing.assert_array_equal(gb.tokens[0], g1.tokens[0])
    np.testing.assert_array_equal(gb.tokens[1], gt.tokens[0])
    numerics.assert_close("mm_row_logits", gb.step_logits[0], g1.step_logits[0])
    numerics.assert_close("text_row_logits", gb.step_logits[1], gt.step_logits[0])


def test_stop_tokens_end_rows(model):
    free = _single(model, PROMPTS[0], 6).tokens[0]
    stop = int(free[2])
    prep = multimodal.prepare(CFG, np.asarray([PROMPTS[0]]))
    g = generation.as_numpy(generation.generate(
        model, prep, generation.SamplingConfig(max_new_tokens=6, stop_tokens=(stop,)), pad_id=0))
    first = int(np.argmax(free == stop))
    assert g.lengths[0] == first + 1
    np.testing.assert_array_equal(g.tokens[0, :first + 1], free[:first + 1])
    assert (g.tokens[0, first + 1:] == 0).all()


def test_sampling_filters():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 50)).astype(np.float32))
    greedy = generation.sample(logits, None, generation.SamplingConfig())
    key = jax.random.key(0)
    for cfg in (generation.SamplingConfig(temperature=1.0, top_k=1), generation.SamplingConfig(temperature=2.0,
                                                                                              top_p=1e-6)):
        np.testing.assert_array_equal(generation.sample(logits, key, cfg), greedy)
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    for s in range(20):
        tok = np.asarray(generation.sample(logits, jax.random.key(s), generation.SamplingConfig(temperature=1.5,
                                                                                                  top_k=5)))
        assert all(tok[i] in top5[i] for i in range(4))
    # top_p keeps the smallest set of best tokens whose mass reaches p.
    probs = np.asarray(jax.nn.softmax(logits, -1))
    order = np.argsort(-probs, -1)
    for s in range(20):
        tok = np.asarray(generation.sample(logits, jax.random.key(s), generation.SamplingConfig(temperature=1.0,
                                                                                                  top_p=0.5)))
        for i in range(4):
            csum = np.cumsum(probs[i, order[i]])
            keep = order[i, : int(np.searchsorted(csum, 0.5) + 1)]
            assert tok[i] in keep


def _lowered_decode(model, n: int) -> str:
    from flax import nnx

    from ming_jax.layers.kv_cache import KVCache

    graphdef, state = nnx.split(model)
    cache = KVCache.create(CFG, 1, 16 + n)
    return generation._decode.lower(graphdef, state, jnp.zeros((1, CFG.vocab_size)), jnp.asarray([2]), cache,
                                    jax.random.key(0), sampling=generation.SamplingConfig(max_new_tokens=n),
                                    pad_id=0, return_logits=False).as_text()


def test_decode_is_one_while_loop_whatever_the_length(model):
    """No Python loop per token: the program has as many while loops for 2 new tokens as for 9 (the layer scans add
    their own), exactly one of them carries the [B, N] token buffer, and the KV cache is donated."""
    texts = {n: _lowered_decode(model, n) for n in (2, 9)}
    counts = {n: t.count("stablehlo.while") for n, t in texts.items()}
    assert counts[2] == counts[9] >= 1, counts
    for n, text in texts.items():
        loops = [line for line in text.splitlines() if "stablehlo.while" in line]
        carrying = [line for line in loops if f"tensor<1x{n}xi32>" in line]
        assert len(carrying) == 1, (n, len(carrying), len(loops))
        k, hd = CFG.num_kv_heads, CFG.head_dim
        stack = f"tensor<{CFG.num_moe_layers}x1x{k}x{16 + n}x{hd}xf32>"
        main = next(line for line in text.splitlines() if "func.func public @main" in line)
        args = main.split(") -> (")[0]  # the arguments only: the last one's text must not run into the results
        donated = [arg for arg in args.split("%arg")[1:] if stack in arg and
                   ("tf.aliasing_output" in arg or "jax.buffer_donor" in arg)]
        assert len(donated) == 2, f"the MoE k / v cache stacks must be donated: {main[:400]}"


def test_stop_token_equal_to_pad_id_still_ends_the_row(model):
    """A stop token that is also the pad id: the row's length is where it stopped, not max_new_tokens."""
    free = _single(model, PROMPTS[0], 6).tokens[0]
    stop = int(free[1])
    prep = multimodal.prepare(CFG, np.asarray([PROMPTS[0]]))
    g = generation.as_numpy(generation.generate(
        model, prep, generation.SamplingConfig(max_new_tokens=6, stop_tokens=(stop,)), pad_id=stop))
    first = int(np.argmax(free == stop))
    assert g.lengths[0] == first + 1 < 6
    np.testing.assert_array_equal(g.tokens[0, :first + 1], free[:first + 1])


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match=r"token id 1000 .*outside the vocabulary"):
        multimodal.prepare(CFG, np.asarray([[1, 1000]]))
    rng = np.random.default_rng(0)
    ids, mm = _mm_inputs(rng, CFG.hidden_size)
    with pytest.raises(ValueError, match="image features and image placeholder tokens do not match"):
        multimodal.prepare(CFG, np.asarray([ids]), mm=multimodal.MultimodalInputs(
            image_embeds=mm.image_embeds[:3], image_grid_thw=mm.image_grid_thw))
    with pytest.raises(ValueError, match="needs 9 consecutive patch tokens"):
        multimodal.prepare(CFG, np.asarray([ids]), mm=multimodal.MultimodalInputs(
            image_embeds=mm.image_embeds, image_grid_thw=np.asarray([[1, 6, 6]])))
    with pytest.raises(ValueError, match="outside the sequence"):
        multimodal.prepare(CFG, np.asarray([ids]), mm=multimodal.MultimodalInputs(
            audio_embeds=mm.audio_embeds, audio_lengths=mm.audio_lengths, audio_spans=np.asarray([[[15, 5]]])))
    with pytest.raises(ValueError, match="exceed the context"):
        generation.generate(model, multimodal.prepare(CFG, np.asarray([[1, 2]])),
                            generation.SamplingConfig(max_new_tokens=CFG.max_position_embeddings))
    with pytest.raises(ValueError, match="padding side"):
        generation.pad_prompts([[1]], side="middle")


@pytest.mark.slow
def test_bf16_batch_decodes_on_cpu_and_rows_match_one_by_one():
    """bfloat16 generation with several rows (it used to fail on XLA:CPU inside the decode loop: "Unsupported element
    type for DotThunk::Execute: BF16 x BF16 = F32" in the attention's probabilities x values product). Each row's
    tokens and decode logits match the same row run alone, by the bf16 bar, over the steps before a near-tie."""
    from ming_jax.config.runtime import Runtime

    bf16 = model_lib.create(CFG, Runtime.bf16(), seed=7)
    n = 4
    ids, mask = generation.pad_prompts(PROMPTS, side="left", pad_id=CFG.pad_token_id)
    batch = generation.as_numpy(generation.generate(bf16, multimodal.prepare(CFG, ids, mask),
                                                    generation.SamplingConfig(max_new_tokens=n), return_logits=True))
    assert batch.step_logits.dtype == np.float32 and np.isfinite(batch.step_logits).all()
    for i, p in enumerate(PROMPTS):
        one = _single(bf16, p, n)
        same = int(numerics.tie_free_prefix(one.step_logits, 0.05)[0])
        np.testing.assert_array_equal(batch.tokens[i, :same], one.tokens[0, :same])
        upto = max(same, 1)  # logits of step s follow tokens < s, equal in both runs up to `same`
        c = numerics.compare_model_bf16("step_logits", batch.step_logits[i, :upto], one.step_logits[0, :upto])
        assert c.ok, c.row()
