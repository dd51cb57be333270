"""The converter (`ming_jax.checkpoint.convert`), our checkpoint format and its loaders (`ming_jax.checkpoint`).

Round trips torch -> orbax -> torch on every golden case with weights and on a synthetic omni release holding the
complete official name set at tiny sizes; the converted checkpoints restore with plain orbax and with our loaders
and reproduce the golden outputs; every kind of broken source fails with an error that names the problem and
leaves nothing at the destination; an interrupted conversion resumes. Multi-device restore: a subprocess with 8
host CPU devices.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file
import xla_env

from ming_jax.checkpoint import convert, export
from ming_jax.checkpoint import manifest as mf
from ming_jax.checkpoint import restore as checkpoint
from ming_jax.parity import golden, numerics
from ming_jax.models import inputs as multimodal
from ming_jax.gen import omni
from ming_jax import weights
from ming_jax.models.audio import encode_audio
from ming_jax.config.audio import AudioConfig
from ming_jax.config.llm import LLMConfig
from ming_jax.config.omni import OmniConfig
from ming_jax.config.runtime import Runtime
from ming_jax.config.vision import VisionConfig
from ming_jax.parity.cases import llm_backbone
from ming_jax.weights.llm import llm_table
from ming_jax.models.registry import omni_table
from ming_jax.models.vision import as_grid, vision_forward

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["llm_backbone", "vision_encoder", "audio_encoder", "full_mm_forward"]
QUIET = dict(progress=False, log=lambda msg: None)


def copy_case(golden_dir, case: str, dst) -> str:
    """The case's release-like part (config.json + weights) in a scratch folder: golden data stays untouched."""
    os.makedirs(dst, exist_ok=True)
    for f in ("config.json", "weights.safetensors"):
        shutil.copyfile(golden_dir / case / f, os.path.join(dst, f))
    return str(dst)


def assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), f"{k} differs"


def assert_same_values(got: dict, want: dict):
    """Bit-exact after casting to the source dtype (a loaded model may keep some parameters, e.g. router biases,
    in float32: bf16 -> f32 -> bf16 is exact)."""
    assert_same_tensors({k: np.asarray(v).astype(want[k].dtype) for k, v in got.items()}, want)


def read_release(path) -> dict:
    index = json.load(open(os.path.join(path, convert.INDEX_FILE)))
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(os.path.join(path, shard)))
    assert sorted(out) == sorted(index["weight_map"])
    return out


# --- a synthetic omni release: the complete official name set of every implemented component ------------------------


def tiny_omni_config() -> OmniConfig:
    llm = LLMConfig.tiny()
    return OmniConfig(llm=llm, vision=VisionConfig.tiny(out_hidden_size=96),
                      audio=AudioConfig.tiny(out_dim=llm.hidden_size, mlp_depth=2), mlp_depth=2)


@pytest.fixture(scope="module")
def omni_release(tmp_path_factory):
    """(folder, config, {official name: bf16 array}): a bf16 release in 4 shards with an index, plus sub-folders the
    converter must skip. Names and arrays come from a random tiny OmniModel through the tables."""
    cfg = tiny_omni_config()
    rng = np.random.default_rng(1)
    params = {p: rng.standard_normal(s, np.float32)  # a random tiny model (random init of the real one is slow)
              for p, s in weights.param_shapes(omni.create_abstract(cfg)).items()}
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.export_arrays(omni_table(cfg), params).items()}
    assert sorted(tensors) == sorted(omni_table(cfg).expected_names())
    path = tmp_path_factory.mktemp("omni_release")
    write_release(path, cfg.to_official(), tensors, n_shards=4)
    os.makedirs(path / "talker" / "vae")
    (path / "talker" / "model.safetensors").write_bytes(b"\0" * 64)
    os.makedirs(path / "mlp")
    (path / "mlp" / "config.json").write_text("{}")
    return str(path), cfg, tensors


def write_release(path, config: dict, tensors: dict, n_shards: int):
    """Shards written by the `safetensors` library (not by our writer), names spread round-robin."""
    names = sorted(tensors)
    weight_map = {}
    for k in range(n_shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::n_shards]}
        save_file(part, os.path.join(path, fname))
        weight_map.update({n: fname for n in part})
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map},
              open(os.path.join(path, convert.INDEX_FILE), "w"))
    json.dump(config, open(os.path.join(path, "config.json"), "w"))


