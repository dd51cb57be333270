"""Audio tower: golden parity, weight table, configs, an independent transformers reference, bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from ming_jax.parity import numerics, run as parity
from ming_jax import weights
from ming_jax.models.audio import AudioTower, clip_layout, encode_audio, sinusoids
from ming_jax.config.runtime import Runtime
from ming_jax.config.audio import AudioConfig, WhisperEncoderConfig
from ming_jax.config.base import ConfigError
from ming_jax.sharding import logical_axes
from ming_jax.weights.audio import audio_table

SHARED = Path(os.environ.get("MING_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
GOLDEN = SHARED / "golden" / "audio_encoder"
REFERENCE_CONFIG = SHARED / "reference" / "config.json"


def _need(path: Path):
    if not path.exists():
        pytest.fail(f"shared data not found at {path} (set MING_SHARED)")


def _random_official(cfg: AudioConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random official-named tensors, drawn like the golden generator: 1-D weights 1 + N(0, 0.1), 1-D biases
    N(0, 0.05), matrices / conv kernels N(0, 1 / fan_in); the positional table stays the sinusoids."""
    table = audio_table(cfg)
    zeros = {p: np.zeros(s, np.float32) for p, s in _shapes(cfg).items()}
    rng = np.random.default_rng(seed)
    out = {}
    for name, z in sorted(weights.export_arrays(table, zeros).items()):
        if name.endswith("positional_embedding"):
            out[name] = sinusoids(*z.shape)
        elif z.ndim == 1:
            out[name] = (name.endswith("weight") + rng.normal(0, 0.1 if name.endswith("weight") else 0.05, z.shape))
        else:
            out[name] = rng.standard_normal(z.shape) / np.sqrt(np.prod(z.shape[1:]))
        out[name] = out[name].astype(np.float32)
    return out


def _tower(cfg: AudioConfig, tensors: dict[str, np.ndarray], runtime: Runtime | None = None) -> AudioTower:
    model = nnx.eval_shape(lambda: AudioTower(cfg, runtime, rngs=nnx.Rngs(0)))
    weights.load_state_dict(model, audio_table(cfg), tensors)
    return model


def _random_tower(cfg: AudioConfig, seed: int = 0, runtime: Runtime | None = None) -> AudioTower:
    """A tower whose every parameter (biases, norms included) is random, moved in through the table."""
    return _tower(cfg, _random_official(cfg, seed), runtime)


def _shapes(cfg: AudioConfig):
    return weights.param_shapes(nnx.eval_shape(lambda: AudioTower(cfg, rngs=nnx.Rngs(0))))


# --- golden -----------------------------------------------------------------------------------------------------------


def test_golden_parity():
    _need(GOLDEN)
    rows = parity.run_case(str(GOLDEN))
    assert {r.name for r in rows} == set(load_file(str(GOLDEN / "outputs.safetensors")))
    assert numerics.all_ok(rows), numerics.report(rows)


def test_sinusoids_equal_the_stored_official_table():
    _need(GOLDEN)
    stored = load_file(str(GOLDEN / "weights.safetensors"))["audio.positional_embedding"]
    numerics.assert_close("positional_embedding", sinusoids(*stored.shape), stored)


# --- weight table -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mlp_depth", [1, 2, 3])
def test_table_covers_every_parameter(mlp_depth):
    cfg = AudioConfig.tiny(mlp_depth=mlp_depth)
    audio_table(cfg).check_coverage(_shapes(cfg))
    nested = {f"audio_tower.{k}": v for k, v in _shapes(cfg).items()}
    audio_table(cfg, prefix="model.", ours="audio_tower.").check_coverage(nested)


def test_load_export_round_trip_is_exact():
    _need(GOLDEN)
    case_cfg = json.loads((GOLDEN / "config.json").read_text())
    cfg = AudioConfig.from_official(case_cfg)
    source = {k: v for k, v in load_file(str(GOLDEN / "weights.safetensors")).items()}
    model = _tower(cfg, source)
    back = weights.export_state_dict(model, audio_table(cfg))
    assert set(back) == set(source)
    for k in source:
        assert back[k].shape == source[k].shape and np.array_equal(back[k], source[k]), k


def test_strict_loading_names_the_bad_tensor():
    cfg = AudioConfig.tiny()
    good = _random_official(cfg)
    model = nnx.eval_shape(lambda: AudioTower(cfg, rngs=nnx.Rngs(0)))
    missing = dict(good)
    del missing["audio.blocks.1.attn.key.weight"]
    with pytest.raises(weights.WeightError, match=r"audio\.blocks\.1\.attn\.key\.weight"):
        weights.load_state_dict(model, audio_table(cfg), missing)
    extra = dict(good, **{"audio.blocks.0.attn.key.bias": np.zeros(cfg.encoder.n_state, np.float32)})
    with pytest.raises(weights.WeightError, match="unexpected"):
        weights.load_state_dict(model, audio_table(cfg), extra)
    bad = dict(good, **{"linear_proj_audio.0.weight": np.zeros((cfg.out_dim, cfg.encoder.n_state, 5), np.float32)})
    with pytest.raises(weights.WeightError, match=r"linear_proj_audio\.0\.weight"):
        weights.load_state_dict(model, audio_table(cfg), bad)


