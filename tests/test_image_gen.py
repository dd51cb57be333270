"""Image generation around the DiT and the VAE: the condition path (query tokens through the thinker, the Qwen2
connector, the caption wrapper), the flow-matching schedule, the jitted sampler, and the chained prompt -> image
run. Golden cases `image_condition` / `image_sampler`; `transformers` Qwen2 and `diffusers`' scheduler as
independent references at other sizes."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from ming_jax.config.image_gen import FlowMatchConfig, ImageGenConfig, ImageGenHeadConfig
from ming_jax.config.base import ConfigError
from ming_jax.config.llm import LLMConfig
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.gen import flow_match, image as image_gen
from ming_jax.models import llm as llm_lib
from ming_jax.models.image_gen.condition import ClipMLP, ImageGenHead, append_query_block, wrap_caption
from ming_jax.models.image_gen.dit import ZImageDiT
from ming_jax.models.image_gen.vae import AutoencoderKL
from ming_jax.models.qwen2 import Qwen2Model
from ming_jax.parity import numerics, run as parity
from ming_jax.weights.image_gen import clip_mlp_table
from ming_jax.weights.qwen2 import qwen2_table
from ming_jax.weights.table import WeightError, export_state_dict, load_state_dict


def _torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return torch


# --- golden parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image_condition", "image_sampler"])
def test_golden(golden_dir, kind):
    rows = parity.run_case(str(golden_dir / kind))
    bad = [r.row() for r in rows if not r.ok]
    assert not bad, "\n".join(bad)
    assert len(rows) >= 13


# --- the connector: Qwen2 against transformers ---------------------------------------------------------------------


def _hf_qwen2(torch, cfg: Qwen2Config):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_official().items()
                                         if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or skipped tensor shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("layernorm.weight") or "norm" in name
                        else 0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("causal", [False, True])
def test_connector_against_transformers(causal):
    torch = _torch()
    cfg = Qwen2Config(vocab_size=24, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, rope_theta=1e4)
    hf = _hf_qwen2(torch, cfg)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = load_state_dict(nnx.eval_shape(lambda: Qwen2Model(cfg, rngs=nnx.Rngs(0))), qwen2_table(cfg), state)
    x = torch.randn(2, 11, cfg.hidden_size)
    if not causal:  # the release's connector: every layer non-causal, an all-ones 4-D mask
        for layer in hf.model.layers:
            layer.self_attn.is_causal = False
        mask = torch.zeros(2, 1, 11, 11)
    else:
        mask = None
    with torch.no_grad():
        want = hf.model(inputs_embeds=x, attention_mask=mask).last_hidden_state.numpy()
    got = ours(jnp.asarray(x.numpy()), causal=causal)
    numerics.assert_close("qwen2", got, want)


def test_connector_table_round_trip_and_tied_head():
    torch = _torch()
    cfg = Qwen2Config.tiny()
    state = {k: v.detach().numpy().copy() for k, v in _hf_qwen2(torch, cfg).state_dict().items()}
    table = qwen2_table(cfg)
    model = load_state_dict(nnx.eval_shape(lambda: Qwen2Model(cfg, rngs=nnx.Rngs(0))), table, state)
    back = export_state_dict(model, table)
    assert set(back) == set(state) - {"lm_head.weight"}  # the tied copy is left out, as save_pretrained does
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k])
    untied = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1})
    with pytest.raises(WeightError, match="tied"):
        load_state_dict(nnx.eval_shape(lambda: Qwen2Model(cfg, rngs=nnx.Rngs(0))), table, untied)
    load_state_dict(nnx.eval_shape(lambda: Qwen2Model(cfg, rngs=nnx.Rngs(0))), table,
                    {k: v for k, v in state.items() if k != "lm_head.weight"})  # the copy is optional


def test_untied_connector_head_is_stored_and_round_trips():
    torch = _torch()
    cfg = Qwen2Config.tiny(tie_word_embeddings=False)
    state = {k: v.detach().numpy().copy() for k, v in _hf_qwen2(torch, cfg).state_dict().items()}
    assert not np.array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    table = qwen2_table(cfg)
    model = load_state_dict(nnx.eval_shape(lambda: Qwen2Model(cfg, rngs=nnx.Rngs(0), lm_head=True)), table, state)
    back = export_state_dict(model, table)
    assert set(back) == set(state)
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k])


def test_qwen2_config_refuses_what_it_does_not_model():
    base = Qwen2Config.tiny().to_official()
    with pytest.raises(ConfigError, match="sliding"):
        Qwen2Config.from_official(dict(base, use_sliding_window=True, sliding_window=8))
    with pytest.raises(ConfigError, match="unknown"):
        Qwen2Config.from_official(dict(base, mystery=1))
    assert Qwen2Config.from_official(base) == Qwen2Config.tiny()


# --- the caption wrapper ----------------------------------------------------------------------------------------


def test_clip_mlp_against_torch_and_zero_caption():
    torch = _torch()
    width = 24
    ref = torch.nn.Sequential(torch.nn.Linear(width, 2048), torch.nn.LayerNorm(2048), torch.nn.ReLU(),
                              torch.nn.Linear(2048, 2560), torch.nn.LayerNorm(2560))
    with torch.no_grad():
        for m in (ref[1], ref[4]):
            m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
            m.bias.copy_(0.1 * torch.randn_like(m.bias))
    names = {"0": "fc1", "1": "layer_norm1", "3": "fc2", "4": "layer_norm2"}
    state = {f"mlp.{names[k.split('.')[0]]}.{k.split('.')[1]}": v.detach().numpy() for k, v in ref.state_dict().items()}
    clip = load_state_dict(nnx.eval_shape(lambda: ClipMLP(width, param_dtype=jnp.float32, rngs=nnx.Rngs(0))),
                           clip_mlp_table("mlp."), state)
    x = torch.randn(2, 5, width)
    x[1] = 0  # the negative caption
    scaled = torch.nn.functional.normalize(x, dim=-1) * 1000.0
    with torch.no_grad():
        want = ref(scaled).numpy()
    got = wrap_caption(jnp.asarray(x.numpy()), text_encoder_norm=True, clip_mlp=clip)
    numerics.assert_close("clip_mlp", got, want)
    plain = wrap_caption(jnp.asarray(x.numpy()), text_encoder_norm=True)
    assert np.all(np.asarray(plain[1]) == 0)  # zeros stay zeros through the L2 x 1000


# --- the query block ----------------------------------------------------------------------------------------------


def test_query_block_goes_after_the_real_tokens():
    cfg = ImageGenHeadConfig(diffusion_c_input_dim=8, img_gen_scales=(2, 3))
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    qp = append_query_block(cfg, ids, mask, image_patch_token=100)
    block = [101, 100, 100, 100, 100, 102, 101] + [100] * 9 + [102]
    assert qp.input_ids[0].tolist() == [5, 6, 7] + block + [0]
    assert qp.input_ids[1].tolist() == [8, 9] + block + [0, 0]
    assert qp.attention_mask.sum(1).tolist() == [3 + len(block), 2 + len(block)]
    assert qp.gen_mask.sum(1).tolist() == [13, 13]
    assert qp.last_scale_index[1].tolist() == list(range(2 + 6 + 1, 2 + 6 + 1 + 9))  # after <image> of the 3x3 block
    assert qp.grids.tolist() == [[1, 2, 8], [1, 2, 18]]
    with pytest.raises(ValueError, match="right-padded"):
        append_query_block(cfg, ids, np.array([[0, 1, 1, 1], [1, 1, 0, 0]]), image_patch_token=100)


def tiny_thinker_config() -> LLMConfig:
    """The tiny LLM with the release's special-token layout: <image> = <imagePatch> + 1, </image> = + 2."""
    return LLMConfig.tiny(image_patch_token=990, image_start_token=991, video_start_token=992, video_patch_token=993)


