"""Image generation in release folders and converted checkpoints: the sub-folders (mlp/, connector/, transformer/,
vae/, scheduler/) are read with the same completeness checks as the rest, convert to orbax and back bit-exactly,
load onto a mesh, and the loaded generator equals the one built from the same tensors in memory."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ming_jax import weights
from ming_jax.checkpoint import convert, export, folders
from ming_jax.checkpoint import restore
from ming_jax.checkpoint.safetensors import CheckpointError
from ming_jax.config.image_gen import ImageGenConfig
from ming_jax.config.llm import LLMConfig
from ming_jax.config.omni import OmniConfig
from ming_jax.gen import image as image_gen
from ming_jax.models import registry
from ming_jax.weights.table import WeightError

QUIET = dict(progress=False, log=lambda msg: None)
# Where each sub-folder's weights go and under which file name (as the release ships them).
FILES = {"mlp": "model.safetensors", "connector": "model.safetensors",
         "transformer": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def tiny_config() -> tuple[OmniConfig, ImageGenConfig]:
    llm = LLMConfig.tiny(image_patch_token=990, image_start_token=991, video_start_token=992, video_patch_token=993)
    return OmniConfig(llm=llm, vision=None, audio=None), ImageGenConfig.tiny()


def _folder_of(name: str) -> str:
    for folder, prefix in sorted(registry.IMAGE_GEN_WEIGHT_FOLDERS.items(), key=lambda kv: -len(kv[1])):
        if name.startswith(prefix):
            return folder
    raise AssertionError(name)


def write_image_release(path, *, dtype=ml_dtypes.bfloat16, seed=0) -> dict:
    """A tiny omni release (LLM only) with complete image-generation sub-folders; written with the safetensors
    library, names produced by the registry's tables from random arrays. Returns {joined name: array}."""
    omni_cfg, ig = tiny_config()
    rng = np.random.default_rng(seed)
    parts = registry.describe(omni_cfg.to_official(), sections=ig.to_official())
    tensors = {}
    for part in parts.values():
        arrays = {p: rng.standard_normal(s).astype(np.float32) for p, s in part.shapes.items()}
        tensors.update({k: v.astype(dtype) for k, v in weights.export_arrays(part.table, arrays).items()})
    os.makedirs(path, exist_ok=True)
    main = {k: v for k, v in tensors.items() if parts["llm"].owns(k)}
    save_file(main, os.path.join(path, "model.safetensors"))
    json.dump(dict(omni_cfg.to_official(), torch_dtype="bfloat16"), open(os.path.join(path, "config.json"), "w"))
    for folder, rel in registry.IMAGE_GEN_CONFIG_FILES.items():
        os.makedirs(os.path.join(path, folder), exist_ok=True)
        json.dump(ig.to_official()[folder], open(os.path.join(path, rel), "w"))
    for folder, prefix in registry.IMAGE_GEN_WEIGHT_FOLDERS.items():
        group = {k[len(prefix):]: v for k, v in tensors.items() if parts["image_gen"].owns(k) and _folder_of(k) == folder}
        save_file(group, os.path.join(path, folder, FILES[folder]))
    return tensors


@pytest.fixture(scope="module")
def image_release(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("image_release"))
    return path, write_image_release(path)


def test_release_folders_load_strictly(image_release):
    path, tensors = image_release
    loaded = restore.load(path, components=["llm", "image_gen"])
    assert set(loaded.parts) == {"llm", "image_gen"}
    gen = image_gen.from_loaded(loaded)
    assert gen.cfg == ImageGenConfig.tiny()
    state = {**weights.export_state_dict(gen.head, _sub(loaded, "image_head")),
             **weights.export_state_dict(gen.dit, _sub(loaded, "dit")),
             **weights.export_state_dict(gen.vae, _sub(loaded, "vae"))}
    want = {k: v for k, v in tensors.items() if loaded.parts["image_gen"].owns(k)}
    assert set(state) == set(want)
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(v).astype(want[k].dtype), want[k], err_msg=k)
    assert str(np.asarray(gen.dit.x_embed[0].kernel.get_value()).dtype) == "bfloat16"  # the release's dtype kept