@pytest.fixture(scope="module")
def omni_converted(omni_release, tmp_path_factory):
    src, cfg, tensors = omni_release
    dst = str(tmp_path_factory.mktemp("omni_ckpt") / "ckpt")
    manifest = convert.convert(src, dst, **QUIET)
    return dst, manifest


# --- round trips ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_golden_round_trip_is_bit_exact(golden_dir, tmp_path, case):
    src = copy_case(golden_dir, case, tmp_path / "src")
    manifest = convert.convert(src, str(tmp_path / "ckpt"), **QUIET)
    assert manifest.components
    size = os.path.getsize(golden_dir / case / "weights.safetensors")
    export.export_official(str(tmp_path / "ckpt"), str(tmp_path / "back"), max_shard_bytes=size // 3, **QUIET)
    back = read_release(tmp_path / "back")
    assert len(set(json.load(open(tmp_path / "back" / convert.INDEX_FILE))["weight_map"].values())) > 1
    assert_same_tensors(back, load_file(golden_dir / case / "weights.safetensors"))
    assert json.load(open(tmp_path / "back" / "config.json")) == json.load(open(golden_dir / case / "config.json"))


def test_synthetic_omni_round_trip_and_skips(omni_release, omni_converted, tmp_path):
    src, cfg, tensors = omni_release
    dst, manifest = omni_converted
    assert manifest.components == ["llm", "vision", "audio"]
    assert {f["name"] for f in manifest.skipped["folders"]} == {"talker", "mlp"}
    assert all(p["dtype"] == "bfloat16" for p in manifest.params.values())
    assert not os.path.exists(dst + ".partial")
    export.export_official(dst, str(tmp_path / "back"), max_shard_bytes=2 << 20, **QUIET)
    assert_same_tensors(read_release(tmp_path / "back"), tensors)
    for shard in set(json.load(open(tmp_path / "back" / convert.INDEX_FILE))["weight_map"].values()):
        assert os.path.getsize(tmp_path / "back" / shard) < (2 << 20) + 4096  # size-limited (+ header)


def test_layout_restores_with_plain_orbax_into_the_omni_param_tree(omni_release, omni_converted):
    """StandardCheckpointer, no ming_jax code: the tree is OmniModel's parameter pure dict."""
    src, cfg, tensors = omni_release
    dst, _ = omni_converted
    abstract = omni.create_abstract(cfg, Runtime(param_dtype="bfloat16"))
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    restored = ocp.StandardCheckpointer().restore(os.path.join(dst, checkpoint.PARAMS_DIR), target)
    want = weights.load_arrays(omni_table(cfg), tensors, weights.param_shapes(abstract))
    flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert len(flat) == len(want)
    for path in flat:
        node = restored
        for k in path:
            node = node[k]
        key = ".".join(map(str, path))
        assert np.asarray(node).astype(want[key].dtype).tobytes() == want[key].tobytes(), key


def test_tree_metadata_is_what_orbax_writes(omni_converted, tmp_path):
    """Our hand-made `_METADATA` equals orbax's own save of a tree with the same paths and shapes."""
    dst, manifest = omni_converted
    tree = checkpoint._unflatten({p: jax.numpy.zeros(v["shape"]) for p, v in manifest.params.items()
                                  if p.startswith("audio.")})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(tmp_path / "orbax"), tree)
    theirs = json.load(open(tmp_path / "orbax" / "_METADATA"))
    ours = json.load(open(os.path.join(dst, checkpoint.PARAMS_DIR, "_METADATA")))
    ours_audio = {k: v for k, v in ours["tree_metadata"].items() if k.startswith("('audio'")}
    assert ours_audio == theirs["tree_metadata"]
    assert {k: v for k, v in ours.items() if k != "tree_metadata"} == \
        {k: v for k, v in theirs.items() if k != "tree_metadata"}


