"""int8 / fp8 weights in the model and in checkpoints (`ming_jax.quant`, `ming_jax.checkpoint`).

quantize_model on the tiny LLM (which parameters, their layout, abstract models, the layer scan, jit, the weight-read
hook); quantized checkpoints: `--dtype int8` conversion (streamed slot by slot) restores to the same bytes as
quantizing a float checkpoint at load (region by region from disk) and a release folder on the host, loads quantized
as stored, and exports dequantised to bf16; a block-scaled FP8 release folder (F8_E4M3 + `weight_scale_inv`, the
transformers / DeepSeek-V3 naming) loads and converts directly, and broken scale tensors are named.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ming_jax import quant
from ming_jax.checkpoint import convert, export, restore
from ming_jax.checkpoint import manifest as mf
from ming_jax.checkpoint.safetensors import CheckpointError, SourceCheckpoint
from ming_jax.config.llm import LLMConfig
from ming_jax.layers import params as P
from ming_jax.models import llm
from ming_jax.pallas.gmm import quant as qmath

QUIET = dict(progress=False, log=lambda msg: None)
QUANTIZED = {"dense_layers.0.attn.qkv", "dense_layers.0.attn.out", "dense_layers.0.mlp.gate", "dense_layers.0.mlp.up",
             "dense_layers.0.mlp.down", "moe_layers.attn.qkv", "moe_layers.attn.out", "moe_layers.moe.shared.gate",
             "moe_layers.moe.shared.up", "moe_layers.moe.shared.down", "moe_layers.moe.w_gate", "moe_layers.moe.w_up",
             "moe_layers.moe.w_down", "lm_head"}


def _flat(module) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a


# --------------------------------------------------------------------------------------------------- the model


def test_quantize_model_layout_forward_and_read():
    cfg = LLMConfig.tiny()
    model = llm.create(cfg)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(8), (3, 2, 8))
    forward = nnx.jit(lambda m, i, p: m(m.embed_tokens(i), p).logits)
    ref = forward(model, ids, pos)
    targets = quant.plan(model, quant.QuantConfig("int8"))
    assert set(targets) == QUANTIZED  # not: the embedding, norms, biases, routers
    quant.quantize_model(model, "int8")
    flat = _flat(model)
    assert {p.rsplit(".", 1)[0] for p in flat if p.endswith(".qvalue")} == QUANTIZED
    assert flat["moe_layers.moe.w_gate.qvalue"].dtype == np.int8
    assert flat["moe_layers.moe.w_gate.scale"].shape == (cfg.num_moe_layers, cfg.num_experts, 1,
                                                          cfg.moe_intermediate_size)
    assert flat["moe_layers.attn.out.scale"].shape == (cfg.num_moe_layers, 1, 1, cfg.hidden_size)
    assert flat["moe_layers.moe.router.kernel"].dtype == np.float32 and flat["embed"].dtype == np.float32
    axes = {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert axes["moe_layers.moe.w_gate.scale"] == ("layers", "experts", None, "expert_mlp")
    assert axes["moe_layers.moe.w_gate.qvalue"] == ("layers", "experts", "expert_embed", "expert_mlp")
    assert quant.config_of(model) == quant.QuantConfig("int8")
    out = forward(model, ids, pos)  # the layer scan over the stacked quantized layers
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel
    # read: dequantised for einsums, the QArray for consumers that take it; hooks see either
    w = model.lm_head
    seen = []
    with P.weight_hook(lambda weight, value: seen.append(type(value).__name__) or value):
        d = P.read(w, jnp.bfloat16)
        q = P.read(w, quantized=True)
    assert d.dtype == jnp.bfloat16 and isinstance(q, qmath.QArray) and seen == ["ArrayImpl", "QArray"]
    np.testing.assert_allclose(np.asarray(d, np.float32), qmath.dequantize(q), rtol=1e-2, atol=1e-3)


def test_quantize_abstract_model_and_sub_channel():
    cfg = LLMConfig.tiny()
    abstract = quant.quantize_model(llm.create_abstract(cfg), "fp8:64")
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    assert isinstance(flat["lm_head.qvalue"], jax.ShapeDtypeStruct)
    assert flat["moe_layers.moe.w_gate.qvalue"].dtype == jnp.float8_e4m3fn
    assert flat["moe_layers.moe.w_gate.scale"].shape[2] == cfg.hidden_size // 64  # blocks of 64 along D
    assert flat["moe_layers.moe.w_down.scale"].shape[2] == 1  # F = 32 < 64: per channel
    assert quant.config_of(abstract) == quant.QuantConfig("fp8", 64)
    with pytest.raises(ValueError, match="quantization 'int3'"):
        quant.QuantConfig.parse("int3")


# --------------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def release(golden_dir, tmp_path_factory):
    """The golden llm_backbone case as a release folder (config.json + the official float32 weights)."""
    d = tmp_path_factory.mktemp("release")
    for f in ("config.json", "weights.safetensors"):
        shutil.copyfile(golden_dir / "llm_backbone" / f, d / f)
    return str(d)


def test_int8_checkpoint_round_trip(release, tmp_path):
    f32, q8 = str(tmp_path / "f32"), str(tmp_path / "int8")
    convert.convert(release, f32, **QUIET)
    man = convert.convert(release, q8, dtype="int8", **QUIET)
    assert man.options["quantization"] == {"qtype": "int8", "block": None, "params": sorted(f"llm.{p}" for p in
                                                                                             QUANTIZED)}
    assert man.params["llm.moe_layers.moe.w_gate.qvalue"]["dtype"] == "int8"
    assert man.params["llm.moe_layers.moe.w_gate.scale"]["dtype"] == "float32"
    assert man.params["llm.embed"]["dtype"] == "bfloat16"  # the float rest: bf16
    assert restore.checkpoint_dtype(q8) == "bfloat16"
    stored = restore.load(q8).llm  # quantized as stored
    at_load = restore.load(f32, quantize="int8").llm  # a float checkpoint quantized region by region from disk
    host = restore.load(release, quantize="int8").llm  # a release folder quantized on the host
    a, b, c = _flat(stored), _flat(at_load), _flat(host)
    assert a.keys() == b.keys() == c.keys()
    for k in (f"{p}.{leaf}" for p in QUANTIZED for leaf in ("qvalue", "scale")):
        # the same bytes, whichever way (all from the float32 source)
        assert np.array_equal(_bits(a[k]), _bits(b[k])) and np.array_equal(_bits(a[k]), _bits(c[k])), k
    with pytest.raises(mf.CheckpointFormatError, match="holds int8 weights"):
        restore.load(q8, quantize="fp8")
    # the reverse export: the official names, the quantized weights dequantised in bf16
    out = str(tmp_path / "back")
    export.export_official(q8, out, **QUIET)
    exported = SourceCheckpoint(out)
    back = {n: exported.read(i)[0] for n, i in exported.tensors.items()}
    orig = load_file(os.path.join(release, "weights.safetensors"))
    assert back.keys() == orig.keys()
    w = "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert back[w].dtype == ml_dtypes.bfloat16
    rel = np.linalg.norm(back[w].astype(np.float32) - orig[w]) / np.linalg.norm(orig[w])
    assert 1e-4 < rel < 0.01, rel  # int8 per-channel error, not a lost tensor


def _fp8_release(release: str, dst, block=128, break_one=False) -> dict:
    """The release folder with every 2-D projection of the decoder stored block-scaled FP8 as transformers' fine-
    grained FP8 (DeepSeek-V3) checkpoints are: F8_E4M3 `<w>` + F32 `<w>_scale_inv` [ceil(out/128), ceil(in/128)],
    `quantization_config` in config.json. Returns {name: the dequantised float32 weight}."""
    os.makedirs(dst)
    tensors = load_file(os.path.join(release, "weights.safetensors"))
    out, deq = {}, {}
    for n, w in tensors.items():
        if re.search(r"\.(gate_proj|up_proj|down_proj|query_key_value|dense)\.weight$", n):
            o, i = w.shape
            so, si = -(-o // block), -(-i // block)
            pad = np.zeros((so * block, si * block), np.float32)
            pad[:o, :i] = w
            blocks = pad.reshape(so, block, si, block)
            sc = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-12).astype(np.float32) / np.float32(448)
            q = (blocks / sc[:, None, :, None]).reshape(so * block, si * block)[:o, :i].astype(ml_dtypes.float8_e4m3fn)
            out[n], out[n + "_scale_inv"] = q, sc
            deq[n] = q.astype(np.float32) * np.repeat(np.repeat(sc, block, 0), block, 1)[:o, :i]
        else:
            out[n] = w
    if break_one:
        name = next(k for k in out if k.endswith("_scale_inv"))
        out[name] = out[name][:, :1].copy()
    cfg = json.load(open(os.path.join(release, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    save_file(out, os.path.join(dst, "model.safetensors"))
    return deq


def test_fp8_release_folder_loads_and_converts_directly(release, tmp_path):
    src = str(tmp_path / "fp8_release")
    deq = _fp8_release(release, src)
    source = SourceCheckpoint(src)
    assert source.fp8_weights == len(deq) > 0
    assert not any(n.endswith("_scale_inv") for n in source.tensors)
    for n in list(deq)[:5]:  # dequantised on read: fp8 x its block's scale, exactly
        assert np.array_equal(source.read(source.tensors[n])[0], deq[n])
    loaded = restore.load(src).llm
    w = _flat(loaded)["moe_layers.moe.w_gate"]  # [L, E, D, F]: expert 3 of layer 1 as the table lays it out
    np.testing.assert_array_equal(w[0, 3], deq["model.layers.1.mlp.experts.3.gate_proj.weight"].T)
    conv = str(tmp_path / "conv")
    convert.convert(src, conv, dtype="fp8", **QUIET)  # re-quantized per channel from the dequantised weights
    assert quant.config_of(restore.load(conv).llm) == quant.QuantConfig("fp8")
    bad = str(tmp_path / "broken")
    _fp8_release(release, bad, break_one=True)
    with pytest.raises(CheckpointError, match="_scale_inv: shape"):
        SourceCheckpoint(bad)
