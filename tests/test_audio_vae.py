"""The talker's AudioVAE: golden parity (decode, streaming, encoder), streaming == full decode over chunkings and
other configs, independent references (torch.istft, torch Upsample, transformers Qwen2Model with the KV-cached
path), the name table, the trailing-silence hold, jit caching, bad inputs, bfloat16.

Models are built abstractly and filled through `ming_jax.weights.audio_vae.audio_vae_table`; the transformers
reference's random weights are moved with the same table's backbone rules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ming_jax import weights
from ming_jax.config.audio_vae import AudioVAEConfig
from ming_jax.config.base import ConfigError
from ming_jax.config.qwen2 import Qwen2Config
from ming_jax.config.runtime import Runtime
from ming_jax.models.qwen2 import Qwen2Cache, Qwen2Model
from ming_jax.models.talker import audio_vae as av
from ming_jax.parity import golden, numerics
from ming_jax.parity.cases import audio_vae as audio_vae_case
from ming_jax.sharding import ShardingRules, logical_axes
from ming_jax.weights.audio_vae import audio_vae_table, backbone_table


def abstract_vae(cfg: AudioVAEConfig, runtime: Runtime | None = None) -> av.AudioVAE:
    return nnx.eval_shape(lambda: av.AudioVAE(cfg, runtime, rngs=nnx.Rngs(0)))


def random_vae(cfg: AudioVAEConfig, seed: int) -> av.AudioVAE:
    """An abstract model filled with random numpy values (eager nnx init compiles every vmapped initialiser per
    shape, seconds each): norm scales 1 + N(0, 0.1), biases N(0, 0.05), other weights N(0, 1 / fan_in), the Hann
    window as the release stores it."""
    rng = np.random.default_rng(seed)
    graphdef, params, rest = nnx.split(abstract_vae(cfg), nnx.Param, ...)
    flat = []
    for path, var in nnx.to_flat_state(params):
        shape, name = var.get_value().shape, ".".join(map(str, path))
        if name.endswith("window"):
            value = av.hann_window(shape[0])
        elif name.endswith("scale"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("bias", "cls_embed")):
            value = 0.05 * rng.standard_normal(shape)
        else:
            stacked = ".layers." in name  # [L, in, ...]; the attention output [L, H, hd, D]
            fan_in = (shape[1] * shape[2] if name.endswith("attn.out") else shape[1]) if stacked else shape[0]
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        flat.append((path, var.replace(jnp.asarray(value, var.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@pytest.fixture(scope="module")
def case(golden_dir):
    return golden.load_case(str(golden_dir / "audio_vae"))


@pytest.fixture(scope="module")
def case_cfg(case):
    return AudioVAEConfig.from_official(case.config)


@pytest.fixture(scope="module")
def model(case, case_cfg):
    return weights.load_state_dict(abstract_vae(case_cfg), audio_vae_table(case_cfg), case.weights)


def expected_chunk_lengths(cfg: AudioVAEConfig, sizes) -> list[int]:
    """Samples per streaming call, restated from the release's rules: with patches a call emits the previous
    chunk's f * n frames (the last call also its own); the first emission loses the leading pad, every call but the
    last keeps n_fft - hop samples back, the last loses only the trailing pad."""
    dec, f = cfg.decoder, cfg.frames_per_latent
    out, first = [], True
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        frames = f * ((sizes[i - 1] if (cfg.has_patch and i) else 0) + (n if (last or not cfg.has_patch) else 0))
        if not frames:
            out.append(0)
            continue
        m = frames * dec.hop + (dec.overlap - dec.pad if last else 0) - (dec.pad if first else 0)
        out.append(m)
        first = False
    return out


# --- golden parity ------------------------------------------------------------------------------------------------


def test_golden_parity(case):
    rows = audio_vae_case.run(case)
    assert {r.name for r in rows} == set(case.outputs)
    assert numerics.all_ok(rows), numerics.report(rows)


def test_bfloat16_run_within_bfloat16_tolerance(case, case_cfg):
    bf16 = weights.load_state_dict(abstract_vae(case_cfg, Runtime.bf16()), audio_vae_table(case_cfg), case.weights)
    assert bf16.decoder.fc1.kernel.get_value().dtype == jnp.bfloat16
    assert bf16.decoder.head.window.get_value().dtype == jnp.float32  # the window stays float32
    inputs = {k: v for k, v in case.inputs.items() if k != "stream_chunk_sizes"}  # streaming: same math, more compiles
    ours = audio_vae_case.outputs(bf16, inputs)
    assert ours["wave"].dtype == jnp.float32 and len(ours) == len(case.outputs) - 2
    for name, value in ours.items():
        numerics.assert_close(name, value, case.outputs[name], dtype="bfloat16")


# --- streaming ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1, 1], [6]])  # (the golden case streams [2, 2, 2])
def test_streaming_equals_full_decode(model, case, case_cfg, sizes):
    chunks = av.decode_stream(model, case.inputs["latents"], sizes)
    assert [c.shape[-1] for c in chunks] == expected_chunk_lengths(case_cfg, sizes)
    numerics.assert_close("stream", jnp.concatenate(chunks, -1), case.outputs["wave"])


# (config overrides, batch, latents, chunk sizes): an odd hop (15, so the output is N hop + 1 samples) with patch 3,
# 4 heads / 2 kv, 3 layers and a batch of 2; no patches (every call emits its own chunk).
OTHER_CONFIGS = [
    (dict(patch_size=3, hop=15, heads=(4, 2), layers=3), 2, 7, [3, 1, 3]),
    (dict(patch_size=-1, hop=12, heads=(2, 1), layers=2), 1, 9, [2, 4, 3]),
]


def other_config(patch_size, hop, heads, layers) -> AudioVAEConfig:
    base = AudioVAEConfig.tiny()
    bb = base.decoder.backbone.replace(num_attention_heads=heads[0], num_key_value_heads=heads[1],
                                       num_hidden_layers=layers, hidden_size=16 * heads[0])
    return base.replace(patch_size=patch_size,
                        decoder=dataclasses.replace(base.decoder, backbone=bb, output_dim=hop),
                        encoder=dataclasses.replace(base.encoder, backbone=bb.replace(num_hidden_layers=4)))


@pytest.mark.parametrize("overrides,batch,t,sizes", OTHER_CONFIGS)
def test_streaming_equals_full_decode_other_configs(overrides, batch, t, sizes):
    cfg = other_config(**overrides)
    model = random_vae(cfg, 3)
    latents = jax.random.normal(jax.random.key(1), (batch, t, cfg.decoder.latent_dim))
    full = av.decode(model, latents)
    dec = cfg.decoder
    assert full.shape == (batch, 1, (t * cfg.frames_per_latent - 1) * dec.hop + dec.n_fft - 2 * dec.pad)
    chunks = av.decode_stream(model, latents, sizes)
    assert [c.shape[-1] for c in chunks] == expected_chunk_lengths(cfg, sizes)
    numerics.assert_close(f"stream {sizes}", jnp.concatenate(chunks, -1), full)


def test_a_first_emission_shorter_than_the_overlap_is_refused():
    """Without patches a 1-latent first chunk is 1 frame: fewer samples than the iSTFT keeps back (the release
    breaks on the next call); refused up front."""
    cfg = other_config(patch_size=-1, hop=12, heads=(2, 1), layers=2)
    model = random_vae(cfg, 0)
    state = av.StreamState.create(model, 1, 4)
    with pytest.raises(ValueError, match="shorter than the iSTFT overlap"):
        av.decode_chunk(model, state, np.zeros((1, 1, 64), np.float32), last=False)


def test_stream_state_checks(model, case):
    lat = case.inputs["latents"]
    state = av.StreamState.create(model, 1, max_latents=4)
    _, state = av.decode_chunk(model, state, lat[:, :2], last=False)
    _, state = av.decode_chunk(model, state, lat[:, 2:3], last=False)  # emits 2 latents: 8 of 16 frames used
    with pytest.raises(ValueError, match="exceed the stream's cache of 16 frames"):
        av.decode_chunk(model, state, lat[:, 3:5], last=True)
    with pytest.raises(ValueError, match="chunk batch 2 != the stream's 1"):
        av.decode_chunk(model, state, np.repeat(lat[:, 3:4], 2, axis=0), last=True)
    audio, done = av.decode_chunk(model, state, lat[:, 3:4], last=True)
    assert done is None and audio.shape[-1] > 0
    with pytest.raises(ValueError, match="sum to T = 6"):
        av.decode_stream(model, lat, [2, 2])


# --- independent references ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hop", [24, 10])
def test_istft_head_matches_torch_istft(hop):
    """torch.istft(center=True) trims n_fft // 2 = 2 hop at each end, "same" padding 1.5 hop: ours, cut by a
    further hop / 2 at each end, is the same signal (same irfft, window, overlap-add and envelope)."""
    torch = pytest.importorskip("torch")
    n_fft, n = 4 * hop, 9
    rng = np.random.default_rng(hop)
    head = rng.normal(size=(2, n, n_fft + 2)).astype(np.float32)
    head[..., : n_fft // 2 + 1] *= 2.0  # some magnitudes above the clip (exp(.) > 100)
    window = av.hann_window(n_fft)
    ours = np.asarray(av.istft_same(av.spectrum_to_frames(jnp.asarray(head), jnp.asarray(window)), window, hop))
    assert ours.shape == (2, n * hop)
    t = torch.from_numpy(head).transpose(1, 2)
    log_mag, phase = t.chunk(2, dim=1)
    spec = torch.clip(torch.exp(log_mag), max=100.0) * torch.exp(1j * phase)
    ref = torch.istft(spec, n_fft, hop, n_fft, torch.hann_window(n_fft), center=True).numpy()
    numerics.assert_close("istft", ours[:, hop // 2: hop // 2 + ref.shape[-1]], ref)


def test_overlap_add_matches_a_loop():
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(2, 5, 12)).astype(np.float32)
    ref = np.zeros((2, 4 * 3 + 12), np.float32)
    for i in range(5):
        ref[:, 3 * i:3 * i + 12] += frames[:, i]
    np.testing.assert_allclose(av.overlap_add(jnp.asarray(frames), 3), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("factor,t", [(4, 6), (3, 5), (2, 1)])
def test_linear_upsample_matches_torch(factor, t):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(factor).normal(size=(2, t, 3)).astype(np.float32)
    up = torch.nn.Upsample(scale_factor=factor, mode="linear", align_corners=False)
    ref = up(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
    numerics.assert_close("upsample", av.linear_upsample(jnp.asarray(x), factor), ref)


def test_backbone_and_its_kv_cache_match_transformers_qwen2():
    """A random transformers Qwen2Model (causal, 4 heads / 2 kv) moved by the table's backbone rules: our full
    forward, and the KV-cached path streaming uses fed in two pieces, both give its last_hidden_state."""
    torch = pytest.importorskip("torch")
    import transformers

    hf_cfg = transformers.Qwen2Config(vocab_size=1, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                                      rms_norm_eps=1e-6, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen2Model(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:  # norms start at 1 and biases at 0: move them off their init
                p.add_(0.1 * torch.randn_like(p))
    ours_cfg = Qwen2Config.from_official(hf_cfg.to_dict())
    table = backbone_table(ours_cfg, prefix="", ours="")
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    ours = weights.load_state_dict(nnx.eval_shape(lambda: Qwen2Model(ours_cfg, rngs=nnx.Rngs(0))), table, tensors)
    x = np.random.default_rng(1).normal(size=(2, 8, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf(inputs_embeds=torch.from_numpy(x)).last_hidden_state.numpy()
    numerics.assert_close("qwen2 full", nnx.jit(lambda model, x: model(x))(ours, jnp.asarray(x)), ref)
    step = nnx.jit(lambda model, x, cache, prefill: model(x, cache=cache, prefill=prefill),
                   static_argnames=("prefill",))
    cache = Qwen2Cache.create(ours_cfg, 2, 9)  # one slot spare
    h1, cache = step(ours, jnp.asarray(x[:, :4]), cache, True)  # the first piece meets an empty cache
    h2, cache = step(ours, jnp.asarray(x[:, 4:]), cache, False)
    numerics.assert_close("qwen2 cached", jnp.concatenate([h1, h2], 1), ref)


def test_encoder_runs_only_the_first_four_backbone_layers():
    """The release builds its aggregator by setting num_hidden_layers = 4 on the config its encoder backbone also
    holds, and transformers runs layers[:num_hidden_layers]: layers past the fourth are loaded but never run."""
    base = AudioVAEConfig.tiny()
    cfg = base.replace(encoder=dataclasses.replace(
        base.encoder, backbone=base.encoder.backbone.replace(num_hidden_layers=6)))
    assert cfg.encoder_layers_run == 4 and cfg.replace(patch_size=-1).encoder_layers_run == 6
    model = random_vae(cfg, 0)
    wave = jax.random.normal(jax.random.key(0), (1, 200))
    before = av.encoder_params(model, wave)
    q = model.encoder.backbone.layers.attn.q
    q.set_value(q.get_value().at[4:].set(0.0))
    numerics.assert_close("layers 4-5 unused", av.encoder_params(model, wave), before)
    q.set_value(q.get_value().at[3].set(0.0))
    assert not np.allclose(av.encoder_params(model, wave), before)


def test_encode_sampling_and_frame_counts(model, case, case_cfg):
    wave = case.inputs["enc_waveform"]
    noise = np.swapaxes(case.inputs["enc_noise"], 1, 2)
    latent, mean, std, frames = av.encode(model, wave, noise=noise)
    np.testing.assert_allclose(latent, mean + std * noise, rtol=1e-6)
    assert float(jnp.min(std)) > av.STD_FLOOR
    drawn, mean2, _, _ = av.encode(model, wave, key=jax.random.key(0))
    assert drawn.shape == latent.shape and np.allclose(mean2, mean) and not np.allclose(drawn, latent)
    assert frames.dtype == jnp.int32 and frames.tolist() == [6]
    # ceil(ceil(L / input_dim) / patch), input_dim = 24, patch = 4: 96 -> 1, 97 -> 2, 487 -> 6
    assert av.latent_frames(case_cfg, [96, 97, 487]).tolist() == [1, 2, 6]
    _, _, _, frames = av.encode(model, wave, noise=noise, lengths=[96])  # a row padded past its length
    assert frames.tolist() == [1]


# --- weights, config, axes ----------------------------------------------------------------------------------------


def test_table_round_trip_and_coverage(model, case, case_cfg):
    table = audio_vae_table(case_cfg)
    table.check_coverage(weights.param_shapes(abstract_vae(case_cfg)))
    assert sorted(table.expected_names()) == sorted(case.weights)
    exported = weights.export_state_dict(model, table)
    assert set(exported) == set(case.weights)
    for name, ref in case.weights.items():
        np.testing.assert_array_equal(exported[name], ref, err_msg=name)
    # the stored Hann buffer is the periodic Hann window; the unused LayerNorm is loaded all the same
    np.testing.assert_allclose(model.decoder.head.window.get_value(), av.hann_window(case_cfg.decoder.n_fft),
                               atol=1e-6)
    np.testing.assert_array_equal(model.encoder.norm.bias.get_value(), case.weights["encoder.norm.bias"])


def test_table_is_strict(case, case_cfg):
    model = abstract_vae(case_cfg)
    table = audio_vae_table(case_cfg)
    extra = dict(case.weights, **{"decoder.decoder.layers.2.input_layernorm.weight": np.ones(32, np.float32)})
    with pytest.raises(weights.WeightError, match="unexpected"):
        weights.load_state_dict(model, table, extra)
    missing = {k: v for k, v in case.weights.items() if k != "decoder.head.istft.window"}
    with pytest.raises(weights.WeightError, match="missing"):
        weights.load_state_dict(model, table, missing)


def test_config_reading(case):
    cfg = AudioVAEConfig.from_official(case.config)
    assert AudioVAEConfig.from_official(cfg.to_official()) == cfg
    dec = cfg.decoder
    assert (dec.hop, dec.n_fft, dec.pad, dec.overlap, cfg.samples_per_latent) == (24, 96, 36, 72, 96)
    assert hash(cfg) == hash(AudioVAEConfig.from_official(case.config))  # static for jit
    with pytest.raises(ConfigError, match="unknown config key"):
        AudioVAEConfig.from_official(dict(case.config, decoder_kwargs={}))
    with pytest.raises(ConfigError, match="enc_kwargs: unknown key"):
        AudioVAEConfig.from_official(dict(case.config, enc_kwargs=dict(case.config["enc_kwargs"], stride=2)))
    with pytest.raises(ConfigError, match="patch_size=0"):
        AudioVAEConfig.from_official(dict(case.config, patch_size=0))
    # the official code forces sliding windows off and sdpa on, whatever the dict says: read and kept, not refused
    windowed = dict(case.config["dec_kwargs"]["backbone"], use_sliding_window=True, sliding_window=8,
                    attn_implementation="flash_attention_2")
    cfg2 = AudioVAEConfig.from_official(dict(case.config, dec_kwargs=dict(case.config["dec_kwargs"],
                                                                         backbone=windowed)))
    assert cfg2.decoder.backbone == cfg.decoder.backbone
    assert cfg2.to_official()["dec_kwargs"]["backbone"]["sliding_window"] == 8
    release = AudioVAEConfig.ming_flash_omni_2()
    assert (release.decoder.hop, release.decoder.n_fft, release.patch_size, release.sample_rate) == (882, 3528, 4,
                                                                                                      44100)


def test_every_parameter_has_known_logical_axes(case_cfg):
    known = set(ShardingRules.names())
    for path, var in nnx.to_flat_state(nnx.state(abstract_vae(case_cfg), nnx.Param)):
        axes = logical_axes(var)
        assert len(axes) == len(var.get_value().shape), path
        assert set(axes) - {None} <= known, (path, axes)


def test_release_size_decode_traces_abstractly():
    """The release preset on 2 s of latents (25 latents -> 100 frames of 882 samples), traced only."""
    model = abstract_vae(AudioVAEConfig.ming_flash_omni_2(), Runtime.bf16())
    out = nnx.eval_shape(av._decode, model, jax.ShapeDtypeStruct((1, 25, 64), jnp.float32))
    assert out.shape == (1, 1, 100 * 882) and out.dtype == jnp.float32


# --- trailing-silence hold ----------------------------------------------------------------------------------------

SR = 1000  # windows of 100 samples, a 300-sample tail


def _speech(*levels) -> np.ndarray:
    """[1, 100 * len(levels)]: one 100-sample window per level (0: silent)."""
    return np.concatenate([np.full((1, 100), lv, np.float32) for lv in levels], axis=-1)


def test_trim_silence_whole_utterance():
    x = np.concatenate([_speech(0.5, 0.5, 0, 0, 0, 0, 0), np.zeros((1, 30), np.float32)], -1)
    out, _ = av.trim_silence(x, SR)
    np.testing.assert_array_equal(out, x[:, :200 + 300])  # last loud window ends at 200, plus the 0.3 s tail
    out, _ = av.trim_silence(_speech(0.5, 0), SR)
    assert out.shape[-1] == 200  # the tail is cut to what there is
    silent, _ = av.trim_silence(_speech(0, 0, 0, 0, 0), SR)
    assert silent.shape[-1] == 300  # all silent: the held audio cut to the tail


def test_trim_silence_streaming_holds_and_releases():
    out, state = av.trim_silence(_speech(0.5, 0.5)[:, :150], SR, None, last_chunk=False)
    assert out.shape[-1] == 100 and state.pending[0].shape[-1] == 50  # the half window waits for the next chunk
    out, state = av.trim_silence(np.zeros((1, 50), np.float32), SR, state, last_chunk=False)
    assert out.shape[-1] == 100 and not state.held and not state.pending  # 50 loud + 50 quiet: a loud window
    silent = _speech(0, 0)
    out, state = av.trim_silence(silent, SR, state, last_chunk=False)
    assert out.shape[-1] == 0 and state.held[0].shape[-1] == 200  # a silent chunk is held back whole
    last = _speech(0.5, 0)
    out, state = av.trim_silence(last, SR, state, last_chunk=True)
    np.testing.assert_array_equal(out, np.concatenate([silent, last], -1))  # held audio + the chunk (tail capped)


def test_trim_silence_release_quirks():
    """Reproduced as the release behaves (see `trim_silence`): with nothing held, a chunk's quiet end is dropped;
    with audio held, the emitted audio past the cut point is held again."""
    chunk = _speech(0.5, 0, 0)
    out, state = av.trim_silence(chunk, SR, None, last_chunk=False)
    assert out.shape[-1] == 100 and not state.held  # the 200 quiet samples are gone
    out, state = av.trim_silence(chunk, SR, av.SilenceState(held=[np.zeros((1, 200), np.float32)]),
                                 last_chunk=False)
    assert out.shape[-1] == 300
    np.testing.assert_array_equal(state.held[0], out[:, 100:])


# --- jit, bad inputs ----------------------------------------------------------------------------------------------


def test_jit_compiles_once_per_shape(model, case, monkeypatch):
    traces = {"decode": 0, "stream_step": 0}
    original_intermediates = av.AudioVAEDecoder.intermediates
    original_step = av.istft_stream

    def counting_intermediates(self, latents):
        traces["decode"] += 1
        return original_intermediates(self, latents)

    def counting_step(*args):  # traced once per compiled streaming call
        traces["stream_step"] += 1
        return original_step(*args)

    monkeypatch.setattr(av.AudioVAEDecoder, "intermediates", counting_intermediates)
    monkeypatch.setattr(av, "istft_stream", counting_step)
    # a batch size no other test uses: jit caches are keyed by the model's structure, shared by equal models
    latents = np.repeat(case.inputs["latents"], 3, axis=0)
    first = av.decode(model, latents)
    second = av.decode(model, latents + 1.0)
    assert traces["decode"] == 1 and not np.allclose(first, second)
    av.decode(model, latents[:, :4])
    assert traces["decode"] == 2  # a new shape traces again
    av.decode_stream(model, latents, [2, 4])
    assert traces["stream_step"] == 1  # the last call (also the first emission); the first only holds its chunk
    av.decode_stream(model, latents + 1.0, [2, 4])
    assert traces["stream_step"] == 1


def test_bad_inputs_raise_naming_the_shape(model):
    with pytest.raises(ValueError, match=r"latent width 64.*\(1, 6, 32\)"):
        av.decode(model, np.zeros((1, 6, 32), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, 64\].*\(6, 64\)"):
        av.decode(model, np.zeros((6, 64), np.float32))
    with pytest.raises(ValueError, match=r"empty input.*\(1, 0, 64\)"):
        av.decode(model, np.zeros((1, 0, 64), np.float32))
    with pytest.raises(ValueError, match=r"2-D \[B, L\].*\(1, 1, 100\)"):
        av.encode(model, np.zeros((1, 1, 100), np.float32), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"empty input.*\(1, 0\)"):
        av.encoder_params(model, np.zeros((1, 0), np.float32))
    with pytest.raises(ValueError, match="exactly one of key"):
        av.encode(model, np.zeros((1, 100), np.float32))
    with pytest.raises(ValueError, match="noise must be"):
        av.encode(model, np.zeros((1, 100), np.float32), noise=np.zeros((1, 3, 64), np.float32))
    with pytest.raises(ValueError, match="lengths must be"):
        av.encode(model, np.zeros((1, 100), np.float32), key=jax.random.key(0), lengths=[101])
    with pytest.raises(ValueError, match="chunk"):
        av.decode_chunk(model, av.StreamState.create(model, 1, 4), np.zeros((1, 2, 8), np.float32), last=True)