def _sub(loaded, key):
    """The registry table's rules for one subtree, with our paths relative to it."""
    part = loaded.parts["image_gen"]
    rules = [r for r in part.table.rules if r.ours.startswith(key + ".")]
    import dataclasses
    return weights.Table([dataclasses.replace(r, ours=r.ours[len(key) + 1:]) for r in rules], part.table.tied)


def test_incomplete_or_corrupt_folders_are_named(image_release, tmp_path):
    path, _ = image_release
    bad = tmp_path / "no_vae"
    write_image_release(str(bad))
    os.remove(bad / "vae" / "config.json")
    assert "vae/config.json" in folders.image_gen_problem(str(bad))
    loaded = restore.load(str(bad), components=["llm"])  # the understanding part still loads
    assert set(loaded.parts) == {"llm"}
    with pytest.raises(Exception, match="image_gen"):
        restore.load(str(bad), components=["image_gen"])
    with pytest.raises(convert.ConversionError, match="vae/config.json"):
        convert.plan_conversion(str(bad), components=["llm", "image_gen"])
    trunc = tmp_path / "truncated"
    write_image_release(str(trunc))
    f = trunc / "transformer" / FILES["transformer"]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        restore.load(str(trunc), components=["image_gen"])
    missing = tmp_path / "missing"
    write_image_release(str(missing))
    group = load_file(missing / "connector" / FILES["connector"])
    group.pop(sorted(group)[0])
    save_file(group, missing / "connector" / FILES["connector"])
    with pytest.raises(WeightError, match="missing"):
        restore.load(str(missing), components=["image_gen"])


def test_convert_export_round_trip_and_sharded_load(image_release, tmp_path):
    path, tensors = image_release
    plan = convert.plan_conversion(path)
    assert plan.components == ["llm", "image_gen"]
    assert plan.skipped_folders == []  # every sub-folder is used (scheduler/: its config)
    dst = str(tmp_path / "ckpt")
    convert.convert(path, dst, **QUIET)
    for rel in registry.IMAGE_GEN_CONFIG_FILES.values():  # a converted checkpoint describes itself
        assert os.path.isfile(os.path.join(dst, rel))
    back = str(tmp_path / "back")
    export.export_official(dst, back, **QUIET)
    got = load_file(os.path.join(back, "model.safetensors")) if os.path.exists(
        os.path.join(back, "model.safetensors")) else {}
    index = json.load(open(os.path.join(back, "model.safetensors.index.json")))
    for shard in set(index["weight_map"].values()):
        got.update(load_file(os.path.join(back, shard)))
    for folder, prefix in registry.IMAGE_GEN_WEIGHT_FOLDERS.items():
        got.update({prefix + k: v for k, v in load_file(os.path.join(back, folder, FILES[folder])).items()})
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    for rel in registry.IMAGE_GEN_CONFIG_FILES.values():
        assert json.load(open(os.path.join(back, rel))) == json.load(open(os.path.join(path, rel)))
    assert set(restore.load(back, components=["image_gen"]).parts) == {"image_gen"}  # a release again


def test_loaded_generator_runs(image_release):
    path, _ = image_release
    gen = image_gen.from_loaded(restore.load(path, components=["llm", "image_gen"], dtype="float32"))
    inputs = image_gen.prepare_condition(gen.thinker.cfg, gen.head, np.array([[3, 4, 5]]))
    images = image_gen.generate(gen, inputs, height=16, width=16, steps=2, seed=1)
    assert images.shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="image_gen"):
        image_gen.from_loaded(restore.load(path, components=["llm"]))


