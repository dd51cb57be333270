"""Speech generation in release folders and converted checkpoints: the release's talker/ folder (config.json +
model.safetensors, llm/, vae/, campplus.onnx, data/) is one registry component ("talker": subtrees talker and
audio_vae), read with the same completeness checks as the rest, converted to orbax and exported back bit-exactly
(the rope buffers included), its non-weight files kept; a bare talker folder is a release of its own."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ming_jax import weights
from ming_jax.checkpoint import convert, export, folders, restore
from ming_jax.checkpoint.safetensors import CheckpointError
from ming_jax.config.base import ConfigError
from ming_jax.config.llm import LLMConfig
from ming_jax.config.omni import OmniConfig
from ming_jax.config.speech import SpeechConfig
from ming_jax.models import registry
from ming_jax.models.talker import talker as tk
from ming_jax.weights.talker import load_talker
from ming_jax.weights.table import WeightError, param_arrays

QUIET = dict(progress=False, log=lambda msg: None)
EXTRA_FILES = {"llm/tokenizer.json": '{"version": "1.0"}', "campplus.onnx": "not really onnx",
               "data/voice_name.json": '{"DB30": {"prompt_text": "hi", "prompt_wav_path": "data/spks/prompt.wav"}}',
               "data/spks/prompt.wav": "RIFF"}


def _write_talker(folder: str, speech: SpeechConfig, tensors: dict, prefix: str) -> None:
    """The talker folder as the release ships it: its own names in model.safetensors, the VAE's in vae/."""
    sections = speech.to_official()
    for key, rel in registry.TALKER_CONFIG_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        json.dump(dict(sections[key], torch_dtype="bfloat16"), open(os.path.join(folder, rel), "w"))
    vae = prefix + registry.TALKER_VAE_PREFIX
    save_file({k[len(prefix):]: v for k, v in tensors.items() if not k.startswith(vae)},
              os.path.join(folder, "model.safetensors"))
    save_file({k[len(vae):]: v for k, v in tensors.items() if k.startswith(vae)},
              os.path.join(folder, "vae", "model.safetensors"))
    for rel, text in EXTRA_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
        open(os.path.join(folder, rel), "w").write(text)


def _random_tensors(part: registry.Part, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {p: rng.standard_normal(s).astype(np.float32) for p, s in part.shapes.items()}
    return {k: (v if k.endswith("inv_freq") else v.astype(ml_dtypes.bfloat16))
            for k, v in weights.export_arrays(part.table, arrays).items()}


def write_talker_release(path: str, *, seed: int = 0) -> dict:
    """A tiny omni release (LLM only) with a complete talker/ folder. Returns {joined name: array}."""
    llm = LLMConfig.tiny(image_patch_token=990, image_start_token=991, video_start_token=992, video_patch_token=993)
    omni_cfg, speech = OmniConfig(llm=llm, vision=None, audio=None), SpeechConfig.tiny()
    parts = registry.describe(omni_cfg.to_official(), speech=speech.to_official())
    tensors = {}
    for i, part in enumerate(parts.values()):
        tensors.update(_random_tensors(part, seed + i))
    os.makedirs(path, exist_ok=True)
    save_file({k: v for k, v in tensors.items() if parts["llm"].owns(k)}, os.path.join(path, "model.safetensors"))
    json.dump(dict(omni_cfg.to_official(), torch_dtype="bfloat16"), open(os.path.join(path, "config.json"), "w"))
    _write_talker(os.path.join(path, registry.TALKER_FOLDER), speech,
                  {k: v for k, v in tensors.items() if parts["talker"].owns(k)}, registry.TALKER_PREFIX)
    return tensors


@pytest.fixture(scope="module")
def talker_release(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("talker_release"))
    return path, write_talker_release(path)


def _own_names(tensors: dict, prefix: str) -> dict:
    """The talker's tensors under its own (BailingTalker2) names."""
    vae = prefix + registry.TALKER_VAE_PREFIX
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and not k.startswith(vae)}


def test_release_talker_loads_strictly(talker_release):
    path, tensors = talker_release
    assert folders.talker_dir(path) == os.path.join(path, "talker")
    loaded = restore.load(path, components=["talker"])
    assert set(loaded.modules) == {"talker", "audio_vae"} and loaded.parts["talker"].config == SpeechConfig.tiny()
    talker = loaded.modules["talker"]
    assert talker.llm.embed.get_value().dtype == np.dtype(ml_dtypes.bfloat16)  # the release's dtype
    # the same tensors through the talker's own loader give the same parameters
    ref = load_talker(tk.create_abstract(SpeechConfig.tiny().talker),
                      {k: np.asarray(v, np.float32) for k, v in _own_names(tensors, registry.TALKER_PREFIX).items()})
    got, want = param_arrays(talker), param_arrays(ref)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), err_msg=k)
    # everything the folder holds is the default
    assert set(restore.load(path).parts) == {"llm", "talker"}


