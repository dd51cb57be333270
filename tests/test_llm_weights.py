"""The official-name table of the LLM: coverage, exact round trips, strict errors, checkpoint folders."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ming_jax.models import llm as model_lib
from ming_jax.checkpoint import release as official
from ming_jax import weights
from ming_jax.config import LLMConfig
from ming_jax.weights.llm import grouped_qkv, llm_table

VARIANTS = [
    LLMConfig.tiny(),
    LLMConfig.tiny(tie_word_embeddings=True, use_qkv_bias=True, use_bias=True),
    LLMConfig.tiny(router_type="topN", first_k_dense_replace=0, num_layers=2),
    LLMConfig.tiny(first_k_dense_replace=2, num_layers=4, num_kv_heads=1, num_shared_experts=0),
    LLMConfig.tiny(first_k_dense_replace=3, num_layers=3),  # all dense
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"L{c.num_layers}k{c.first_k_dense_replace}{c.router_type}")
def test_table_covers_every_parameter_once(cfg):
    abstract = model_lib.create_abstract(cfg)
    table = llm_table(cfg)
    table.check_coverage(weights.param_shapes(abstract))
    names = table.expected_names()
    assert len(names) == len(set(names))


@pytest.mark.parametrize("cfg", VARIANTS[:4], ids=lambda c: f"L{c.num_layers}k{c.first_k_dense_replace}")
def test_export_load_export_is_exact(cfg):
    model = model_lib.create(cfg, seed=3)
    table = llm_table(cfg)
    sd = weights.export_state_dict(model, table)
    again = weights.export_state_dict(weights.load_state_dict(model_lib.create_abstract(cfg), table, sd), table)
    assert sd.keys() == again.keys()
    for k in sd:
        np.testing.assert_array_equal(sd[k], again[k], err_msg=k)


def test_golden_weights_round_trip_bit_exact(golden_dir):
    sd = load_file(str(golden_dir / "llm_backbone" / "weights.safetensors"))
    cfg = LLMConfig.from_official(json.loads((golden_dir / "llm_backbone" / "config.json").read_text()))
    table = llm_table(cfg)
    model = weights.load_state_dict(model_lib.create_abstract(cfg), table, sd)
    back = weights.export_state_dict(model, table)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_grouped_qkv_keeps_each_query_head_with_its_kv_head():
    cfg = LLMConfig.tiny(num_heads=8, num_kv_heads=2, head_dim=4, hidden_size=16)
    h, kv, hd, d = 8, 2, 4, 16
    rows = np.arange((h + 2 * kv) * hd * d, dtype=np.float32).reshape((h + 2 * kv) * hd, d)
    ours = grouped_qkv(cfg).to_ours(rows)  # [D, K, G+2, hd]
    assert ours.shape == (d, kv, h // kv + 2, hd)
    head = lambda i: rows[i * hd:(i + 1) * hd].T  # noqa: E731  official rows of head i -> [D, hd]
    for q in range(h):  # query head q reads kv head q // G (the release's repeat_kv)
        j, g = divmod(q, h // kv)
        np.testing.assert_array_equal(ours[:, j, g], head(q))
    for j in range(kv):
        np.testing.assert_array_equal(ours[:, j, h // kv], head(h + j))
        np.testing.assert_array_equal(ours[:, j, h // kv + 1], head(h + kv + j))
    np.testing.assert_array_equal(grouped_qkv(cfg).to_official(ours), rows)


@pytest.fixture(scope="module")
def tiny_state():
    cfg = LLMConfig.tiny(num_layers=2)
    return cfg, weights.export_state_dict(model_lib.create(cfg), llm_table(cfg))


def test_missing_tensor_is_named(tiny_state):
    cfg, sd = tiny_state
    sd = dict(sd)
    del sd["model.layers.1.mlp.experts.7.up_proj.weight"]
    with pytest.raises(weights.WeightError, match=r"missing.*model\.layers\.1\.mlp\.experts\.7\.up_proj\.weight"):
        weights.load_state_dict(model_lib.create_abstract(cfg), llm_table(cfg), sd)


def test_unexpected_tensor_is_named(tiny_state):
    cfg, sd = tiny_state
    sd = dict(sd, **{"model.layers.1.mlp.experts.99.up_proj.weight": np.zeros((32, 128), np.float32),
                     "model.rotary.inv_freq": np.zeros(4, np.float32)})
    with pytest.raises(weights.WeightError, match=r"unexpected.*experts\.99.*inv_freq|unexpected.*inv_freq"):
        weights.load_state_dict(model_lib.create_abstract(cfg), llm_table(cfg), sd)


def test_wrong_shape_is_named(tiny_state):
    cfg, sd = tiny_state
    sd = dict(sd)
    sd["model.layers.0.mlp.gate_proj.weight"] = np.zeros((255, 128), np.float32)
    with pytest.raises(weights.WeightError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(255, 128\)"):
        weights.load_state_dict(model_lib.create_abstract(cfg), llm_table(cfg), sd)


def test_checkpoint_folder_sharded_with_index(tmp_path, tiny_state, golden_dir):
    cfg, sd = tiny_state
    names = sorted(sd)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (tmp_path / official.INDEX_FILE).write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_official()))
    model = official.load_llm(str(tmp_path))
    back = weights.export_state_dict(model, llm_table(cfg))
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])

    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(official.CheckpointError, match="b.safetensors"):
        official.release_tensors(str(tmp_path))


def test_corrupt_shard_is_reported(tmp_path, tiny_state):
    cfg, sd = tiny_state
    save_file(sd, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_official()))
    with pytest.raises(official.CheckpointError, match="model.safetensors"):
        official.load_llm(str(tmp_path))


def test_llm_loads_from_omni_checkpoint_folder(golden_dir, tmp_path):
    """In the omni checkpoint the LLM lives under `model.`; its other tensors are not the LLM's business."""
    src = golden_dir / "full_mm_forward"
    for f in ("config.json", "weights.safetensors"):
        shutil.copy(src / f, tmp_path / f)
    model = official.load_llm(str(tmp_path))
    sd = load_file(str(src / "weights.safetensors"))
    back = weights.export_state_dict(model, llm_table(model.cfg, "model."))
    assert set(back) == {k for k in sd if k.startswith("model.")}
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k])