def _tiny_generator(seed: int = 0, *, identity: bool = True) -> image_gen.ImageGenerator:
    """Random tiny components (built once per seed and kind: eager init is the slow part); a fresh generator object
    each call, so a test that sets `.glyph` does not leak it into the next."""
    return dataclasses.replace(_tiny_components(seed, identity))


@functools.lru_cache(maxsize=None)
def _tiny_components(seed: int, identity: bool) -> image_gen.ImageGenerator:
    llm_cfg = tiny_thinker_config()
    cfg = ImageGenConfig.tiny()
    if not identity:
        cfg = cfg.replace(head=cfg.head.replace(use_identity_mlp=False),
                          dit=cfg.dit.replace(cap_feat_dim=2560))
    rngs = nnx.Rngs(seed)
    return image_gen.ImageGenerator(
        cfg, llm_lib.create(llm_cfg, seed=seed),
        ImageGenHead(cfg.head, llm_cfg.hidden_size, cfg.connector, rngs=rngs),
        ZImageDiT(cfg.dit, rngs=rngs), AutoencoderKL(cfg.vae, rngs=rngs))


@pytest.mark.slow
def test_prepare_condition_checks_image_rows():
    gen = _tiny_generator()
    llm = gen.thinker.cfg
    ids = np.array([[3, 4, llm.image_start_token, llm.image_patch_token, llm.image_patch_token, 9]])
    with pytest.raises(ValueError, match="image_embeds"):
        image_gen.prepare_condition(llm, gen.head, ids, None, np.zeros((3, llm.hidden_size)), [[1, 2, 4]])
    with pytest.raises(ValueError, match="image_grid_thw"):
        image_gen.prepare_condition(llm, gen.head, ids, None, np.zeros((2, llm.hidden_size)), None)
    with pytest.raises(ValueError, match="image_start_token"):
        image_gen.prepare_condition(LLMConfig.tiny(), gen.head, ids[:, :2])
    inputs = image_gen.prepare_condition(llm, gen.head, ids, None, np.ones((2, llm.hidden_size)), [[1, 2, 4]])
    s = gen.cfg.head.img_gen_scales[-1]
    assert inputs.grids.tolist() == [[1, 2, 4], [1, 2, 2 * s * s]]
    feats = inputs.prepared.features
    assert feats.shape == (2 + s * s, llm.hidden_size) and np.all(feats[:2] == 1) and np.all(feats[2:] == 0)