def test_convert_and_export_round_trip(talker_release, tmp_path):
    path, tensors = talker_release
    dst, back = str(tmp_path / "converted"), str(tmp_path / "exported")
    manifest = convert.convert(path, dst, components=["talker"], **QUIET)
    assert manifest.components == ["talker"]
    for rel in EXTRA_FILES:  # tokenizer, speaker model, voices: kept at their release paths
        assert os.path.isfile(os.path.join(dst, "talker", rel)), rel
    assert folders.talker_dir(dst) == os.path.join(dst, "talker")
    loaded = restore.load(dst, components=["talker"])
    assert loaded.parts["talker"].config == SpeechConfig.tiny()
    export.export_official(dst, back, **QUIET)
    for folder in ("talker", "talker/vae"):
        got = load_file(os.path.join(back, folder, "model.safetensors"))
        want = load_file(os.path.join(path, folder, "model.safetensors"))
        assert set(got) == set(want), folder
        for k in want:  # bit-exact, the rope buffers included (written back from the config)
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k].view(np.uint8), want[k].view(np.uint8)), k
    assert set(restore.load(back, components=["talker"]).modules) == {"talker", "audio_vae"}


def test_bare_talker_folder_is_a_release(talker_release, tmp_path):
    path, tensors = talker_release
    bare = str(tmp_path / "talker_only")
    _write_talker(bare, SpeechConfig.tiny(), {k: v for k, v in tensors.items() if k.startswith("talker.")},
                  registry.TALKER_PREFIX)
    os.replace(os.path.join(bare, "config.json"), os.path.join(bare, "config.json"))
    assert registry.release_kind(json.load(open(os.path.join(bare, "config.json")))) == "talker"
    assert folders.talker_dir(bare) == bare
    loaded = restore.load(bare)
    assert set(loaded.parts) == {"talker"}
    a = param_arrays(loaded.modules["audio_vae"])
    b = param_arrays(restore.load(path, components=["talker"]).modules["audio_vae"])
    assert all(np.array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32)) for k in a)
    dst = str(tmp_path / "bare_converted")
    convert.convert(bare, dst, **QUIET)
    assert os.path.isfile(os.path.join(dst, "llm", "tokenizer.json")) and folders.talker_dir(dst) == dst
    assert set(restore.load(dst).parts) == {"talker"}


def test_bad_talker_folders_are_named(talker_release, tmp_path):
    path, _ = talker_release
    broken = str(tmp_path / "broken")
    write_talker_release(broken, seed=1)
    os.remove(os.path.join(broken, "talker", "vae", "config.json"))
    assert "talker/vae/config.json" in folders.talker_problem(broken)
    assert set(restore.load(broken).parts) == {"llm"}  # an incomplete talker never blocks the LLM
    with pytest.raises(ConfigError, match="not in this release"):
        restore.load(broken, components=["talker"])
    with pytest.raises(CheckpointError, match="incomplete talker folder"):
        folders.talker_sections(broken, required=True)

    # a talker config that does not fit its own VAE: the talker is refused, naming why; the LLM still loads
    bad = str(tmp_path / "bad_config")
    write_talker_release(bad, seed=2)
    vae_cfg = json.load(open(os.path.join(bad, "talker", "vae", "config.json")))
    vae_cfg["dec_kwargs"]["latent_dim"] = 3
    json.dump(vae_cfg, open(os.path.join(bad, "talker", "vae", "config.json"), "w"))
    with pytest.raises(ConfigError, match="latent_dim=3"):
        restore.load(bad, components=["talker"])
    assert set(restore.load(bad).parts) == {"llm"}

    # a rope buffer that is not what the config implies, and a missing tensor
    wrong = str(tmp_path / "wrong_buffer")
    tensors = write_talker_release(wrong, seed=3)
    own = load_file(os.path.join(wrong, "talker", "model.safetensors"))
    del own["stop_head.bias"]
    save_file(own, os.path.join(wrong, "talker", "model.safetensors"))
    with pytest.raises(WeightError, match="missing tensor.*talker.stop_head.bias"):
        restore.load(wrong, components=["talker"])
    own["stop_head.bias"] = np.asarray(tensors["talker.stop_head.bias"])
    own["aggregator.rotary_embed.inv_freq"] = 2 * own["aggregator.rotary_embed.inv_freq"]
    save_file(own, os.path.join(wrong, "talker", "model.safetensors"))
    with pytest.raises(WeightError, match="inv_freq"):
        restore.load(wrong, components=["talker"])
    with pytest.raises(WeightError, match="inv_freq"):
        convert.plan_conversion(wrong, components=["talker"])
    assert not registry.PLANNED  # every part of the release is implemented: nothing reported as planned