# --- configs ----------------------------------------------------------------------------------------------------------


def test_preset_equals_reference_config():
    _need(REFERENCE_CONFIG)
    ref = json.loads(REFERENCE_CONFIG.read_text())
    cfg = AudioConfig.from_official(ref)
    assert cfg == AudioConfig.ming_flash_omni_2()
    assert cfg.encoder == WhisperEncoderConfig(n_mels=128, n_ctx=15000, n_state=1280, n_head=20, n_layer=32)
    assert (cfg.out_dim, cfg.mlp_depth) == (ref["llm_config"]["hidden_size"], ref["mlp_depth"])
    official = cfg.to_official()
    assert official == {k: ref["audio_config"][k] for k in official}


def test_official_round_trip_and_overrides():
    cfg = AudioConfig.tiny(n_layer=3, ds_stride=1, norm_query_embeds=False)
    assert cfg.encoder.n_layer == 3
    again = AudioConfig.from_official(cfg.to_official(), out_dim=cfg.out_dim, mlp_depth=cfg.mlp_depth)
    assert again == cfg


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(ds_kernel_size_typo=3), "unknown config key"),
    (lambda d: d["whisper_encoder_config"].update(n_audio_state=4), "unknown config key"),
    (lambda d: d["whisper_encoder_config"].pop("n_head"), "n_head"),
    (lambda d: d.pop("norm_query_embeds"), "norm_query_embeds"),
    (lambda d: d["whisper_encoder_config"].update(n_head=5), "multiple of n_head"),
    (lambda d: d.update(ds_kernel_size=4), "odd"),
    (lambda d: d.update(ds_stride=0), "ds_stride"),
])
def test_from_official_rejects_bad_configs(mutate, match):
    d = AudioConfig.tiny().to_official()
    mutate(d)
    with pytest.raises(ConfigError, match=match):
        AudioConfig.from_official(d, out_dim=48)


def test_from_official_section_needs_out_dim():
    with pytest.raises(ConfigError, match="out_dim"):
        AudioConfig.from_official(AudioConfig.tiny().to_official())


# --- independent reference: transformers' WhisperEncoder --------------------------------------------------------------

_TO_HF = [  # official whisper names -> transformers WhisperEncoder names
    (r"^audio\.", ""), (r"^positional_embedding$", "embed_positions.weight"), (r"^blocks\.", "layers."),
    (r"\.attn\.query\.", ".self_attn.q_proj."), (r"\.attn\.key\.", ".self_attn.k_proj."),
    (r"\.attn\.value\.", ".self_attn.v_proj."), (r"\.attn\.out\.", ".self_attn.out_proj."),
    (r"\.attn_ln\.", ".self_attn_layer_norm."), (r"\.mlp\.0\.", ".fc1."), (r"\.mlp\.2\.", ".fc2."),
    (r"\.mlp_ln\.", ".final_layer_norm."), (r"^ln_post\.", "layer_norm."),
]


def _hf_name(official: str) -> str:
    for pattern, repl in _TO_HF:
        official = re.sub(pattern, repl, official)
    return official


@pytest.mark.torch
def test_encoder_matches_transformers_whisper():
    """transformers' encoder only takes exactly 2 * max_source_positions mel frames (stock whisper's fixed 30 s).

    Ours pads a batch of clips to its longest clip. So we make the longest clip exactly 2 * n_ctx frames: both then
    see the same zero-padded batch (neither masks the padding), and the whole padded output, padding frames of the
    short clip included, is comparable. Weights go ours -> official names (our table) -> transformers names.
    """
    torch = pytest.importorskip("torch")
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = AudioConfig.tiny(n_mels=16, n_ctx=12, n_state=32, n_head=4, n_layer=2)
    model = _random_tower(cfg, seed=5)
    official = weights.export_state_dict(model, audio_table(cfg))
    enc_tensors = {_hf_name(k): torch.from_numpy(np.array(v)) for k, v in official.items() if k.startswith("audio.")}
    hf = WhisperEncoder(WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                                      encoder_ffn_dim=128, max_source_positions=12, activation_function="gelu",
                                      attn_implementation="eager")).eval()
    hf.load_state_dict(enc_tensors, strict=True)

    full = 2 * cfg.encoder.n_ctx
    lengths = np.array([[full, 13]])
    feats = np.random.default_rng(0).standard_normal((1, full + 13, 16)).astype(np.float32)
    ours = encode_audio(model, feats, lengths)

    padded = np.zeros((2, full, 16), np.float32)
    padded[0] = feats[0, :full]
    padded[1, :13] = feats[0, full:]
    with torch.no_grad():
        ref = hf(torch.from_numpy(padded).transpose(1, 2)).last_hidden_state.numpy()  # [2, n_ctx, D]
    numerics.assert_close("encoder_padded vs transformers", ours.encoder_padded, ref)