# --- the schedule -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(shift=3.0), dict(shift=1.0), dict(use_dynamic_shifting=True),
                                dict(use_dynamic_shifting=True, time_shift_type="linear"),
                                dict(shift=3.0, shift_terminal=0.1)])
@pytest.mark.parametrize("steps,seq", [(1, 16), (4, 24), (30, 4096), (8, 1000)])
def test_schedule_against_diffusers(kw, steps, seq):
    _torch()
    diffusers = pytest.importorskip("diffusers")
    cfg = FlowMatchConfig(**kw)
    if steps == 1 and cfg.shift_terminal is not None:  # diffusers divides 0 by 0 there and returns NaN sigmas
        with pytest.raises(ValueError, match="at least 2 steps"):
            flow_match.schedule(cfg, steps, seq)
        return
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**cfg.to_official())
    ref.sigma_min = 0.0  # what the release's pipeline does before set_timesteps
    mu = flow_match.calculate_shift(seq, cfg)
    ref.set_timesteps(steps, mu=mu)
    ours = flow_match.schedule(cfg, steps, seq)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    t_model = ((1000 - ref.timesteps) / 1000).numpy()
    np.testing.assert_array_equal(ours.model_times, t_model)
    assert ours.sigmas[-1] == 0 and len(ours.sigmas) == steps + 1


def test_scheduler_config_refuses_unsupported_options():
    with pytest.raises(ConfigError, match="karras"):
        FlowMatchConfig.from_official({"use_karras_sigmas": True})
    with pytest.raises(ConfigError, match="unknown"):
        FlowMatchConfig.from_official({"shift": 3.0, "bogus": 1})
    with pytest.raises(ValueError, match="step"):
        flow_match.schedule(FlowMatchConfig(), 0, 16)


# --- the sampler ------------------------------------------------------------------------------------------------