def test_release_with_a_glyph_folder_converts_and_renders_text(tmp_path):
    """byt5/ travels with the conversion (as the release's files), loads from both formats, and a prompt that
    quotes text gets the ByT5 rows."""
    from ming_jax.checkpoint import glyph as glyph_ckpt
    from test_glyph_checkpoint import write_glyph_folder

    src = str(tmp_path / "release")
    write_image_release(src, dtype=np.float32)
    write_glyph_folder(src, channels=ImageGenConfig.tiny().head.diffusion_c_input_dim)
    plan = convert.plan_conversion(src)
    assert plan.skipped_folders == []  # byt5/ is used, not skipped
    dst = str(tmp_path / "ckpt")
    convert.convert(src, dst, **QUIET)
    assert glyph_ckpt.has_glyph(dst)
    gen = image_gen.from_loaded(restore.load(dst, components=["llm", "image_gen"]), glyph_ckpt.load_glyph(dst))
    text = '<role>HUMAN</role>a sign that says "OPEN"<|role_end|>'
    inputs = image_gen.prepare_condition(gen.thinker.cfg, gen.head, np.array([[3, 4, 5]]), glyph=gen.glyph,
                                         prompt_texts=[text])
    assert inputs.glyph_ids is not None
    caption, _ = gen.captions(inputs)
    assert caption.shape[1] == gen.cfg.head.img_gen_scales[-1] ** 2 + gen.glyph.config.max_length
    back = str(tmp_path / "back")
    export.export_official(dst, back, **QUIET)
    assert glyph_ckpt.has_glyph(back)  # the reverse export writes it back too


def test_bad_image_configs_never_block_the_understanding_part(tmp_path):
    src = tmp_path / "release"
    write_image_release(str(src))
    cfg = json.load(open(src / "mlp" / "config.json"))
    json.dump(dict(cfg, dit_type="sd3"), open(src / "mlp" / "config.json", "w"))  # a DiT we do not implement
    assert set(restore.load(str(src), components=["llm"]).parts) == {"llm"}
    assert set(restore.load(str(src)).parts) == {"llm"}  # "everything" = what can be built
    with pytest.raises(Exception, match="sd3"):
        restore.load(str(src), components=["image_gen"])
    plan = convert.plan_conversion(str(src))
    assert plan.components == ["llm"] and "sd3" in plan.broken["image_gen"] and "sd3" in plan.summary()


def test_llm_only_conversion_exports_a_loadable_release(image_release, tmp_path):
    path, tensors = image_release
    dst = str(tmp_path / "ckpt")
    convert.convert(path, dst, components=["llm"], **QUIET)
    assert not os.path.exists(os.path.join(dst, "mlp"))  # no image-generation configs without their weights
    back = str(tmp_path / "back")
    export.export_official(dst, back, **QUIET)
    assert set(restore.load(back).parts) == {"llm"}


def test_sub_folder_index_must_match_its_shards(tmp_path):
    src = tmp_path / "release"
    write_image_release(str(src))
    tdir = src / "transformer"
    group = load_file(tdir / FILES["transformer"])
    os.remove(tdir / FILES["transformer"])
    names = sorted(group)
    half = len(names) // 2
    save_file({n: group[n] for n in names[:half]}, tdir / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({n: group[n] for n in names[half:]}, tdir / "diffusion_pytorch_model-00002-of-00002.safetensors")
    wm = {n: f"diffusion_pytorch_model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}
    index = tdir / "diffusion_pytorch_model.safetensors.index.json"
    json.dump({"weight_map": wm}, open(index, "w"))
    assert set(restore.load(str(src), components=["image_gen"]).parts) == {"image_gen"}  # a sharded DiT loads
    wm[names[0]] = "diffusion_pytorch_model-00002-of-00002.safetensors"  # the index lies about one tensor
    json.dump({"weight_map": wm}, open(index, "w"))
    with pytest.raises(CheckpointError, match="does not match the shards"):
        restore.load(str(src), components=["image_gen"])


def test_missing_scheduler_is_named(tmp_path):
    src = tmp_path / "release"
    write_image_release(str(src))
    os.remove(src / "scheduler" / "scheduler_config.json")
    assert "scheduler" in folders.image_gen_problem(str(src))