# --- behaviour --------------------------------------------------------------------------------------------------------


def test_wrapped_layout_and_lengths():
    cfg = AudioConfig.tiny(ds_kernel_size=5, ds_stride=3)
    model = _random_tower(cfg)
    lengths = np.array([[9, 0, 0], [4, 11, 1]])
    feats = np.random.default_rng(1).standard_normal((2, 17, cfg.encoder.n_mels)).astype(np.float32)
    out = encode_audio(model, feats, lengths)
    want = np.array([[cfg.output_frames(9), 0, 0], [cfg.output_frames(4), cfg.output_frames(11), 1]])
    assert out.lengths.dtype == np.int64 and np.array_equal(out.lengths, want)
    width = int(want.sum(1).max())
    assert out.embeds.shape == (2, width, cfg.out_dim)
    assert out.encoder_padded.shape == (4, cfg.encoder_frames(11), cfg.encoder.n_state)
    # Row 0 is right-padded with zeros; every real frame has unit norm.
    norms = np.linalg.norm(np.asarray(out.embeds), axis=-1)
    valid = np.arange(width)[None, :] < want.sum(1)[:, None]
    numerics.assert_close("unit norm", norms[valid], np.ones(valid.sum()))
    assert not np.asarray(out.embeds)[~valid].any()


def test_equal_length_clips_are_independent():
    """Without padding (equal clips) a clip's features do not depend on the other clips of the batch."""
    cfg = AudioConfig.tiny()
    model = _random_tower(cfg)
    feats = np.random.default_rng(2).standard_normal((1, 22, cfg.encoder.n_mels)).astype(np.float32)
    both = encode_audio(model, feats, [[11, 11]])
    alone = encode_audio(model, feats[:, 11:], [[11]])
    n = cfg.output_frames(11)
    numerics.assert_close("second clip", np.asarray(both.embeds)[:, n:], alone.embeds)


def test_bfloat16_run_is_close_to_float32():
    cfg = AudioConfig.tiny()
    model = _random_tower(cfg)
    feats = np.random.default_rng(3).standard_normal((1, 30, cfg.encoder.n_mels)).astype(np.float32)
    ref = encode_audio(model, feats, [[17, 13]])
    low = _random_tower(cfg, runtime=Runtime(dtype="bfloat16"))
    out = encode_audio(low, jnp.asarray(feats, jnp.bfloat16), [[17, 13]])
    assert out.embeds.dtype == jnp.bfloat16
    numerics.assert_close("bf16 embeds", np.asarray(out.embeds, np.float32), ref.embeds, dtype="bfloat16")


@pytest.mark.parametrize("feats_shape, lengths, match", [
    ((1, 20, 8), [[20]], "16"),  # wrong n_mels
    ((1, 20, 16), [[12, 9]], "only 20"),  # lengths longer than the features
    ((1, 20, 16), [[5, 0, 3]], "follows a 0"),
    ((1, 20, 16), [[5, -1]], ">= 0"),
    ((1, 20, 16), [[0, 0]], "no clip"),
    ((1, 20, 16), [12, 3], "integer array"),  # 1-D lengths
    ((1, 20, 16), [[2.0, 3.0]], "integer array"),
    ((2, 20, 16), [[12, 3]], "batch size"),
    ((1, 140, 16), [[130]], "n_ctx"),  # 65 encoder frames > n_ctx 64
    ((20, 16), [[20]], "mel features"),
])
def test_bad_input_raises(feats_shape, lengths, match):
    model = _random_tower(AudioConfig.tiny())
    with pytest.raises(ValueError, match=match):
        encode_audio(model, np.zeros(feats_shape, np.float32), np.asarray(lengths))


def test_layout_rejects_overlong_row_even_with_padding_frames():
    cfg = AudioConfig.tiny()
    with pytest.raises(ValueError, match="row 1"):
        clip_layout(np.array([[3, 0], [10, 11]]), 20, cfg)


def test_fresh_init_sharding_names_and_positions():
    cfg = AudioConfig.tiny()
    model = nnx.jit(lambda: AudioTower(cfg, rngs=nnx.Rngs(0)))()
    numerics.assert_close("fresh positional table", model.encoder.positional_embedding[...],
                          sinusoids(cfg.encoder.n_ctx, cfg.encoder.n_state))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = logical_axes(var)
        assert len(axes) == var.value.ndim, path
        named = [a for a in axes if a is not None]
        assert len(named) == len(set(named)), f"{path}: logical axis used twice {axes}"
    assert logical_axes(model.encoder.blocks.attn.q_kernel)[0] == "layers"