def test_denoise_compiles_once_and_reports_progress():
    gen = _tiny_generator()
    cap = jax.random.normal(jax.random.key(1), (1, 7, gen.cfg.dit.cap_feat_dim))
    shape = image_gen.latent_shape(1, gen.cfg.dit.in_channels, 32, 48, gen.cfg.vae.scale_factor)
    sched = flow_match.schedule(gen.cfg.scheduler, 5, 24)
    seen = []
    image_gen._denoise.clear_cache()
    with image_gen.progress_listener(lambda i, n: seen.append((i, n))):
        a = image_gen.denoise(gen.dit, cap, image_gen.initial_latents(jax.random.key(0), shape), sched, guidance=2.0)
        jax.block_until_ready(a)
        b = image_gen.denoise(gen.dit, cap * 0.5, image_gen.initial_latents(jax.random.key(1), shape), sched,
                              guidance=3.5)  # new values, new guidance: the same program
        jax.block_until_ready(b)
        jax.effects_barrier()
    assert image_gen._denoise._cache_size() == 1
    assert sorted(seen) == sorted([(i, 5) for i in range(1, 6)] * 2)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def _release_loop(dit, cap, x, sched, guidance, ref=None):
    """The release's pipeline loop written out step by step with the DiT's own jitted entry: CFG as a batch
    [pos, neg] with the zero caption when guidance > 1, the reference frame given to every branch."""
    from ming_jax.models.image_gen.dit import dit_forward

    b = x.shape[0]
    cfg = guidance > 1
    want = np.asarray(x)
    for i in range(sched.steps):
        lat = jnp.asarray(want)[:, :, None]
        caps = jnp.concatenate([cap, jnp.zeros_like(cap)]) if cfg else cap
        lats = jnp.concatenate([lat, lat]) if cfg else lat
        refs = None if ref is None else (jnp.concatenate([ref, ref]) if cfg else ref)[:, :, None]
        out = np.asarray(dit_forward(dit, lats, jnp.full((lats.shape[0],), sched.model_times[i]), caps,
                                     ref_x=refs))[:, :, 0]
        v = out[:b] + guidance * (out[:b] - out[b:]) if cfg else out
        want = want + (sched.sigmas[i + 1] - sched.sigmas[i]) * (-v)
    return want


@pytest.mark.parametrize("guidance,edit", [(2.0, False), (1.0, False), (0.5, False), (3.0, True), (1.0, True)])
def test_denoise_matches_the_release_loop(guidance, edit):
    """The jitted scan against the loop above: with and without guidance, with an editing reference (batch of two
    rows, each with its own reference)."""
    gen = _tiny_generator(3)
    cap = jax.random.normal(jax.random.key(2), (2, 5, gen.cfg.dit.cap_feat_dim))
    x = image_gen.initial_latents(jax.random.key(4), (2, gen.cfg.dit.in_channels, 8, 8))
    ref = jax.random.normal(jax.random.key(5), x.shape) if edit else None
    sched = flow_match.schedule(gen.cfg.scheduler, 3, 16)
    got = image_gen.denoise(gen.dit, cap, x, sched, guidance=guidance, ref_latent=ref)
    numerics.assert_close("denoise", got, _release_loop(gen.dit, cap, x, sched, guidance, ref))