def test_loaders_and_component_subset(omni_release, tmp_path):
    src, cfg, tensors = omni_release
    dst = str(tmp_path / "llm_only")
    manifest = convert.convert(src, dst, components=["llm"], **QUIET)
    assert manifest.components == ["llm"]
    assert set(manifest.skipped["components"]) == {"vision", "audio"}
    assert {p.split(".")[0] for p in manifest.params} == {"llm"}
    model = checkpoint.load_llm(dst)
    back = weights.export_state_dict(model, llm_table(cfg.llm, "model."))
    assert_same_values(back, {k: v for k, v in tensors.items() if k.startswith("model.")})
    with pytest.raises(checkpoint.CheckpointFormatError, match="holds no vision"):
        checkpoint.load_vision(dst)


def test_load_omni_vision_audio(omni_release, omni_converted):
    src, cfg, tensors = omni_release
    dst, _ = omni_converted
    model = checkpoint.load_omni(dst)
    assert_same_values(weights.export_state_dict(model, omni_table(cfg)), tensors)
    tower, proj = checkpoint.load_vision(dst)
    assert proj is not None and len(proj.layers) == cfg.mlp_depth
    audio = checkpoint.load_audio(dst)
    assert audio.cfg.out_dim == cfg.llm.hidden_size


# --- the converted golden checkpoints reproduce the golden outputs ----------------------------------------------------


def test_converted_llm_reproduces_golden_logits(golden_dir, tmp_path):
    dst = str(tmp_path / "ckpt")
    convert.convert(copy_case(golden_dir, "llm_backbone", tmp_path / "src"), dst, **QUIET)
    model = checkpoint.load_llm(dst)
    case = golden.load_case(str(golden_dir / "llm_backbone"))
    x = case.inputs
    mm = llm_backbone.multimodal_inputs(x)
    rows = llm_backbone.forward_rows(model, multimodal.prepare(model.cfg, x["input_ids"], mm=mm), "", case.outputs)
    assert "logits" in {r.name for r in rows}
    bad = [r.row() for r in rows if not r.ok]
    assert not bad, bad


def test_converted_towers_reproduce_golden_outputs(golden_dir, tmp_path):
    vdst, adst = str(tmp_path / "v"), str(tmp_path / "a")
    convert.convert(copy_case(golden_dir, "vision_encoder", tmp_path / "vs"), vdst, **QUIET)
    convert.convert(copy_case(golden_dir, "audio_encoder", tmp_path / "as"), adst, **QUIET)
    tower, proj = checkpoint.load_vision(vdst, use_deepstack=True)
    assert proj is None
    case = golden.load_case(str(golden_dir / "vision_encoder"))
    name = sorted(k[:-len("_pixel_values")] for k in case.inputs if k.endswith("_pixel_values"))[0]
    hidden, deep = vision_forward(tower, case.inputs[f"{name}_pixel_values"], as_grid(case.inputs[f"{name}_grid_thw"]))
    numerics.assert_close(f"{name}_last_hidden", hidden, case.outputs[f"{name}_last_hidden"])
    numerics.assert_close(f"{name}_deepstack_0", deep[0], case.outputs[f"{name}_deepstack_0"])
    audio = checkpoint.load_audio(adst)
    case = golden.load_case(str(golden_dir / "audio_encoder"))
    out = encode_audio(audio, case.inputs["audio_feats"], case.inputs["audio_feats_lengths"])
    numerics.assert_close("audio_embeds", out.embeds, case.outputs["audio_embeds"])


def test_dtype_option_casts(golden_dir, tmp_path):
    dst = str(tmp_path / "ckpt")
    manifest = convert.convert(copy_case(golden_dir, "audio_encoder", tmp_path / "src"), dst, dtype="bf16", **QUIET)
    assert {p["dtype"] for p in manifest.params.values()} == {"bfloat16"}
    model = checkpoint.load_audio(dst)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype(ml_dtypes.bfloat16)}
    export.export_official(dst, str(tmp_path / "back"), **QUIET)
    src = load_file(golden_dir / "audio_encoder" / "weights.safetensors")
    assert_same_tensors(read_release(tmp_path / "back"), {k: v.astype(ml_dtypes.bfloat16) for k, v in src.items()})


