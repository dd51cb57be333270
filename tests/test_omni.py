"""The omni model: golden `full_mm_forward` parity, the public forward / generate API, the omni weight table
(coverage, strictness, round trip on the golden weights, release-folder loading), deepstack, config, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from ming_jax.gen import text as generation, omni
from ming_jax.parity import golden, numerics, run as parity
from ming_jax.checkpoint import release as official
from ming_jax import weights
from ming_jax.config.base import ConfigError
from ming_jax.config.omni import OmniConfig
from ming_jax.config.modality import AUDIO, VISION
from ming_jax.parity.cases import full_mm_forward
from ming_jax.processors import prompt as P
from ming_jax.models.registry import omni_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def case(golden_dir):
    return golden.load_case(str(golden_dir / "full_mm_forward"))


@pytest.fixture(scope="module")
def model(case):
    return full_mm_forward.build(case)


# --- parity ---------------------------------------------------------------------------------------------------------


def test_full_mm_forward_golden_parity(golden_dir):
    rows = parity.run_case(str(golden_dir / "full_mm_forward"))
    bad = [r for r in rows if not r.ok]
    assert not bad, numerics.report(bad)
    assert {"image_embeds", "video_embeds", "audio_embeds", "logits", "position_ids"} <= {r.name for r in rows}


def test_forward_api_matches_golden(model, case):
    out = omni.forward(model, full_mm_forward.inputs_of(case), collect=True)
    want = case.outputs
    numerics.assert_close("logits", out.logits, want["logits"])
    numerics.assert_close("embeddings", out.embeddings, want["embeddings"])
    numerics.assert_close("audio_embeds", out.media.audio.embeds, want["audio_embeds"])
    numerics.assert_close("position_ids", out.prepared.positions, want["position_ids"])
    assert out.media.image_deepstack is None  # the release's tower runs without deepstack


def test_generate_starts_from_the_forward_logits(model, case):
    inputs = full_mm_forward.inputs_of(case)
    gen = generation.as_numpy(omni.generate(model, inputs, generation.SamplingConfig(max_new_tokens=3),
                                            return_logits=True))
    assert gen.tokens.shape == (1, 3)
    numerics.assert_close("first_step_logits", gen.step_logits[0, 0], case.outputs["logits"][0, -1])
    assert gen.tokens[0, 0] == np.argmax(case.outputs["logits"][0, -1])


def test_deepstack_is_exposed_but_not_injected(model, case):
    cfg = model.cfg
    deep = omni.load(cfg, case.weights, deepstack=True)
    inputs = full_mm_forward.inputs_of(case)
    media = omni.encode_media(deep, inputs)
    plain = omni.encode_media(model, inputs)
    n_img, n_vid = plain.image_embeds.shape[0], plain.video_embeds.shape[0]
    assert [d.shape for d in media.image_deepstack] == [(n_img, cfg.vision.out_hidden_size)] * len(
        cfg.vision.deepstack_visual_indexes)
    assert [d.shape for d in media.video_deepstack] == [(n_vid, cfg.vision.out_hidden_size)] * len(
        cfg.vision.deepstack_visual_indexes)
    # What the LLM gets does not change (up to float rounding: the tower's scan is split at the taps).
    numerics.assert_close("image_embeds", media.image_embeds, plain.image_embeds)
    numerics.assert_close("video_embeds", media.video_embeds, plain.video_embeds)


def test_prompt_builder_output_runs_through_the_model(model, tmp_path):
    """A prompt built by the processors (stand-in tokenizer with the case's ids) drives the official layout: the
    router masks and audio spans land on the placeholder tokens."""
    tok = P.StandInTokenizer(P.tiny_special_ids(model.cfg.llm))
    builder = P.PromptBuilder.for_model(tok, model.cfg)
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    wav = (0.1 * np.random.default_rng(1).standard_normal(7360)).astype(np.float32)
    x = builder.build([{"role": "HUMAN", "content": [{"type": "image", "image": img},
                                                     {"type": "audio", "audio": (wav, 16000)},
                                                     {"type": "text", "text": "Describe both."}]}])
    out = omni.forward(model, x)
    ids = x.input_ids[0]
    assert out.logits.shape == (1, ids.size, model.cfg.llm.vocab_size) and np.isfinite(out.logits).all()
    modality = out.prepared.modality[0]
    np.testing.assert_array_equal(modality == VISION, ids == model.cfg.llm.image_patch_token)
    np.testing.assert_array_equal(modality == AUDIO, ids == tok.token_id("<audioPatch>"))


def test_bad_inputs(case):
    abstract = omni.create_abstract(OmniConfig.from_official(case.config))
    x = full_mm_forward.inputs_of(case)
    with pytest.raises(ValueError, match="only the pixel values"):
        omni.encode_media(abstract, omni.OmniInputs(x.input_ids, pixel_values=x.pixel_values))
    with pytest.raises(ValueError, match="need audio_feats_lengths"):
        omni.encode_media(abstract, omni.OmniInputs(x.input_ids, audio_feats=x.audio_feats))
    no_towers = omni.create_abstract(OmniConfig.tiny(audio=None, vision=None))
    with pytest.raises(ValueError, match="no audio tower"):
        omni.encode_media(no_towers, omni.OmniInputs(x.input_ids, audio_feats=x.audio_feats,
                                                     audio_feats_lengths=x.audio_feats_lengths))
    with pytest.raises(ValueError, match="no vision tower"):
        omni.encode_media(no_towers, omni.OmniInputs(x.input_ids, pixel_values=x.pixel_values,
                                                     image_grid_thw=x.image_grid_thw))
    with pytest.raises(ValueError, match="audio_placeholder_loc_lens"):
        omni.prepare(abstract, omni.OmniInputs(x.input_ids), omni.MediaFeatures(audio=object()))


# --- weights ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    OmniConfig.tiny(), OmniConfig.tiny(audio=None), OmniConfig.tiny(vision=None), OmniConfig.tiny(mlp_depth=3),
    OmniConfig.ming_flash_omni_2(),
], ids=["tiny", "no_audio", "no_vision", "mlp_depth_3", "release"])
def test_table_covers_every_parameter(cfg):
    table = omni_table(cfg)
    table.check_coverage(weights.param_shapes(omni.create_abstract(cfg)))
    names = table.expected_names()
    assert len(names) == len(set(names))
    prefixes = {n.split(".")[0] for n in names}
    assert prefixes == {"model"} | ({"vision", "linear_proj"} if cfg.vision else set()) | (
        {"audio", "linear_proj_audio"} if cfg.audio else set())


def test_round_trip_golden_weights(model, case):
    exported = weights.export_state_dict(model, omni_table(model.cfg))
    assert sorted(exported) == sorted(case.weights)
    for name, value in case.weights.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_loading_is_strict(case):
    cfg = OmniConfig.from_official(case.config)
    missing = dict(case.weights)
    del missing["vision.deepstack_merger_list.1.norm.weight"]
    with pytest.raises(weights.WeightError, match=r"missing.*vision\.deepstack_merger_list\.1\.norm\.weight"):
        omni.load(cfg, missing)
    extra = dict(case.weights, **{"talker.proj.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(weights.WeightError, match=r"unexpected.*talker\.proj\.weight"):
        omni.load(cfg, extra)
    bad_shape = dict(case.weights, **{"linear_proj.0.bias": np.zeros((3,), np.float32)})
    with pytest.raises(weights.WeightError, match="linear_proj.0.bias"):
        omni.load(cfg, bad_shape)


def test_load_omni_from_a_release_folder(case, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(case.config))
    names = sorted(case.weights)
    save_file({n: case.weights[n] for n in names[:100]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: case.weights[n] for n in names[100:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    loaded = official.load_omni(str(tmp_path))
    exported = weights.export_state_dict(loaded, omni_table(loaded.cfg))
    for name in names:
        np.testing.assert_array_equal(exported[name], case.weights[name], err_msg=name)
    llm_only = tmp_path / "llm_only"
    llm_only.mkdir()
    (llm_only / "config.json").write_text(json.dumps(case.config["llm_config"]))
    with pytest.raises(official.CheckpointError, match="not an omni config"):
        official.load_omni(str(llm_only))


# --- config ----------------------------------------------------------------------------------------------------------


def test_preset_equals_release_config(reference_dir):
    raw = json.loads((reference_dir / "config.json").read_text())
    preset = OmniConfig.ming_flash_omni_2()
    assert OmniConfig.from_official(raw) == preset
    assert preset.mlp_depth == raw["mlp_depth"] == 2
    assert preset.audio.out_dim == preset.llm.hidden_size == raw["llm_config"]["hidden_size"]
    assert preset.vision.out_hidden_size == raw["vision_config"]["out_hidden_size"]
    assert preset.audio.encoder.n_layer == raw["audio_config"]["whisper_encoder_config"]["n_layer"]


def test_tiny_is_the_golden_configuration(case):
    assert OmniConfig.from_official(case.config) == OmniConfig.tiny(audio=dict(n_ctx=300))


def test_official_round_trip():
    for cfg in (OmniConfig.tiny(), OmniConfig.tiny(audio=None), OmniConfig.ming_flash_omni_2()):
        assert OmniConfig.from_official(cfg.to_official()) == cfg


def test_config_errors(case):
    with pytest.raises(ConfigError, match="mlp_dept"):
        OmniConfig.from_official(dict(case.config, mlp_dept=2))
    with pytest.raises(ConfigError, match="model_type"):
        OmniConfig.from_official(dict(case.config, model_type="qwen2_vl"))
    with pytest.raises(ConfigError, match="llm_config"):
        OmniConfig.from_official({k: v for k, v in case.config.items() if k != "llm_config"})
    with pytest.raises(ConfigError, match="num_hiden_layers"):
        OmniConfig.from_official(dict(case.config, llm_config=dict(case.config["llm_config"], num_hiden_layers=2)))
    tiny = OmniConfig.tiny()
    with pytest.raises(ConfigError, match="audio.mlp_depth"):
        OmniConfig(tiny.llm, tiny.vision, tiny.audio.replace(mlp_depth=3), mlp_depth=2)
    with pytest.raises(ConfigError, match="out_dim"):
        OmniConfig(tiny.llm, tiny.vision, tiny.audio.replace(out_dim=64), mlp_depth=2)
    with pytest.raises(ConfigError, match="absent audio"):
        OmniConfig.tiny(audio=None).replace(audio=dict(n_layer=1))
    assert OmniConfig.from_official(dict(case.config, audio_config=None)).audio is None
    assert OmniConfig.tiny(llm=dict(hidden_size=64)).audio.out_dim == 64  # the projector width follows the LLM


# --- CLI --------------------------------------------------------------------------------------------------------------


def test_cli_runs_the_tiny_omni_model(tmp_path):
    import soundfile
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    soundfile.write(tmp_path / "b.wav", 0.1 * np.sin(np.arange(8000) / 5.0), 16000)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "ming_jax.generate", "--image", str(tmp_path / "a.png"), "--audio",
                        str(tmp_path / "b.wav"), "--prompt", "What is this?", "--max_new_tokens", "2"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "TINY OMNI preset with RANDOM weights" in r.stderr
    assert "1 image(s), 0 video temporal patch(es), 1 audio clip(s)" in r.stderr
    assert "+++ " in r.stdout
    bad = subprocess.run([sys.executable, "-m", "ming_jax.generate", "--image", str(tmp_path / "none.png")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "file not found" in bad.stderr