def test_batch_rows_equal_single_runs():
    """Rows of a padded batch (different prompt lengths, one reference image for both) generate what each row
    generates alone."""
    gen = _tiny_generator(1)
    llm = gen.thinker.cfg
    ids = np.array([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    ref = image_gen.encode_reference(gen.vae, np.clip(np.random.default_rng(1).normal(size=(1, 3, 16, 16)), -1, 1)
                                     .astype(np.float32))
    batch_caption, batch_negative = gen.captions(image_gen.prepare_condition(llm, gen.head, ids, mask))
    sched = flow_match.schedule(gen.cfg.scheduler, 2, 4)
    x = image_gen.initial_latents(jax.random.key(7), (2, 4, 4, 4))
    both = image_gen.denoise(gen.dit, batch_caption, x, sched, negative=batch_negative,
                             ref_latent=jnp.repeat(ref, 2, axis=0))
    for row in range(2):
        n = int(mask[row].sum())
        caption, negative = gen.captions(image_gen.prepare_condition(llm, gen.head, ids[row:row + 1, :n]))
        numerics.assert_close(f"caption row {row}", caption[0], batch_caption[row])
        alone = image_gen.denoise(gen.dit, caption, x[row:row + 1], sched, negative=negative, ref_latent=ref)
        numerics.assert_close(f"latents row {row}", alone[0], both[row])


def test_prompt_buckets_compile_once_and_change_nothing():
    gen = _tiny_generator(2)
    llm = gen.thinker.cfg
    image_gen._condition.clear_cache()
    outs = []
    for n in (3, 9):  # two prompt lengths in one 64-token bucket
        inputs = image_gen.prepare_condition(llm, gen.head, np.arange(3, 3 + n)[None])
        assert inputs.prompt.input_ids.shape[1] % image_gen.PROMPT_BUCKET == 0
        outs.append(image_gen.condition(gen.thinker, gen.head, inputs)[0])
        exact = image_gen.condition(gen.thinker, gen.head, image_gen.prepare_condition(
            llm, gen.head, np.arange(3, 3 + n)[None], bucket=1))[0]
        numerics.assert_close(f"bucketed condition ({n} tokens)", outs[-1], exact)
    assert image_gen._condition._cache_size() == 3  # one bucket (64) + the two unpadded reference shapes


# --- prompt -> image, chained -------------------------------------------------------------------------------------


@pytest.mark.parametrize("identity", [True, False])
def test_prompt_to_image_end_to_end(identity):
    gen = _tiny_generator(identity=identity)
    llm = gen.thinker.cfg
    ids = np.array([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    inputs = image_gen.prepare_condition(llm, gen.head, ids, mask)
    images = image_gen.generate(gen, inputs, height=32, width=48, steps=3, seed=5)
    assert images.shape == (2, 32, 48, 3) and images.dtype == np.uint8
    again = image_gen.generate(gen, inputs, height=32, width=48, steps=3, seed=5)
    np.testing.assert_array_equal(images, again)
    other = image_gen.generate(gen, inputs, height=32, width=48, steps=3, seed=6)
    assert not np.array_equal(images, other)
    # the chain equals its pieces: condition -> caption -> denoise -> decode
    cond, _ = image_gen.condition(gen.thinker, gen.head, inputs)
    numerics.assert_close("unit condition rows", np.linalg.norm(np.asarray(cond), axis=-1),
                          np.ones(cond.shape[:2], np.float32))
    caption, negative = gen.captions(inputs)
    sched = flow_match.schedule(gen.cfg.scheduler, 3, (8 // 2) * (12 // 2))
    lat = image_gen.denoise(gen.dit, caption, image_gen.initial_latents(jax.random.key(5), (2, 4, 8, 12)), sched,
                            negative=negative)
    np.testing.assert_array_equal(image_gen.to_uint8(image_gen.decode_images(gen.vae, lat)), images)


def test_editing_runs_with_a_reference():
    gen = _tiny_generator()
    inputs = image_gen.prepare_condition(gen.thinker.cfg, gen.head, np.array([[3, 4, 5]]))
    ref = np.clip(np.random.default_rng(0).normal(size=(1, 3, 32, 32)), -1, 1).astype(np.float32)
    edited = image_gen.generate(gen, inputs, height=32, width=32, steps=2, reference=ref)
    plain = image_gen.generate(gen, inputs, height=32, width=32, steps=2)
    assert edited.shape == plain.shape == (1, 32, 32, 3)
    assert not np.array_equal(edited, plain)
    # the chain equals its pieces: the reference encoded as the pipeline does, fed to every DiT call
    caption, negative = gen.captions(inputs)
    sched = flow_match.schedule(gen.cfg.scheduler, 2, (8 // 2) * (8 // 2))
    ref_latent = image_gen.encode_reference(gen.vae, ref)
    from ming_jax.models.image_gen.vae import encode

    mean, _ = encode(gen.vae, ref)
    numerics.assert_close("reference latent", ref_latent,
                          (np.asarray(mean) - gen.cfg.vae.shift) * gen.cfg.vae.scaling_factor)
    lat = image_gen.denoise(gen.dit, caption, image_gen.initial_latents(jax.random.key(0), (1, 4, 8, 8)), sched,
                            negative=negative, ref_latent=ref_latent)
    np.testing.assert_array_equal(image_gen.to_uint8(image_gen.decode_images(gen.vae, lat)), edited)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        image_gen.generate(gen, inputs, height=32, width=32, steps=2, reference=(ref + 1) * 127.5)
    with pytest.raises(ValueError, match="reference"):
        image_gen.generate(gen, inputs, height=32, width=32, steps=2, reference=ref[:, :, :16])
    with pytest.raises(ValueError, match="multiple"):
        image_gen.generate(gen, inputs, height=30, width=32, steps=2)


# --- the glyph branch in the chain -------------------------------------------------------------------------------


def _glyph_branch(width: int):
    """A random tiny ByT5 encoder + mapper to `width` (the shape `ming_jax.checkpoint.glyph.GlyphBranch` has)."""
    import types

    from ming_jax.config.glyph import GlyphConfig, T5EncoderConfig
    from ming_jax.models.image_gen.glyph import GlyphMapper, T5Encoder
    from ming_jax.processors.glyph import ByteTokenizer
    from ming_jax.weights.glyph import glyph_mapper_table, t5_encoder_table
    from ming_jax.weights.table import export_arrays, param_shapes

    t5 = T5EncoderConfig.tiny(vocab_size=ByteTokenizer([]).vocab_size)
    cfg = GlyphConfig.tiny(mapper_channels=width, max_length=24)
    rng = np.random.default_rng(0)

    def make(build, table):
        shapes = param_shapes(nnx.eval_shape(build))
        arrays = {p: (rng.standard_normal(s) * 0.3 + (1.0 if p.endswith("scale") else 0.0)).astype(np.float32)
                  for p, s in shapes.items()}
        return load_state_dict(nnx.eval_shape(build), table, export_arrays(table, arrays))

    encoder = make(lambda: T5Encoder(t5, rngs=nnx.Rngs(0)), t5_encoder_table(t5))
    mapper = make(lambda: GlyphMapper(t5, cfg, rngs=nnx.Rngs(0)), glyph_mapper_table(t5, cfg))
    return types.SimpleNamespace(config=cfg, t5=t5, encoder=encoder, mapper=mapper, special_tokens=[],
                                 tokenizer=lambda: ByteTokenizer([]))


def test_glyph_rows_join_the_caption_when_a_prompt_quotes_text():
    gen = _tiny_generator()
    gen.glyph = _glyph_branch(gen.cfg.head.diffusion_c_input_dim)
    llm = gen.thinker.cfg
    ids = np.array([[3, 4, 5], [6, 7, 8]])
    texts = ['<role>HUMAN</role>A poster that says "OPEN"<|role_end|>', "<role>HUMAN</role>a cat<|role_end|>"]
    inputs = image_gen.prepare_condition(llm, gen.head, ids, glyph=gen.glyph, prompt_texts=texts)
    assert inputs.glyph_ids.shape == (2, 24) and inputs.glyph_mask[1].sum() == 1  # an empty text: just </s>
    caption, negative = gen.captions(inputs)
    n = gen.cfg.head.img_gen_scales[-1] ** 2
    assert caption.shape == (2, n + 24, gen.cfg.dit.cap_feat_dim)
    assert np.all(np.asarray(negative) == 0)  # zeros, glyph rows included (the release's byt5 * 0)
    assert np.all(np.asarray(caption[0, n + int(inputs.glyph_mask[0].sum()):]) == 0)  # masked rows stay zero
    plain = image_gen.prepare_condition(llm, gen.head, ids, glyph=gen.glyph, prompt_texts=["a cat", "a dog"])
    assert plain.glyph_ids is None and gen.captions(plain)[0].shape[1] == n  # no quoted text: no rows at all
    images = image_gen.generate(gen, inputs, height=16, width=16, steps=2)
    assert images.shape == (2, 16, 16, 3)