# --- broken sources: one clear error each, nothing published -----------------------------------------------------


def _edit_release(omni_release, tmp_path, edit) -> str:
    src = str(tmp_path / "broken")
    shutil.copytree(omni_release[0], src)
    edit(src)
    return src


def _index(src):
    return json.load(open(os.path.join(src, convert.INDEX_FILE)))


def _save_index(src, index):
    json.dump(index, open(os.path.join(src, convert.INDEX_FILE), "w"))


def _rewrite_shard_of(src, name, change):
    """Load the shard holding `name`, apply change(dict) -> dict, save it and fix the index to match."""
    index = _index(src)
    shard = index["weight_map"][name]
    tensors = dict(load_file(os.path.join(src, shard)))
    tensors = change(tensors)
    save_file(tensors, os.path.join(src, shard))
    wm = {k: v for k, v in index["weight_map"].items() if v != shard}
    wm.update({k: shard for k in tensors})
    _save_index(src, dict(index, weight_map=wm))


EXPERT = "model.model.layers.1.mlp.experts.3.up_proj.weight"


def _truncate(src):
    shard = os.path.join(src, _index(src)["weight_map"][EXPERT])
    os.truncate(shard, os.path.getsize(shard) - 1000)


def _missing_shard(src):
    os.remove(os.path.join(src, _index(src)["weight_map"][EXPERT]))


def _index_names_absent_tensor(src):
    index = _index(src)
    index["weight_map"]["model.model.layers.0.attention.ghost.weight"] = index["weight_map"][EXPERT]
    _save_index(src, index)


def _extra_tensor(src):
    _rewrite_shard_of(src, EXPERT, lambda t: dict(t, **{"model.model.layers.1.mlp.experts.99.up_proj.weight":
                                                        t[EXPERT]}))


def _orphan_tensor(src):
    _rewrite_shard_of(src, EXPERT, lambda t: dict(t, **{"query_tokens_dict.4x4": t[EXPERT]}))


def _missing_tensor(src):
    _rewrite_shard_of(src, EXPERT, lambda t: {k: v for k, v in t.items() if k != EXPERT})


def _wrong_shape(src):
    _rewrite_shard_of(src, EXPERT, lambda t: dict(t, **{EXPERT: t[EXPERT][:-1]}))


def _wrong_dtype(src):
    _rewrite_shard_of(src, EXPERT, lambda t: dict(t, **{EXPERT: t[EXPERT].astype(np.float16)}))


def _integer_tensor(src):
    name = "vision.pos_embed.weight"
    _rewrite_shard_of(src, name, lambda t: dict(t, **{name: t[name].astype(np.int32)}))


def _config_mismatch(src):
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["llm_config"]["moe_intermediate_size"] *= 2
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))


def _config_fewer_layers(src):
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["llm_config"]["num_hidden_layers"] -= 1
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))


def _malformed_index(src):
    open(os.path.join(src, convert.INDEX_FILE), "w").write('{"weight_map": {"a": ')


def _index_without_weight_map(src):
    _save_index(src, {"metadata": {}})


def _index_wrong_shard(src):
    index = _index(src)
    other = sorted(set(index["weight_map"].values()) - {index["weight_map"][EXPERT]})[0]
    index["weight_map"][EXPERT] = other
    _save_index(src, index)


def _corrupt_header(src):
    shard = os.path.join(src, _index(src)["weight_map"][EXPERT])
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"#garbage#")


def _missing_config(src):
    os.remove(os.path.join(src, "config.json"))


def _unknown_model(src):
    json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, open(os.path.join(src, "config.json"),
                                                                                   "w"))


BROKEN = {
    "truncated_shard": (_truncate, "is truncated"),
    "missing_shard": (_missing_shard, "names shard.* not in"),
    "index_names_absent_tensor": (_index_names_absent_tensor, "listed in the index are not in their shard.*ghost"),
    "index_wrong_shard": (_index_wrong_shard, "in another shard than the index says"),
    "extra_unknown_tensor": (_extra_tensor, "unexpected tensor.*experts.99.up_proj"),
    "tensor_of_no_component": (_orphan_tensor, "belong to no component.*query_tokens_dict"),
    "missing_tensor": (_missing_tensor, "missing tensor.*experts.3.up_proj"),
    "wrong_shape": (_wrong_shape, "experts.3.up_proj.weight: shape .* needs"),
    "wrong_dtype": (_wrong_dtype, "mixed dtypes.*experts.3.up_proj.weight \\(F16\\).*BF16"),
    "integer_dtype": (_integer_tensor, "pos_embed.weight: dtype I32 is not a floating dtype"),
    "config_mismatch_sizes": (_config_mismatch, "config and weights disagree"),
    "config_mismatch_layers": (_config_fewer_layers, "unexpected tensor.*layers.2"),
    "malformed_index_json": (_malformed_index, "not valid JSON"),
    "index_without_weight_map": (_index_without_weight_map, "no weight_map"),
    "corrupt_header": (_corrupt_header, "corrupt"),
    "missing_config": (_missing_config, "no config.json"),
    "unknown_model": (_unknown_model, "describes no model we convert"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_source_is_a_clear_error(omni_release, tmp_path, kind):
    edit, message = BROKEN[kind]
    src = _edit_release(omni_release, tmp_path, edit)
    dst = str(tmp_path / "out")
    with pytest.raises(ValueError, match=message):
        convert.convert(src, dst, **QUIET)
    assert not os.path.exists(dst) and not os.path.exists(dst + ".partial")


def test_unknown_or_absent_component(omni_release, golden_dir, tmp_path):
    with pytest.raises(convert.ConversionError, match=r"unknown component.*\['speech'\]; known: .*talker"):
        convert.plan_conversion(omni_release[0], components=["llm", "speech"])
    with pytest.raises(convert.ConversionError, match=r"\['talker'\] are not in this release"):  # no talker configs
        convert.plan_conversion(omni_release[0], components=["llm", "talker"])
    src = copy_case(golden_dir, "llm_backbone", tmp_path / "src")
    with pytest.raises(convert.ConversionError, match="not in this release"):
        convert.plan_conversion(src, components=["vision"])
    with pytest.raises(convert.ConversionError, match="choose bf16 or f32"):
        convert.plan_conversion(src, dtype="int4")  # int8 / fp8 are quantized checkpoints (tests/test_quant.py)


def test_existing_destination_is_kept_unless_overwrite(golden_dir, tmp_path):
    src = copy_case(golden_dir, "audio_encoder", tmp_path / "src")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(convert.ConversionError, match="already exists"):
        convert.convert(src, str(dst), **QUIET)
    assert (dst / "keep").exists()
    convert.convert(src, str(dst), overwrite=True, **QUIET)
    assert not (dst / "keep").exists() and (dst / mf.MANIFEST_FILE).exists()


def test_interrupted_conversion_resumes(omni_release, tmp_path, monkeypatch):
    src, cfg, tensors = omni_release
    dst = str(tmp_path / "ckpt")
    real_read = convert.SourceCheckpoint.read
    calls = {"n": 0}

    def failing_read(self, info):
        calls["n"] += 1
        if calls["n"] > 150:
            raise KeyboardInterrupt("simulated interruption")
        return real_read(self, info)

    monkeypatch.setattr(convert.SourceCheckpoint, "read", failing_read)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(src, dst, flush_bytes=100_000, **QUIET)
    assert not os.path.exists(dst) and os.path.isdir(dst + ".partial")
    monkeypatch.setattr(convert.SourceCheckpoint, "read", real_read)
    logs = []
    convert.convert(src, dst, flush_bytes=100_000, progress=False, log=logs.append)
    resumed = [m for m in logs if m.startswith("resuming")]
    assert resumed and int(resumed[0].split(": ")[1].split()[0]) >= 100
    assert not os.path.exists(dst + ".partial")
    export.export_official(dst, str(tmp_path / "back"), **QUIET)  # CRC32-checked against every source tensor
    assert_same_tensors(read_release(tmp_path / "back"), tensors)


def test_interrupted_run_with_other_options_restarts(golden_dir, tmp_path):
    src = copy_case(golden_dir, "audio_encoder", tmp_path / "src")
    dst = str(tmp_path / "ckpt")
    os.makedirs(dst + ".partial")
    json.dump({"format": "old"}, open(os.path.join(dst + ".partial", "convert_state.json"), "w"))
    logs = []
    convert.convert(src, dst, progress=False, log=logs.append)
    assert any("removing" in m for m in logs)
    assert checkpoint.Manifest.read(dst).components == ["audio"]


def test_truncated_checkpoint_is_detected_on_export(golden_dir, tmp_path):
    dst = str(tmp_path / "ckpt")
    convert.convert(copy_case(golden_dir, "audio_encoder", tmp_path / "src"), dst, **QUIET)
    manifest = json.load(open(os.path.join(dst, mf.MANIFEST_FILE)))
    name = next(iter(manifest["source"]["tensors"]))
    manifest["source"]["tensors"][name]["crc32"] ^= 1
    json.dump(manifest, open(os.path.join(dst, mf.MANIFEST_FILE), "w"))
    with pytest.raises(convert.ConversionError, match="CRC32 mismatch"):
        export.export_official(dst, str(tmp_path / "back"), **QUIET)
    assert not os.path.exists(tmp_path / "back")


def test_tensors_in_flight_stay_within_the_read_budget(omni_release, tmp_path, monkeypatch):
    """With 4 workers and a 64 KB budget, tensors being read / re-laid out at once never exceed the budget (a
    larger tensor runs alone): what bounds the converter's memory besides the commit batches."""
    import threading

    src, cfg, tensors = omni_release
    real_read, lock = convert.SourceCheckpoint.read, threading.Lock()
    live, peak = [0], [0]
    budget = 64 << 10

    def tracked(self, info):
        with lock:
            live[0] += info.nbytes
            peak[0] = max(peak[0], live[0] if live[0] > info.nbytes else 0)
        try:
            return real_read(self, info)
        finally:
            with lock:
                live[0] -= info.nbytes

    monkeypatch.setattr(convert.SourceCheckpoint, "read", tracked)
    convert.convert(src, str(tmp_path / "ckpt"), workers=4, read_bytes=budget, flush_bytes=256 << 10, **QUIET)
    assert 0 < peak[0] <= budget  # several tensors did overlap, never more than the budget


def test_progress_reports_bytes_and_eta():
    import io

    out = io.StringIO()
    bar = convert.Progress(4 * 10**9, "convert", stream=out)
    bar.update(10**9, "a.weight")
    bar.close()
    text = out.getvalue()
    assert "GB" in text and "ETA" in text and "MB/s" in text


# --- the CLI and multi-device restore (subprocesses) --------------------------------------------------------------


def _run(args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **(env or {})), timeout=600)


def test_cli_convert_reverse_and_error(golden_dir, tmp_path):
    src = copy_case(golden_dir, "audio_encoder", tmp_path / "src")
    r = _run(["tools/convert_torch.py", "--src", src, "--dst", str(tmp_path / "ckpt"), "--quiet"])
    assert r.returncode == 0, r.stderr
    r = _run(["tools/convert_torch.py", "--reverse", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "b"),
              "--max_shard_size", "200KB"])
    assert r.returncode == 0, r.stderr
    assert "verified bit-exact" in r.stderr and "ETA" in r.stderr
    assert_same_tensors(read_release(tmp_path / "b"), load_file(golden_dir / "audio_encoder" / "weights.safetensors"))
    os.remove(os.path.join(src, "weights.safetensors"))
    r = _run(["tools/convert_torch.py", "--src", src, "--dst", str(tmp_path / "ckpt2")])
    assert r.returncode == 1 and "convert_torch: error:" in r.stderr and "no *.safetensors" in r.stderr


def test_sharded_restore_on_8_cpu_devices(golden_dir, tmp_path):
    dst = str(tmp_path / "ckpt")
    convert.convert(copy_case(golden_dir, "llm_backbone", tmp_path / "src"), dst, **QUIET)
    r = _run([os.path.join(REPO, "tests", "convert_multidevice.py"), dst, str(golden_dir / "llm_backbone")],
             env={"XLA_FLAGS": xla_env.flags("--xla_force_host_platform_device_count=8")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
